//! The operators' HTTP API from outside: a real collector with `[api]`, curl over HTTPS
//! with the fleet CA's certificates, a real PostgreSQL. Who gets in (only operator
//! certificates), what the endpoints answer and what they change in the database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// A collector in mTLS mode with the API on its own port.
pub(crate) struct ApiCollector {
    pub(crate) proc: Proc,
    pub(crate) grpc: SocketAddr,
    pub(crate) api: SocketAddr,
    http: SocketAddr,
    pub(crate) pki_ca: PathBuf,
}

impl ApiCollector {
    pub(crate) fn start(dir: &Path, db: &TestDb, pki: &Pki) -> ApiCollector {
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
pub(crate) struct Answer {
    pub(crate) status: Option<u16>,
    pub(crate) body: String,
    stderr: String,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `curl` against the API as the holder of `identity` (cert, key), or with no certificate.
pub(crate) fn curl(
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

pub(crate) fn operator(pki: &Pki, name: &str) -> (PathBuf, PathBuf) {
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
    let huge = "#".repeat(5 << 20);
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(&huge));
    assert_eq!(a.status, Some(413), "{}", a.body);
    assert!(a.json()["error"].as_str().unwrap().contains("4194304"));
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 0);

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

const FLEET_FILE: &str = r#"# what every Berlin agent measures
[[test]]
name = "gateway"
kind = "tcp"
target = "127.0.0.1:9"
every = "30s"
select = { site = "berlin" }
"#;

/// An agent row as a collector writes it at a hello (labels, features, local tests).
fn known_agent(db: &TestDb, id: &str, site: &str, local_tests: &[&str]) {
    let local: Vec<String> = local_tests.iter().map(|s| s.to_string()).collect();
    db.client()
        .execute(
            "INSERT INTO agents (agent_id, labels, features, local_tests)
             VALUES ($1, jsonb_build_object('site', $2::text), '{fleet-tests,run-now}', $3)",
            &[&id, &site, &local],
        )
        .unwrap();
}

#[test]
fn api_applies_lists_diffs_rolls_back_and_runs_now_as_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    known_agent(&db, "branch-007", "berlin", &["web"]);
    known_agent(&db, "branch-042", "berlin", &[]);
    known_agent(&db, "branch-100", "paris", &[]);
    let versions = || db.scalar("SELECT count(*) FROM fleet_versions");

    // Nothing applied yet.
    let a = curl(&c, Some(&alice), "GET", "/api/v1/tests", None);
    assert_eq!(a.status, Some(200), "{}", a.body);
    assert!(a.json()["current"].is_null(), "{}", a.body);

    // A bad file: 422 at its line and column, nothing stored.
    let bad = FLEET_FILE.replace("target =", "targt =");
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(&bad));
    assert_eq!(a.status, Some(422), "{}", a.body);
    let e = a.json();
    assert_eq!(
        (e["line"].as_u64(), e["col"].as_u64()),
        (Some(5), Some(1)),
        "{e}"
    );
    assert!(e["error"].as_str().unwrap().contains("targt"), "{e}");
    assert_eq!(versions(), 0);

    // A dry run shows the change and stores nothing.
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/tests?dry_run=true",
        Some(FLEET_FILE),
    );
    assert_eq!(a.status, Some(200), "{}", a.body);
    let d = a.json();
    assert_eq!(d["dry_run"], true, "{d}");
    assert!(d["version"].is_null(), "{d}");
    assert_eq!(d["added"], 1, "{d}");
    assert_eq!(d["agents_selected"], 2, "{d}");
    assert_eq!(versions(), 0);

    // Applied: version 1, made by alice.
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(FLEET_FILE));
    assert_eq!(a.status, Some(201), "{}", a.body);
    assert_eq!(a.json()["version"], 1, "{}", a.body);
    let a = curl(&c, Some(&alice), "GET", "/api/v1/tests", None);
    assert_eq!(a.status, Some(200), "{}", a.body);
    let l = a.json();
    assert_eq!(l["current"]["version"], 1, "{l}");
    assert_eq!(l["current"]["created_by"], "alice", "{l}");
    assert_eq!(l["current"]["origin"], "api", "{l}");
    assert_eq!(l["tests"][0]["name"], "gateway", "{l}");
    assert_eq!(l["tests"][0]["agents_selected"], 2, "{l}");
    assert_eq!(l["agents_known"], 3, "{l}");
    let mut sql = db.client();
    let row = sql
        .query_one(
            "SELECT created_by, origin, source FROM fleet_versions WHERE version = 1",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alice");
    assert_eq!(row.get::<_, String>(1), "api");
    assert_eq!(row.get::<_, String>(2), FLEET_FILE);

    // The same file again: no new version.
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(FLEET_FILE));
    assert_eq!(a.status, Some(200), "{}", a.body);
    assert!(a.json()["version"].is_null(), "{}", a.body);
    assert_eq!(versions(), 1);

    // A fleet test named like a local test of an agent it selects: refused at the name.
    let clash = format!("{FLEET_FILE}\n[[test]]\nname = \"web\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:9\"\nevery = \"1m\"\n");
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(&clash));
    assert_eq!(a.status, Some(422), "{}", a.body);
    let e = a.json();
    assert_eq!(
        (e["line"].as_u64(), e["col"].as_u64()),
        (Some(10), Some(8)),
        "{e}"
    );
    assert!(e["error"].as_str().unwrap().contains("branch-007"), "{e}");
    assert_eq!(versions(), 1);

    // Diff, then apply a second version for the Paris agent.
    let second = FLEET_FILE.replace("berlin", "paris");
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/tests/diff",
        Some(&second),
    );
    assert_eq!(a.status, Some(200), "{}", a.body);
    let d = a.json();
    assert_eq!(
        (d["current"].as_i64(), d["changed"].as_i64()),
        (Some(1), Some(1)),
        "{d}"
    );
    assert_eq!(d["tests"][0]["agents_selected"], 1, "{d}");
    assert_eq!(versions(), 1);
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(&second));
    assert_eq!(a.json()["version"], 2, "{}", a.body);

    // Rollback to 1 is version 3 with version 1's tests; a version that never was is 404.
    let bob = operator(&pki, "bob");
    let a = curl(
        &c,
        Some(&bob),
        "POST",
        "/api/v1/tests/rollback",
        Some(r#"{"version": 1}"#),
    );
    assert_eq!(a.status, Some(201), "{}", a.body);
    assert_eq!(a.json()["version"], 3, "{}", a.body);
    let a = curl(&c, Some(&bob), "GET", "/api/v1/tests/versions", None);
    let v = a.json();
    let newest = &v["versions"][0];
    assert_eq!(
        (
            &newest["version"],
            &newest["created_by"],
            &newest["origin"],
            &newest["rolled_back_to"]
        ),
        (&json!(3), &json!("bob"), &json!("rollback"), &json!(1)),
        "{v}"
    );
    assert_eq!(v["versions"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM fleet_tests WHERE version = 3 AND select_labels = '{\"site\": \"berlin\"}'"),
        1
    );
    let a = curl(
        &c,
        Some(&bob),
        "POST",
        "/api/v1/tests/rollback",
        Some(r#"{"version": 99}"#),
    );
    assert_eq!(a.status, Some(404), "{}", a.body);
    let a = curl(
        &c,
        Some(&bob),
        "POST",
        "/api/v1/tests/rollback",
        Some(r#"{"versoin": 1}"#),
    );
    assert_eq!(a.status, Some(400), "{}", a.body);
    assert!(a.json()["line"].is_u64(), "{}", a.body);

    // Run now: a request of the wrong shape is 422; an ad-hoc tcp test to one agent is
    // 202 with its run id, recorded with the operator's name. The agent has no session
    // here, so after the dispatch window it is offline and the run is finished.
    for body in [
        r#"{"test": "gateway"}"#,
        r#"{"select": {}, "agents": ["branch-042"], "test": "gateway"}"#,
        r#"{"agents": ["branch-042"], "kind": "tcp"}"#,
        r#"{"agents": ["branch-042"], "test": "no-such-test"}"#,
        r#"{"select": {"site": "tokyo"}, "test": "gateway"}"#,
        r#"{"agents": ["branch-042"], "kind": "tcp", "target": "127.0.0.1:9", "options": {"streams": 4}}"#,
    ] {
        let a = curl(&c, Some(&alice), "POST", "/api/v1/runs", Some(body));
        assert_eq!(a.status, Some(422), "{body}: {}", a.body);
        assert!(a.json()["error"].is_string());
    }
    assert_eq!(db.scalar("SELECT count(*) FROM runs"), 0);
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/runs",
        Some(r#"{"agents": ["branch-042", "ghost"], "kind": "tcp", "target": "127.0.0.1:9"}"#),
    );
    assert_eq!(a.status, Some(202), "{}", a.body);
    let r = a.json();
    assert_eq!(r["agents"], json!(["branch-042"]), "{r}");
    assert_eq!(r["unknown"], json!(["ghost"]), "{r}");
    let run_id = r["run_id"].as_i64().unwrap();
    assert_eq!(r["status"], format!("/api/v1/runs/{run_id}"), "{r}");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM runs WHERE run_id = {run_id} AND created_by = 'alice'"
        )),
        1
    );
    let status = wait_for(Duration::from_secs(15), "the run to finish", || {
        let a = curl(
            &c,
            Some(&alice),
            "GET",
            &format!("/api/v1/runs/{run_id}"),
            None,
        );
        assert_eq!(a.status, Some(200), "{}", a.body);
        let s = a.json();
        (s["finished"] == true).then_some(s)
    });
    assert_eq!(
        status["summary"]["offline"],
        json!(["branch-042"]),
        "{status}"
    );
    assert_eq!(status["results"], json!([]), "{status}");
    let a = curl(&c, Some(&alice), "GET", "/api/v1/runs/4711", None);
    assert_eq!(a.status, Some(404), "{}", a.body);
}

/// A real agent over mTLS with the label site = `site`, started.
pub(crate) fn site_agent(dir: &Path, pki: &Pki, id: &str, site: &str, c: &ApiCollector) -> Agent {
    let mut a = Agent::new_tls(
        dir,
        id,
        &format!("https://localhost:{}", c.grpc.port()),
        "",
        pki,
    );
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        text.replace("site = \"lab\"", &format!("site = \"{site}\"")),
    )
    .unwrap();
    a.start();
    a
}

#[test]
fn api_pushes_a_file_to_the_selected_agent_and_a_run_now_returns_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let target = HttpTarget::start("ok");
    let _berlin = site_agent(dir.path(), &pki, "berlin-1", "berlin", &c);
    let _paris = site_agent(dir.path(), &pki, "paris-1", "paris", &c);
    wait_for(
        Duration::from_secs(30),
        "both agents known with their features",
        || {
            (db.scalar("SELECT count(*) FROM agents WHERE 'run-now' = ANY(features)") == 2)
                .then_some(())
        },
    );

    // A fleet test for Berlin, every 2 s. Both agents apply version 1 (Paris's is empty);
    // only berlin-1 runs the test (a pushed `every` test first runs at a random point of
    // its first interval).
    let file = format!(
        "[[test]]\nname = \"portal\"\nkind = \"http\"\ntarget = \"{}\"\nevery = \"2s\"\nselect = {{ site = \"berlin\" }}\n",
        target.url()
    );
    let a = curl(&c, Some(&alice), "POST", "/api/v1/tests", Some(&file));
    assert_eq!(a.status, Some(201), "{}", a.body);
    let listing = wait_for(
        Duration::from_secs(20),
        "both agents to apply version 1",
        || {
            let l = curl(&c, Some(&alice), "GET", "/api/v1/tests", None).json();
            (l["applied"] == 2 && l["behind"] == 0).then_some(l)
        },
    );
    assert_eq!(listing["tests"][0]["agents_selected"], 1, "{listing}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE fleet_version = 1"),
        2
    );
    wait_for(
        Duration::from_secs(20),
        "berlin-1's scheduled run of the fleet test",
        || {
            (db.scalar("SELECT count(*) FROM results WHERE test = 'portal' AND agent_id = 'berlin-1' AND NOT on_demand") >= 1).then_some(())
        },
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE test = 'portal' AND agent_id = 'paris-1'"),
        0
    );

    // Run the fleet test now in Berlin: one on-demand result, from berlin-1.
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/runs",
        Some(r#"{"select": {"site": "berlin"}, "test": "portal"}"#),
    );
    assert_eq!(a.status, Some(202), "{}", a.body);
    let run_id = a.json()["run_id"].as_i64().unwrap();
    let status = wait_for(Duration::from_secs(20), "the run's result", || {
        let s = curl(
            &c,
            Some(&alice),
            "GET",
            &format!("/api/v1/runs/{run_id}"),
            None,
        )
        .json();
        (s["finished"] == true).then_some(s)
    });
    assert_eq!(status["summary"]["done"], json!(["berlin-1"]), "{status}");
    let results = status["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{status}");
    assert_eq!(results[0]["agent_id"], "berlin-1", "{status}");
    assert_eq!(results[0]["success"], true, "{status}");
    assert_eq!(results[0]["status_code"], 200, "{status}");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM results WHERE run_id = {run_id} AND on_demand AND agent_id = 'berlin-1'"
        )),
        1
    );
}

/// The PEM certificate the API serves now (curl's `%{certs}`), as one line of base64.
fn served_cert(c: &ApiCollector, alice: &(PathBuf, PathBuf)) -> String {
    let out = Command::new("curl")
        .args(["--silent", "--max-time", "10", "--output", "/dev/null"])
        .arg("--cacert")
        .arg(&c.pki_ca)
        .arg("--cert")
        .arg(&alice.0)
        .arg("--key")
        .arg(&alice.1)
        .args(["--write-out", "%{certs}"])
        .arg(format!("https://localhost:{}/api/v1/tests", c.api.port()))
        .output()
        .unwrap();
    pem_body(&String::from_utf8_lossy(&out.stdout))
}

/// The base64 of the first PEM certificate in `text`, without line breaks.
fn pem_body(text: &str) -> String {
    text.split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END CERTIFICATE-----").next())
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

#[test]
fn api_serves_a_renewed_certificate_after_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let (cert, _) = pki.server();
    let first = pem_body(&std::fs::read_to_string(&cert).unwrap());
    assert_eq!(served_cert(&c, &alice), first);

    pki.issue(&[
        "--name",
        "localhost",
        "--server",
        "--san",
        "127.0.0.1",
        "--force",
    ]);
    let renewed = pem_body(&std::fs::read_to_string(&cert).unwrap());
    assert_ne!(renewed, first);
    c.proc.signal("HUP");
    wait_for(
        Duration::from_secs(10),
        "the renewed certificate on the api",
        || (served_cert(&c, &alice) == renewed).then_some(()),
    );
    let a = curl(&c, Some(&alice), "GET", "/api/v1/tests/versions", None);
    assert_eq!(a.status, Some(200), "{}", a.body);
}
