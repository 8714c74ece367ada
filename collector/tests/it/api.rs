//! The operators' HTTP API from outside: a real collector with `[api]`, curl over HTTPS
//! with the fleet CA's certificates, a real PostgreSQL. Who gets in (only operator
//! certificates), what the endpoints answer and what they change in the database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// A collector in mTLS mode with the API on its own port.
struct ApiCollector {
    proc: Proc,
    grpc: SocketAddr,
    api: SocketAddr,
    http: SocketAddr,
    pki_ca: PathBuf,
}

impl ApiCollector {
    fn start(dir: &Path, db: &TestDb, pki: &Pki) -> ApiCollector {
        let (grpc, http, api) = (free_addr(), free_addr(), free_addr());
        let (cert, key) = pki.server();
        let config = dir.join("collector.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\n[database]\nurl = \"{}\"\n\n[api]\nlisten = \"{api}\"\n",
                cert.display(),
                key.display(),
                pki.ca_pem().display(),
                db.url
            ),
        )
        .unwrap();
        let mut cmd = Command::new(collector_bin());
        cmd.arg("run").arg("--config").arg(&config);
        let mut proc = Proc::spawn(cmd, dir.join("collector.log"));
        wait_for(Duration::from_secs(30), "collector /readyz", || {
            assert!(proc.is_running(), "collector exited: {}", proc.log_text());
            http_get(http, "/readyz").filter(|(s, _)| *s == 200)
        });
        // The API is served once migrations ran, a moment after /readyz may say so.
        wait_for(Duration::from_secs(10), "the api port", || {
            std::net::TcpStream::connect(api).ok()
        });
        ApiCollector {
            proc,
            grpc,
            api,
            http,
            pki_ca: pki.ca_pem(),
        }
    }

    fn grpc_permission_refusals(&self) -> f64 {
        let text = http_get(self.http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        metric(&text, "edgeprobe_ingest_errors_total{stage=\"permission\"}")
    }
}

/// What curl got: the HTTP status (None when there was no HTTP exchange: the TLS
/// handshake failed), the body, and curl's stderr.
struct Answer {
    status: Option<u16>,
    body: String,
    stderr: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `curl` against the API as the holder of `identity` (cert, key), or with no certificate.
fn curl(
    c: &ApiCollector,
    identity: Option<&(PathBuf, PathBuf)>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Answer {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "20"])
        .arg("--cacert")
        .arg(&c.pki_ca)
        .args(["-X", method, "--write-out", "\n%{http_code}"]);
    if let Some((cert, key)) = identity {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
        cmd.stdin(std::process::Stdio::piped());
    }
    // The certificate is for 127.0.0.1 and localhost.
    cmd.arg(format!("https://localhost:{}{path}", c.api.port()));
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("curl (scripts/setup installs it)");
    if let Some(body) = body {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(body.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Answer {
        status: code.trim().parse().ok().filter(|c| *c != 0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn operator(pki: &Pki, name: &str) -> (PathBuf, PathBuf) {
    pki.issue(&["--operator", name]);
    pki.pair(name)
}

#[test]
fn api_refuses_every_certificate_but_an_operators_and_the_ingest_refuses_an_operators() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let agent = pki.agent("branch-042");
    let server = pki.server();
    let alice = operator(&pki, "alice");

    // No client certificate: the TLS handshake fails, no HTTP exchange at all.
    let a = curl(&c, None, "GET", "/api/v1/tests", None);
    assert_eq!(a.status, None, "got in without a certificate: {}", a.body);
    assert!(!a.stderr.is_empty());

    // The collector's own certificate allows no client auth: refused in the handshake.
    let a = curl(&c, Some(&server), "GET", "/api/v1/tests", None);
    assert_eq!(
        a.status, None,
        "got in with the server certificate: {}",
        a.body
    );

    // An agent's certificate: 403 with a JSON error, on every path and method.
    for (method, path) in [
        ("GET", "/api/v1/tests"),
        ("POST", "/api/v1/tests"),
        ("POST", "/api/v1/runs"),
        ("GET", "/api/v1/nothing-here"),
    ] {
        let a = curl(&c, Some(&agent), method, path, Some("x"));
        assert_eq!(a.status, Some(403), "{method} {path}: {}", a.body);
        let error = a.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains("no operator role"), "{error}");
    }

    // The operator gets JSON answers, also for what does not exist.
    let a = curl(&c, Some(&alice), "GET", "/api/v1/nothing-here", None);
    assert_eq!(a.status, Some(404), "{}", a.body);
    assert!(a.json()["error"].is_string());
    let a = curl(&c, Some(&alice), "DELETE", "/api/v1/tests", None);
    assert_eq!(a.status, Some(405), "{}", a.body);
    assert!(a.json()["error"].is_string());

    // An operator certificate cannot deliver results as an agent: the agent named like
    // the operator is refused with PERMISSION_DENIED and nothing is stored for it.
    let before = c.grpc_permission_refusals();
    let state = dir.path().join("alice-state");
    let config = dir.path().join("alice.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"alice\"\nstate_dir = \"{}\"\n\n[collector]\nendpoints = [\"https://localhost:{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreconnect_spread = \"0s\"\n\n{}",
            state.display(),
            c.grpc.port(),
            pki.ca_pem().display(),
            alice.0.display(),
            alice.1.display(),
            http_test("http://127.0.0.1:9/", "1s"),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run").arg("--config").arg(&config);
    let mut agent_proc = Proc::spawn(cmd, dir.path().join("alice.log"));
    wait_for(Duration::from_secs(30), "the ingest's refusal", || {
        (c.grpc_permission_refusals() > before).then_some(())
    });
    agent_proc.stop();
    assert!(
        c.proc.log_text().contains("operator certificate"),
        "{}",
        c.proc.log_text()
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'alice'"),
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id = 'alice'"),
        0
    );
}
