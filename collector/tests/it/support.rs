//! Test support: a real PostgreSQL database per test, real collector and agent processes,
//! a real HTTP target. Nothing here is a mock.
//!
//! Database: `DATABASE_URL` when set (a server we may create databases on), else the local
//! server at 127.0.0.1:5432, else a throwaway cluster started with initdb/pg_ctl as the
//! `postgres` user in a temp dir (once per test process).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn collector_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgeprobe-collector"))
}

/// The newest modification time among the sources the agent binary is built from.
fn newest_agent_source() -> std::time::SystemTime {
    fn walk(path: &Path, newest: &mut std::time::SystemTime) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(modified) = meta.modified() {
            *newest = (*newest).max(modified);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for part in [
        "agent/src",
        "agent/Cargo.toml",
        "proto",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        walk(&root.join(part), &mut newest);
    }
    newest
}

/// The agent binary next to the collector's in the same target dir, built first when it is
/// missing or older than its sources (running only the collector's tests after changing
/// the agent must not test the old agent).
pub fn agent_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = collector_bin().with_file_name("edgeprobe-agent");
            let stale = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|built| built < newest_agent_source());
            if !path.exists() || stale {
                let target_dir = path.parent().and_then(Path::parent).expect("target dir");
                let status = Command::new(env!("CARGO"))
                    .args(["build", "-p", "edgeprobe-agent", "--target-dir"])
                    .arg(target_dir)
                    .status()
                    .expect("run cargo build");
                assert!(status.success(), "building edgeprobe-agent failed");
            }
            path
        })
        .clone()
}

/// `edgeprobe-collector migrate` on the test's database; panics with its stderr on failure.
pub fn migrate(db: &TestDb) {
    let (code, _, stderr) = collector_cmd(&["migrate", "--database-url", &db.url]);
    assert_eq!(code, Some(0), "migrate failed: {stderr}");
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `f` every 100 ms until it returns Some, or panics after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return url;
        }
        let local = "postgres://postgres@127.0.0.1:5432/postgres".to_string();
        if std::env::var_os("EDGEPROBE_TEST_THROWAWAY_PG").is_none()
            && postgres::Client::connect(&local, postgres::NoTls).is_ok()
        {
            return local;
        }
        // Kept for the whole test process; the OS reclaims it at the end of the run.
        let cluster = Box::leak(Box::new(PgCluster::start()));
        cluster.url("postgres")
    })
    .clone()
}

/// A private PostgreSQL cluster (initdb + pg_ctl as the `postgres` user, in a temp dir),
/// which a test can stop and start. Stopped and removed on drop.
pub struct PgCluster {
    dir: PathBuf,
    pub port: u16,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "edgeprobe-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        let cluster = PgCluster {
            dir,
            port: free_addr().port(),
        };
        let data = cluster.data();
        cluster.as_pg(&["initdb", "-D", &data, "-A", "trust", "-U", "postgres"]);
        cluster.resume();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn as_pg(&self, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin(args[0]))
            .args(&args[1..])
            .output()
            .expect("runuser (are the PostgreSQL server binaries installed?)");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (again) on the same port.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.as_pg(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &log,
            "-w",
            "start",
        ]);
    }

    /// Fast shutdown: connections are cut, as when the server goes away.
    pub fn pause(&self) {
        self.as_pg(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server program: on PATH, or in Debian's versioned directory.
fn pg_bin(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    if let Some(p) = on_path {
        return p;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found: install postgresql (scripts/setup does)"))
}

/// A fresh database, dropped at the end of the test.
pub struct TestDb {
    pub url: String,
    name: String,
    server: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        TestDb::on_server(&server_url())
    }

    /// A fresh database on the server of `server` (a URL ending in a database name).
    pub fn on_server(server: &str) -> TestDb {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "edgeprobe_it_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = postgres::Client::connect(server, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {server}: {e}"));
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = match server.rfind('/') {
            Some(i) => format!("{}/{name}", &server[..i]),
            None => panic!("DATABASE_URL must end in /dbname"),
        };
        TestDb {
            url,
            name,
            server: server.to_string(),
        }
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    /// One i64 from a query.
    pub fn scalar(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process killed when dropped; its stderr goes to a log file kept for failures.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("spawn");
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "process did not stop within 20s of SIGTERM; log: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A collector process with its config, ports and database.
pub struct Collector {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    config: PathBuf,
}

impl Collector {
    /// Starts an insecure (plaintext) collector and waits until it is ready.
    pub fn start(dir: &Path, db: &TestDb) -> Collector {
        Collector::start_at(dir, db, free_addr(), free_addr())
    }

    pub fn start_at(dir: &Path, db: &TestDb, grpc: SocketAddr, http: SocketAddr) -> Collector {
        Collector::start_url(dir, &db.url, grpc, http)
    }

    /// Starts an insecure collector on any database URL (e.g. several hosts).
    pub fn start_url(dir: &Path, url: &str, grpc: SocketAddr, http: SocketAddr) -> Collector {
        let config = dir.join("collector.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ninsecure = true\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[database]\nurl = \"{url}\"\n",
            ),
        )
        .unwrap();
        let mut c = Collector {
            proc: Collector::spawn(&config, dir),
            grpc,
            http,
            config,
        };
        c.wait_ready();
        c
    }

    fn spawn(config: &Path, dir: &Path) -> Proc {
        let mut cmd = Command::new(collector_bin());
        cmd.arg("run").arg("--config").arg(config);
        Proc::spawn(cmd, dir.join("collector.log"))
    }

    pub fn wait_ready(&mut self) {
        let http = self.http;
        let log = self.proc.log.clone();
        wait_for(Duration::from_secs(30), "collector /readyz", || {
            assert!(
                self.proc.is_running(),
                "collector exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            http_get(http, "/readyz").filter(|(s, _)| *s == 200)
        });
        // Ready means agents can connect: the gRPC port listens by then.
        if let Err(e) = std::net::TcpStream::connect(self.grpc) {
            panic!("/readyz said ready but gRPC {} refused: {e}", self.grpc);
        }
    }

    /// Starts it again on the same ports after a stop or kill.
    pub fn restart(&mut self, dir: &Path) {
        self.proc = Collector::spawn(&self.config, dir);
        self.wait_ready();
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

/// An agent: a config file and a state dir; started and stopped as a process.
pub struct Agent {
    pub config: PathBuf,
    pub proc: Option<Proc>,
}

impl Agent {
    /// Writes a config for agent `id` sending to `endpoint`, with `tests` (TOML `[[test]]`
    /// blocks) appended.
    pub fn new(dir: &Path, id: &str, endpoint: &str, tests: &str) -> Agent {
        let state = dir.join(format!("{id}-state"));
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[agent]\nid = \"{id}\"\nlabels = {{ site = \"lab\" }}\nstate_dir = \"{}\"\n\n[collector]\nendpoints = [\"{endpoint}\"]\ninsecure = true\nreconnect_spread = \"0s\"\n\n{tests}",
                state.display()
            ),
        )
        .unwrap();
        Agent { config, proc: None }
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run").arg("--config").arg(&self.config);
        let log = self.config.with_extension("log");
        self.proc = Some(Proc::spawn(cmd, log));
    }

    pub fn stop(&mut self) -> Option<i32> {
        self.proc.take().and_then(|mut p| p.stop())
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// `edgeprobe-agent buffer` parsed into name -> value (agent must be stopped).
    pub fn buffer_stats(&self) -> std::collections::HashMap<String, String> {
        let out = Command::new(agent_bin())
            .arg("buffer")
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buffer command failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(2, "  ");
                Some((
                    parts.next()?.trim().to_string(),
                    parts.next()?.trim().to_string(),
                ))
            })
            .collect()
    }

    /// The first number of a `buffer` stat, e.g. "backlog" -> 12.
    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.buffer_stats();
        stats
            .get(name)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric `{name}` in {stats:?}"))
    }

    /// The highest seq this agent has assigned (agent must be stopped).
    pub fn last_seq(&self) -> u64 {
        self.stat("next seq") - 1
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `agent` without tests until the collector has committed everything it recorded,
/// then stops it. Returns the last seq. The agent must be stopped on entry.
pub fn drain(agent: &mut Agent, db: &TestDb, id: &str) -> u64 {
    let last = agent.last_seq();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let without_tests = text.split("[[test]]").next().unwrap().to_string();
    let drain_config = agent.config.with_extension("drain.toml");
    std::fs::write(&drain_config, without_tests).unwrap();
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run").arg("--config").arg(&drain_config);
    let mut p = Proc::spawn(cmd, agent.config.with_extension("drain.log"));
    wait_for(Duration::from_secs(60), "the drain to finish", || {
        let committed: i64 = db
            .client()
            .query_opt(
                "SELECT committed_seq FROM agents WHERE agent_id = $1",
                &[&id],
            )
            .ok()
            .flatten()
            .map_or(0, |r| r.get(0));
        (committed as u64 >= last).then_some(())
    });
    // When everything had landed already, the check above passes before the drain agent is
    // even up; a SIGTERM before its handler exists kills it with no exit code. Wait for its
    // session (the welcome reconciles the buffer) first.
    wait_for(
        Duration::from_secs(30),
        "the drain agent to connect",
        || {
            p.log_text()
                .contains("connected to collector")
                .then_some(())
        },
    );
    // Give the final ack a moment to reach the agent before stopping it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        p.stop(),
        Some(0),
        "drain agent exit code; log: {}",
        p.log_text()
    );
    last
}

// ---------------------------------------------------------------------------------------
// HTTP

/// Minimal HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A real HTTP server on 127.0.0.1 answering every request with 200 and `body`.
pub struct HttpTarget {
    pub addr: SocketAddr,
}

impl HttpTarget {
    pub fn start(body: &'static str) -> HttpTarget {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let mut s = &stream;
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        HttpTarget { addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

/// An `[[test]]` block: an http test named `web` of `target` every `every`.
pub fn http_test(target: &str, every: &str) -> String {
    format!(
        "[[test]]\nname = \"web\"\nkind = \"http\"\ntarget = \"{target}\"\nevery = \"{every}\"\n"
    )
}

/// The value of one exact series line in a text exposition; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// rows == distinct seqs == max seq == `last`: every recorded result landed once.
pub fn assert_exactly_once(db: &TestDb, agent: &str, last: u64) {
    let (rows, max, distinct) = seq_summary(db, agent);
    assert_eq!(
        (rows, max, distinct),
        (last as i64, last as i64, last as i64),
        "agent {agent}"
    );
}

/// Row-count invariants of one agent: (rows, max seq, distinct seqs).
pub fn seq_summary(db: &TestDb, agent: &str) -> (i64, i64, i64) {
    let row = db
        .client()
        .query_one(
            "SELECT count(*), coalesce(max(seq), 0), count(DISTINCT seq) FROM results WHERE agent_id = $1",
            &[&agent],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

// ---------------------------------------------------------------------------------------
// TLS: a fleet PKI made with the collector's own `ca init` / `cert issue`, and mTLS
// variants of the collector and the agent.

impl Proc {
    /// Sends a signal by name (e.g. "HUP").
    pub fn signal(&self, name: &str) {
        let pid = self.pid();
        assert!(pid != 0, "process is running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }
}

/// Runs `edgeprobe-collector ARGS...`; returns (exit code, stdout, stderr).
pub fn collector_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(collector_bin()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CA in `dir/ca`, the collector's certificate for `localhost` + 127.0.0.1 in
/// `dir/certs`, and agent certificates issued on demand.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.join("pki"),
        };
        let ca = pki.ca_dir();
        let (code, _, err) = collector_cmd(&["ca", "init", "--dir", ca.to_str().unwrap()]);
        assert_eq!(code, Some(0), "ca init: {err}");
        pki.issue(&["--name", "localhost", "--server", "--san", "127.0.0.1"]);
        pki
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.ca_dir().join("ca.pem")
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `cert issue --ca <ca> --out <certs> ARGS...`, which must succeed.
    pub fn issue(&self, args: &[&str]) {
        let ca = self.ca_dir();
        let out = self.certs();
        let mut all = vec![
            "cert",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let (code, _, err) = collector_cmd(&all);
        assert_eq!(code, Some(0), "cert issue {args:?}: {err}");
    }

    /// (cert, key) of agent `id`, issued on first use.
    pub fn agent(&self, id: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.pair(id);
        if !cert.exists() {
            self.issue(&["--name", id]);
        }
        (cert, key)
    }

    pub fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.certs().join(format!("{name}.pem")),
            self.certs().join(format!("{name}.key")),
        )
    }

    /// The collector's (cert, key).
    pub fn server(&self) -> (PathBuf, PathBuf) {
        self.pair("localhost")
    }
}

impl Collector {
    /// Starts an mTLS collector (the default mode) and waits until it is ready; `env`
    /// is added to its environment.
    pub fn start_tls(dir: &Path, db: &TestDb, pki: &Pki, env: &[(&str, &str)]) -> Collector {
        let (grpc, http) = (free_addr(), free_addr());
        let (cert, key) = pki.server();
        let config = dir.join("collector.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\n[database]\nurl = \"{}\"\n",
                cert.display(),
                key.display(),
                pki.ca_pem().display(),
                db.url
            ),
        )
        .unwrap();
        let mut cmd = Command::new(collector_bin());
        cmd.arg("run").arg("--config").arg(&config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut c = Collector {
            proc: Proc::spawn(cmd, dir.join("collector.log")),
            grpc,
            http,
            config,
        };
        c.wait_ready();
        c
    }

    pub fn tls_endpoint(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// The value of one metric series, e.g. `edgeprobe_tls_handshake_errors_total{reason="timeout"}`; 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics(), series)
    }
}

impl Agent {
    /// Like `new`, but over mTLS with a certificate for `id` from `pki`.
    pub fn new_tls(dir: &Path, id: &str, endpoint: &str, tests: &str, pki: &Pki) -> Agent {
        let (cert, key) = pki.agent(id);
        let state = dir.join(format!("{id}-state"));
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[agent]\nid = \"{id}\"\nlabels = {{ site = \"lab\" }}\nstate_dir = \"{}\"\n\n[collector]\nendpoints = [\"{endpoint}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreconnect_spread = \"0s\"\n\n{tests}",
                state.display(),
                pki.ca_pem().display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        Agent { config, proc: None }
    }
}

// ---------------------------------------------------------------------------------------
// Hand-written wire messages for the tests that speak gRPC themselves.

use edgeprobe_proto::v1 as pb;

/// Unix nanoseconds now.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// An agent message holding `m`.
pub fn agent_msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// A valid http result of agent `id` with `seq`, started at `started_at_unix_nanos`.
pub fn http_result(id: &str, seq: u64, started_at_unix_nanos: i64) -> pb::Result {
    pb::Result {
        agent_id: id.to_string(),
        seq,
        test: "web".into(),
        kind: pb::Kind::Http as i32,
        target: "http://example.test/".into(),
        started_at_unix_nanos,
        duration_seconds: 0.05,
        success: true,
        fields: Some(pb::result::Fields::Http(pb::HttpFields {
            status_code: Some(200),
            ttfb_seconds: Some(0.01),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Rows in `results` of test `test` from agent `agent`.
pub fn results_of(db: &TestDb, agent: &str, test: &str) -> i64 {
    db.client()
        .query_one(
            "SELECT count(*) FROM results WHERE agent_id = $1 AND test = $2",
            &[&agent, &test],
        )
        .unwrap()
        .get(0)
}

/// An agent like `Agent::new` with `[agent] labels = { site = SITE }`, started.
pub fn agent_at_site(dir: &Path, id: &str, site: &str, endpoint: &str, tests: &str) -> Agent {
    let mut a = Agent::new(dir, id, endpoint, tests);
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        text.replace("site = \"lab\"", &format!("site = \"{site}\"")),
    )
    .unwrap();
    a.start();
    a
}

/// A PostgreSQL server program (`initdb`, `pg_ctl`, `pg_basebackup`...), as `PgCluster`
/// finds it.
pub fn pg_program(name: &str) -> PathBuf {
    pg_bin(name)
}

impl TestDb {
    /// An existing database at `url` (e.g. on a throwaway cluster), for the helpers that
    /// take a `TestDb`; dropping it tries to drop the database, which fails harmlessly
    /// while the helper's own connection is on it.
    pub fn existing(url: &str) -> TestDb {
        TestDb {
            url: url.to_string(),
            name: url.rsplit('/').next().unwrap_or_default().to_string(),
            server: url.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Path results and a simulated agent's stream (the collector half of issue 22).

/// A hop that answered from `address` ("" = nothing answered) with `loss` of 10 probes.
pub fn path_hop(ttl: u32, address: &str, loss: f64) -> pb::PathHop {
    let sent = 10;
    let received = if address.is_empty() {
        0
    } else {
        ((1.0 - loss) * f64::from(sent)).round() as u32
    };
    let rtt = (received > 0).then_some(0.001 * f64::from(ttl));
    pb::PathHop {
        ttl,
        address: address.to_string(),
        addresses: if address.is_empty() {
            vec![]
        } else {
            vec![address.to_string()]
        },
        sent,
        received,
        loss_ratio: Some(1.0 - f64::from(received) / f64::from(sent)),
        rtt_min_seconds: rtt.map(|r| r * 0.9),
        rtt_avg_seconds: rtt,
        rtt_max_seconds: rtt.map(|r| r * 1.3),
        rtt_mdev_seconds: rtt.map(|r| r * 0.1),
        rate_limited: false,
    }
}

/// The path id of `hops` as the agent makes it: a stable hash (FNV-1a, hex) of the
/// responding addresses by TTL.
pub fn path_id_of(hops: &[pb::PathHop]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for hop in hops {
        for b in format!("{}={};", hop.ttl, hop.address).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// A valid path result of agent `id`, test `path`, through `addresses` (one hop each, the
/// last one the destination, no loss), with `labels` site=lab.
pub fn path_result(
    id: &str,
    seq: u64,
    started_at_unix_nanos: i64,
    addresses: &[&str],
) -> pb::Result {
    let hops: Vec<pb::PathHop> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| path_hop(i as u32 + 1, a, 0.0))
        .collect();
    let destination = addresses.last().copied().unwrap_or("192.0.2.1");
    pb::Result {
        agent_id: id.to_string(),
        seq,
        test: "path".into(),
        kind: pb::Kind::Path as i32,
        target: destination
            .split('%')
            .next()
            .unwrap_or_default()
            .to_string(),
        started_at_unix_nanos,
        duration_seconds: 10.2,
        success: true,
        labels: [("site".to_string(), "lab".to_string())].into(),
        fields: Some(pb::result::Fields::Path(pb::PathFields {
            reached: true,
            hop_count: hops.len() as u32,
            path_id: path_id_of(&hops),
            path_loss_ratio: Some(0.0),
            rtt_avg_seconds: Some(0.001 * hops.len() as f64),
            protocol: "icmp".into(),
            hops,
        })),
        ..Default::default()
    }
}

/// The path fields of a path result, to change them.
pub fn path_fields(r: &mut pb::Result) -> &mut pb::PathFields {
    match &mut r.fields {
        Some(pb::result::Fields::Path(p)) => p,
        _ => panic!("not a path result"),
    }
}

/// One open Ingest stream of a simulated agent, past the welcome.
pub struct AgentStream {
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CollectorMessage>,
    pub welcome: pb::Welcome,
}

impl AgentStream {
    /// Says hello as `id` (incarnation `incarnation`, labels `site = SITE`), retrying
    /// while the collector still holds this agent's previous session.
    pub async fn open(endpoint: &str, id: &str, site: &str, incarnation: &str) -> AgentStream {
        let start = Instant::now();
        loop {
            let mut client = pb::ingest_client::IngestClient::connect(endpoint.to_string())
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            tx.send(agent_msg(pb::agent_message::Msg::Hello(pb::Hello {
                agent_id: id.to_string(),
                version: "test".into(),
                labels: [("site".to_string(), site.to_string())].into(),
                incarnation: incarnation.to_string(),
                ..Default::default()
            })))
            .await
            .unwrap();
            let opened = client
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            let mut inbound = match opened {
                Ok(s) => s.into_inner(),
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        && start.elapsed() < Duration::from_secs(20) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(s) => panic!("hello of {id} refused: {s:?}"),
            };
            match tokio::time::timeout(Duration::from_secs(20), inbound.message()).await {
                Ok(Ok(Some(pb::CollectorMessage {
                    msg: Some(pb::collector_message::Msg::Welcome(welcome)),
                }))) => {
                    return AgentStream {
                        tx,
                        inbound,
                        welcome,
                    }
                }
                Ok(Err(s))
                    if s.code() == tonic::Code::FailedPrecondition
                        && start.elapsed() < Duration::from_secs(20) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("expected a welcome for {id}, got {other:?}"),
            }
        }
    }

    /// Sends a batch and waits for the ack that covers its last seq.
    pub async fn batch(&mut self, results: Vec<pb::Result>) -> pb::Ack {
        let last = results.last().map_or(0, |r| r.seq);
        self.tx
            .send(agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch {
                results,
            })))
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.inbound.message()).await {
                Ok(Ok(Some(pb::CollectorMessage {
                    msg: Some(pb::collector_message::Msg::Ack(a)),
                }))) if a.seq >= last => return a,
                Ok(Ok(Some(_))) => {}
                other => panic!("expected the ack of {last}, got {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Responsiveness results (the collector half of issue 23).

/// A successful responsiveness result of agent `id`, test `rpm`, labels site=`site`, whose
/// overall RPM is `rpm` (rated as the agent rates it, loaded latency 60 / rpm).
pub fn responsiveness_result(
    id: &str,
    seq: u64,
    started_at_unix_nanos: i64,
    site: &str,
    rpm: f64,
) -> pb::Result {
    let rating = if rpm < 300.0 {
        "poor"
    } else if rpm < 1000.0 {
        "fair"
    } else if rpm < 6000.0 {
        "good"
    } else {
        "excellent"
    };
    pb::Result {
        agent_id: id.to_string(),
        seq,
        test: "rpm".into(),
        kind: pb::Kind::Responsiveness as i32,
        target: "https://nq.example.test/.well-known/nq".into(),
        started_at_unix_nanos,
        duration_seconds: 14.2,
        success: true,
        labels: [("site".to_string(), site.to_string())].into(),
        fields: Some(pb::result::Fields::Responsiveness(
            pb::ResponsivenessFields {
                responsiveness_rpm: Some(rpm),
                download_responsiveness_rpm: Some(rpm * 0.9),
                upload_responsiveness_rpm: Some(rpm * 1.1),
                download_bits_per_second: Some(19.2e6),
                upload_bits_per_second: Some(18.6e6),
                idle_latency_seconds: Some(0.0042),
                loaded_latency_seconds: Some(60.0 / rpm),
                load_connections: 6,
                stable: true,
                rating: rating.into(),
            },
        )),
        ..Default::default()
    }
}

/// The responsiveness fields of a responsiveness result, to change them.
pub fn responsiveness_fields(r: &mut pb::Result) -> &mut pb::ResponsivenessFields {
    match &mut r.fields {
        Some(pb::result::Fields::Responsiveness(f)) => f,
        _ => panic!("not a responsiveness result"),
    }
}
