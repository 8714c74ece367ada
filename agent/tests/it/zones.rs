//! Issue 14 case 5: IPv6 link-local targets with a zone, for every kind and for dns
//! `server` and resolv.conf. Two namespaces of ours joined by a veth pair carrying only
//! link-local addresses (fe80::1 on `ephA`, fe80::2 on `ephB`); a small Python server on
//! fe80::2 answers HTTP (with the Host it got) on 8080 and DNS on 53.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::util::{cannot_run, class, f64_of, probe_in, sh, Proc};

const SERVER: &str = r#"
import socket, threading
idx = socket.if_nametoindex('ephB')
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(('fe80::2', 8080, 0, idx)); t.listen(16)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.bind(('fe80::2', 53, 0, idx))
def dns():
    while True:
        q, peer = u.recvfrom(2048)
        i = 12
        while q[i] != 0:
            i += q[i] + 1
        # NOERROR, the question echoed, no records.
        u.sendto(q[:2] + b'\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00' + q[12:i + 5], peer)
threading.Thread(target=dns, daemon=True).start()
print('ready', flush=True)
while True:
    c, _ = t.accept()
    c.settimeout(2)
    data = b''
    try:
        while b'\r\n\r\n' not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    host = ''
    for line in data.decode('latin1').split('\r\n'):
        if line.lower().startswith('host:'):
            host = line[5:].strip()
    body = ('zone ok host=' + host).encode()
    try:
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
    except OSError:
        pass
    c.close()
"#;

/// The client and server namespaces and the client's resolv.conf, removed when dropped.
struct Link {
    client: String,
    server: String,
}

impl Link {
    fn create() -> Option<Link> {
        let id = std::process::id();
        let link = Link {
            client: format!("eph{id}c"),
            server: format!("eph{id}s"),
        };
        for ns in [&link.client, &link.server] {
            let out = Command::new("ip")
                .args(["netns", "add", ns])
                .output()
                .expect("cannot run `ip` (iproute2)");
            if !out.status.success() {
                cannot_run(&format!(
                    "`ip netns add` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return None;
            }
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        let (c, s) = (link.client.as_str(), link.server.as_str());
        sh(
            "ip",
            &[
                "link", "add", "ephA", "netns", c, "type", "veth", "peer", "name", "ephB", "netns",
                s,
            ],
        );
        for (ns, dev, addr) in [(c, "ephA", "fe80::1/64"), (s, "ephB", "fe80::2/64")] {
            sh("ip", &["-n", ns, "addr", "add", addr, "dev", dev, "nodad"]);
            sh("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        // `ip netns exec` mounts this over /etc/resolv.conf for the client.
        let dir = format!("/etc/netns/{c}");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/resolv.conf"), "nameserver fe80::2%ephA\n").unwrap();
        Some(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.client));
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn link_local_targets_with_zones_for_every_kind() {
    let Some(link) = Link::create() else {
        return;
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", &link.server, "python3", "-c", SERVER])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().unwrap();
    let _server = Proc(child);
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let client = Some(link.client.as_str());
    // A veth that has just come up can drop the first packets (the first SYN, retried
    // after 1 s, would show in connect_seconds): wait until the link carries a ping.
    let up = (0..50).any(|_| {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &link.client,
                "ping",
                "-c1",
                "-W1",
                "fe80::2%ephA",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        ok
    });
    assert!(up, "the veth pair never carried a ping");

    let (v, code) = probe_in(client, "tcp", "[fe80::2%ephA]:8080", &[]);
    assert_eq!(code, 0, "tcp with a zone: {v}");
    assert!(f64_of(&v, "connect_seconds") < 1.0);

    let (v, code) = probe_in(client, "tcp", "[fe80::2]:8080", &[]);
    assert_eq!((code, class(&v)), (1, "local"), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("%interface"), "{message}");

    // RFC 6874 form; the zone stays here, the Host header gets the address alone.
    let (v, code) = probe_in(
        client,
        "http",
        "http://[fe80::2%25ephA]:8080/",
        &["--body-match", "zone ok host=[fe80::2]:8080"],
    );
    assert_eq!(code, 0, "http with a zone: {v}");
    assert_eq!(v["status_code"], 200);

    // speed against our target in the server's namespace, through the same zoned URL.
    let mut target = Command::new("ip")
        .args(["netns", "exec", &link.server])
        .arg(crate::util::BIN)
        .args(["serve-target", "--listen", "[::]:8090"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve-target");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (v, code) = probe_in(
        client,
        "speed",
        "http://[fe80::2%25ephA]:8090",
        &["--duration", "1s"],
    );
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(code, 0, "speed with a zone: {v}");
    assert!(f64_of(&v, "download_bits_per_second") > 1e6, "{v}");

    let (v, code) = probe_in(
        client,
        "icmp",
        "fe80::2%ephA",
        &["--count", "2", "--interval", "200ms"],
    );
    assert_eq!(code, 0, "icmp with a zone: {v}");
    assert_eq!(v["received"], 2);

    for server in ["[fe80::2%ephA]:53", "fe80::2%ephA"] {
        let (v, code) = probe_in(
            client,
            "dns",
            "zone.test",
            &["--server", server, "--record-type", "TXT"],
        );
        assert_eq!(
            (code, v["rcode"].as_str()),
            (0, Some("NOERROR")),
            "{server}: {v}"
        );
    }
    // No server: TXT goes to resolv.conf's `nameserver fe80::2%ephA`.
    let (v, code) = probe_in(client, "dns", "zone.test", &["--record-type", "TXT"]);
    assert_eq!(
        (code, v["rcode"].as_str()),
        (0, Some("NOERROR")),
        "resolv.conf: {v}"
    );
}
