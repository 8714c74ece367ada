//! Helpers for the agent's integration tests: run the real binary, a real target server,
//! real network namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgeprobe-agent");

/// Runs `edgeprobe-agent probe KIND TARGET --json ARGS...` (optionally inside a network
/// namespace) and returns its JSON object and exit code.
pub fn probe_in(netns: Option<&str>, kind: &str, target: &str, args: &[&str]) -> (Value, i32) {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    command.args(["probe", kind, target, "--json"]).args(args);
    let output = command.output().expect("run edgeprobe-agent probe");
    parse_probe(kind, target, &output)
}

pub fn probe(kind: &str, target: &str, args: &[&str]) -> (Value, i32) {
    probe_in(None, kind, target, args)
}

pub fn parse_probe(kind: &str, target: &str, output: &Output) -> (Value, i32) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "probe {kind} {target}: stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let code = output.status.code().unwrap_or(-1);
    assert_eq!(value["kind"], kind);
    assert_eq!(
        value["success"].as_bool(),
        Some(code == 0),
        "exit code follows success: {value}"
    );
    (value, code)
}

/// The error class of a probe result, or "" on success.
pub fn class(value: &Value) -> &str {
    value["error"]["class"].as_str().unwrap_or("")
}

pub fn f64_of(value: &Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {value}"))
}

/// A child process killed (by its pid) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `edgeprobe-agent serve-target` as a child process.
pub struct Target {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Target {
    pub fn start(listen: &str, max_tests: usize) -> Target {
        Self::start_in(None, listen, max_tests)
    }

    pub fn start_in(netns: Option<&str>, listen: &str, max_tests: usize) -> Target {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = command
            .args(["serve-target", "--listen", listen, "--max-tests"])
            .arg(max_tests.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve-target");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log for the listening address, then keeps draining it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listen=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let proc = Proc(child);
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("serve-target logs its listening address at info");
        Target {
            addr: addr.parse().expect("listen= carries an address"),
            proc,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A raw HTTP/1.1 exchange with `Connection: close`; returns status, lowercased head and
/// body.
pub fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a head");
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head[9..12].parse().expect("status code");
    (status, head, response[split + 4..].to_vec())
}

/// Serialises the tests that load both cores (loopback throughput, the shaped-link
/// comparison) so they do not skew each other: holding a fixed local port is the lock,
/// and the kernel releases it whatever happens to the holder.
pub fn heavy_lock() -> TcpListener {
    let start = Instant::now();
    loop {
        if let Ok(l) = TcpListener::bind("127.0.0.1:47931") {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "heavy-test lock not released"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command, panicking with its output on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().expect(program);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A test that needs network namespaces (root) cannot run here. It fails: a test that
/// passes without running proves nothing. Outside CI (`CI` is not `true`) a developer may
/// set `EDGEPROBE_ALLOW_SKIP=1` to skip it instead, with a `SKIPPED` line.
pub fn cannot_run(why: &str) {
    let allowed = std::env::var("EDGEPROBE_ALLOW_SKIP").as_deref() == Ok("1")
        && std::env::var("CI").as_deref() != Ok("true");
    assert!(
        allowed,
        "this test needs network namespaces (run it as root), but {why}; \
         EDGEPROBE_ALLOW_SKIP=1 skips it on a machine without them"
    );
    eprintln!("SKIPPED: {why}");
}

/// Network namespaces deleted when dropped (which also removes their veths).
pub struct Netns {
    pub names: Vec<String>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates `n` namespaces with unique names, loopback up; `None` only where
    /// [`cannot_run`] allows a skip.
    pub fn create(n: usize) -> Option<Netns> {
        let skip = |why: String| cannot_run(&why);
        let mut ns = Netns { names: Vec::new() };
        for _ in 0..n {
            let name = format!(
                "ep{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let out = Command::new("ip").args(["netns", "add", &name]).output();
            match out {
                Ok(o) if o.status.success() => ns.names.push(name.clone()),
                Ok(o) => {
                    skip(format!(
                        "`ip netns add` failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                    return None;
                }
                Err(e) => {
                    skip(format!("cannot run `ip netns add`: {e}"));
                    return None;
                }
            }
            sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        }
        Some(ns)
    }

    /// Two namespaces joined by a veth pair: 10.77.0.1 (first) and 10.77.0.2 (second),
    /// each side shaped with `tbf` when `rate` is given (e.g. "100mbit").
    pub fn pair(rate: Option<&str>) -> Option<Netns> {
        let ns = Netns::create(2)?;
        let (a, b) = (&ns.names[0], &ns.names[1]);
        sh(
            "ip",
            &[
                "link", "add", "veth-a", "netns", a, "type", "veth", "peer", "name", "veth-b",
                "netns", b,
            ],
        );
        for (name, dev, addr) in [(a, "veth-a", "10.77.0.1/24"), (b, "veth-b", "10.77.0.2/24")] {
            sh("ip", &["-n", name, "addr", "add", addr, "dev", dev]);
            sh("ip", &["-n", name, "link", "set", dev, "up"]);
            if let Some(rate) = rate {
                sh(
                    "tc",
                    &[
                        "-n", name, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", "64kb", "latency", "20ms",
                    ],
                );
            }
        }
        Some(ns)
    }

    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.names[i], program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    pub fn spawn(&self, i: usize, program: &str, args: &[&str]) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.names[i], program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        Proc(child)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// iperf3's goodput in bits/s (`end.sum_received`), run as a client in the pair's first
/// namespace with `args`; retried while the server in the other one is still starting.
pub fn iperf3_goodput(ns: &Netns, args: &[&str]) -> f64 {
    for attempt in 0.. {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.names[0], "iperf3"])
            .args(args)
            .output()
            .expect("iperf3");
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J");
            return f64_of(&v["end"]["sum_received"], "bits_per_second");
        }
        assert!(
            attempt < 20,
            "iperf3 failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    unreachable!()
}
