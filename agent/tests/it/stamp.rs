//! STAMP (RFC 8762) on a real link: two network namespaces joined by a veth (10.77.0.1 the
//! sender, 10.77.0.2 the reflector); loss injected in one direction with iptables
//! `statistic --mode random` on the receiving side's INPUT; delay with a tbf queue in one
//! direction. The Session-Reflector and Session-Sender written here follow the RFC's byte
//! offsets by hand and share no code with the agent's.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::util::{class, f64_of, heavy_lock, probe_in, sh, Netns, Target};

const REFLECTOR: &str = "10.77.0.2";

/// Runs `f` on a thread inside namespace `ns` (sockets it opens stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns moves only this thread, with a namespace descriptor we hold open.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the namespace")
}

/// NTP 64-bit timestamp (RFC 5905) of the wall clock now.
fn ntp_now() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    ((d.as_secs() + 2_208_988_800) << 32) | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// The kernel says its clock is synchronised (what ntpd leaves in adjtimex).
fn kernel_synced() -> bool {
    // SAFETY: read-only adjtimex (modes = 0) into a zeroed struct we own.
    unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
    }
}

/// A stateful Session-Reflector from RFC 8762 section 4.3.1, on `port` of the reflector's
/// namespace, until dropped. Its error estimate's S bit follows the kernel.
struct IndependentReflector {
    stop: Arc<AtomicBool>,
}

impl Drop for IndependentReflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn independent_reflector(ns: &Netns, port: u16) -> IndependentReflector {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let socket = in_netns(&ns.names[1], move || {
        UdpSocket::bind((REFLECTOR, port)).expect("bind the independent reflector")
    });
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut sessions: HashMap<SocketAddr, u32> = HashMap::new();
        let mut buf = [0u8; 2048];
        while !stopped.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let t2 = ntp_now();
            if n < 44 {
                continue;
            }
            let seq = sessions.entry(from).or_insert(0);
            let mut out = vec![0u8; n];
            out[0..4].copy_from_slice(&seq.to_be_bytes());
            *seq += 1;
            // Error estimate: S | Z=0 | scale 0 | multiplier 1.
            let s_bit: u16 = if kernel_synced() { 0x8000 } else { 0 };
            out[12..14].copy_from_slice(&(s_bit | 1).to_be_bytes());
            out[16..24].copy_from_slice(&t2.to_be_bytes());
            out[24..28].copy_from_slice(&buf[0..4]); // sender sequence number
            out[28..36].copy_from_slice(&buf[4..12]); // sender timestamp
            out[36..38].copy_from_slice(&buf[12..14]); // sender error estimate
            out[40] = 64; // TTL: not read here (no IP_RECVTTL), the veth keeps 64
            out[4..12].copy_from_slice(&ntp_now().to_be_bytes()); // T3
            let _ = socket.send_to(&out, from);
        }
    });
    IndependentReflector { stop }
}

/// Drops `probability` of the UDP packets entering namespace `i` that match `matching`
/// (e.g. `--dport 8620`).
fn drop_udp(ns: &Netns, i: usize, matching: &[&str], probability: &str) {
    let mut args = vec!["iptables", "-A", "INPUT", "-p", "udp"];
    args.extend_from_slice(matching);
    args.extend_from_slice(&[
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        probability,
        "-j",
        "DROP",
    ]);
    ns.exec(i, args[0], &args[1..]);
}

fn stamp(ns: &Netns, target: &str, args: &[&str]) -> Value {
    let (v, code) = probe_in(Some(&ns.names[0]), "stamp", target, args);
    assert_eq!(code, 0, "{v}");
    v
}

fn report(case: &str, v: &Value) {
    let ms = |k: &str| {
        v[k].as_f64()
            .map_or("null".into(), |x| format!("{:.3} ms", x * 1e3))
    };
    eprintln!(
        "{case}: sent {} received {} forward lost {} ({}) reverse lost {} ({}) dup {} reordered {} \
         rtt avg {} fwd avg {} rev avg {} jitter {} mos {}",
        v["sent"],
        v["received"],
        v["forward_lost"],
        v["forward_loss_ratio"],
        v["reverse_lost"],
        v["reverse_loss_ratio"],
        v["duplicates"],
        v["reordered"],
        ms("rtt_avg_seconds"),
        ms("forward_delay_avg_seconds"),
        ms("reverse_delay_avg_seconds"),
        ms("jitter_seconds"),
        v["mos"],
    );
}

#[test]
fn stamp_splits_loss_by_direction_against_an_independent_reflector() {
    let Some(ns) = Netns::pair(None) else { return };
    let _reflector = independent_reflector(&ns, 8620);
    let target = format!("{REFLECTOR}:8620");
    let args = ["--count", "1000", "--interval", "2ms"];

    // 3 % dropped on the way to the reflector.
    drop_udp(&ns, 1, &["--dport", "8620"], "0.03");
    let v = stamp(&ns, &target, &args);
    report("forward 3 %", &v);
    assert_eq!(v["sent"], 1000);
    let (fw, rv) = (
        f64_of(&v, "forward_loss_ratio"),
        f64_of(&v, "reverse_loss_ratio"),
    );
    assert!((fw - 0.03).abs() <= 0.015, "forward {fw}: {v}");
    assert!(rv <= 0.003, "reverse {rv}: {v}");
    let lost = v["forward_lost"].as_u64().unwrap() + v["reverse_lost"].as_u64().unwrap();
    assert_eq!(lost, 1000 - v["received"].as_u64().unwrap());
    assert!(f64_of(&v, "rtt_avg_seconds") > 0.0);
    assert!(f64_of(&v, "mos") < 4.4, "loss lowers the MOS: {v}");

    // And the other way round: 3 % dropped on the way back.
    ns.exec(1, "iptables", &["-F", "INPUT"]);
    drop_udp(&ns, 0, &["--sport", "8620"], "0.03");
    let v = stamp(&ns, &target, &args);
    report("reverse 3 %", &v);
    let (fw, rv) = (
        f64_of(&v, "forward_loss_ratio"),
        f64_of(&v, "reverse_loss_ratio"),
    );
    assert!((rv - 0.03).abs() <= 0.015, "reverse {rv}: {v}");
    // Only a lost tail (the last reflections) could be taken for forward loss.
    assert!(fw <= 0.003, "forward {fw}: {v}");
}

#[test]
fn stamp_without_a_reflector_is_refused_and_a_silent_one_is_loss() {
    let Some(ns) = Netns::pair(None) else { return };
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "stamp",
        REFLECTOR,
        &["--count", "5", "--interval", "10ms"],
    );
    assert_eq!((code, class(&v)), (1, "refused"), "{v}");
    ns.exec(1, "iptables", &["-A", "INPUT", "-p", "udp", "-j", "DROP"]);
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "stamp",
        REFLECTOR,
        &["--count", "5", "--interval", "10ms"],
    );
    assert_eq!((code, class(&v)), (1, "loss"), "{v}");
    assert_eq!(v["received"], 0);
    assert!(v["rtt_avg_seconds"].is_null() && v["mos"].is_null(), "{v}");
}

/// `serve-target` in the reflector's namespace with its STAMP reflector on 10.77.0.2:862.
fn our_reflector(ns: &Netns, extra: &[&str]) -> Target {
    let mut args = vec!["--stamp-listen", "10.77.0.2:862"];
    args.extend_from_slice(extra);
    Target::start_with(Some(&ns.names[1]), "10.77.0.2:8080", 4, &args)
}

#[test]
fn our_reflector_answers_an_independent_sender_per_rfc_8762() {
    let Some(ns) = Netns::pair(None) else { return };
    let _target = our_reflector(&ns, &[]);
    drop_udp(&ns, 1, &["--dport", "862"], "0.03");
    let sockets: Vec<UdpSocket> = in_netns(&ns.names[0], || {
        (0..2)
            .map(|_| UdpSocket::bind("10.77.0.1:0").unwrap())
            .collect()
    });
    let mut forward_ratio = 0.0;
    for (session, socket) in sockets.iter().enumerate() {
        socket.connect((REFLECTOR, 862)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let sent = 600u32;
        let mut reflector_seqs = Vec::new();
        let mut buf = [0u8; 2048];
        for seq in 0..sent {
            // Every third packet padded to 100 bytes: the reflection must be as long.
            let len = if seq % 3 == 0 { 100 } else { 44 };
            let mut p = vec![0u8; len];
            p[0..4].copy_from_slice(&seq.to_be_bytes());
            let t1 = ntp_now();
            p[4..12].copy_from_slice(&t1.to_be_bytes());
            p[12..14].copy_from_slice(&0x0001u16.to_be_bytes());
            socket.send(&p).unwrap();
            let Ok(n) = socket.recv(&mut buf) else {
                continue; // lost on the way there
            };
            let t4 = ntp_now();
            let r = &buf[..n];
            assert_eq!(n, len, "reflected as long as sent");
            let u32_at = |i: usize| u32::from_be_bytes(r[i..i + 4].try_into().unwrap());
            let u64_at = |i: usize| u64::from_be_bytes(r[i..i + 8].try_into().unwrap());
            assert_eq!(u32_at(24), seq, "Session-Sender Sequence Number");
            assert_eq!(u64_at(28), t1, "Session-Sender Timestamp");
            assert_eq!(&r[36..38], &[0, 1], "Session-Sender Error Estimate");
            assert_eq!(r[40], 64, "Ses-Sender TTL: the veth does not decrement it");
            for mbz in [14..16, 38..40, 41..44, 44..n] {
                assert!(r[mbz.clone()].iter().all(|b| *b == 0), "MBZ {mbz:?}");
            }
            let (t2, t3) = (u64_at(16), u64_at(4));
            assert!(
                t1 <= t2 && t2 <= t3 && t3 <= t4,
                "one clock: T1 <= T2 <= T3 <= T4"
            );
            let estimate = u16::from_be_bytes([r[12], r[13]]);
            assert_ne!(estimate & 0xff, 0, "the multiplier is never 0");
            assert_eq!(estimate & 0x4000, 0, "Z = 0: NTP timestamps");
            reflector_seqs.push(u32_at(0));
        }
        assert!(reflector_seqs.windows(2).all(|w| w[0] < w[1]), "increasing");
        // Its own session: a fresh one numbers from 0 (unless the very first was lost).
        assert!(reflector_seqs[0] <= 2, "{:?}", &reflector_seqs[..5]);
        let reached = u64::from(*reflector_seqs.last().unwrap()) + 1;
        forward_ratio = 1.0 - reached as f64 / f64::from(sent);
        eprintln!(
            "our reflector, session {session}: {sent} sent, {} reflected, {reached} reached it: \
             forward loss {forward_ratio:.4}",
            reflector_seqs.len()
        );
        // Every reflected packet reached it; here loss is forward only.
        assert!((forward_ratio - 0.03).abs() <= 0.02, "{forward_ratio}");
        assert_eq!(reached as usize, reflector_seqs.len());
    }
    assert!(forward_ratio > 0.0);
    // Packets shorter than RFC 8762's 44 bytes are not answered.
    let socket = &sockets[0];
    socket.send(&[0u8; 43]).unwrap();
    assert!(
        socket.recv(&mut [0u8; 64]).is_err(),
        "a 43-byte packet is dropped"
    );
}

/// Sets the kernel's clock status as ntpd does (adjtimex ADJ_STATUS | ADJ_MAXERROR |
/// ADJ_ESTERROR) and restores the previous status when dropped.
struct KernelSync {
    status: i32,
    maxerror: libc::c_long,
    esterror: libc::c_long,
}

impl KernelSync {
    fn set(synced: bool) -> KernelSync {
        // SAFETY: adjtimex with a zeroed struct we own: first read (modes 0), then write
        // the three fields named in `modes`.
        unsafe {
            let mut tx: libc::timex = std::mem::zeroed();
            assert!(libc::adjtimex(&mut tx) >= 0);
            let old = KernelSync {
                status: tx.status,
                maxerror: tx.maxerror,
                esterror: tx.esterror,
            };
            let mut set: libc::timex = std::mem::zeroed();
            set.modes = libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
            set.status = if synced {
                tx.status & !libc::STA_UNSYNC
            } else {
                tx.status | libc::STA_UNSYNC
            };
            set.maxerror = if synced { 1000 } else { 16_000_000 };
            set.esterror = if synced { 100 } else { 16_000_000 };
            let rc = libc::adjtimex(&mut set);
            assert!(rc >= 0, "adjtimex: {}", std::io::Error::last_os_error());
            old
        }
    }
}

impl Drop for KernelSync {
    fn drop(&mut self) {
        // SAFETY: as in `set`.
        unsafe {
            let mut set: libc::timex = std::mem::zeroed();
            set.modes = libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
            set.status = self.status;
            set.maxerror = self.maxerror;
            set.esterror = self.esterror;
            libc::adjtimex(&mut set);
        }
    }
}

/// Every case that changes or depends on the kernel's (machine-wide) clock status is in
/// this one function, which nextest runs alone with the clock tests (test group
/// `kernel-clock` in .config/nextest.toml).
#[test]
fn stamp_one_way_delay_follows_the_kernel_clock_status() {
    let _heavy = heavy_lock();
    let Some(ns) = Netns::pair(None) else { return };
    let _target = our_reflector(&ns, &[]);
    let args = ["--count", "100", "--interval", "10ms"];

    // Unsynchronised: the round trip is measured, one-way delays are null.
    {
        let _unsync = KernelSync::set(false);
        assert!(!kernel_synced());
        let v = stamp(&ns, REFLECTOR, &args);
        report("unsynchronised", &v);
        assert!(f64_of(&v, "rtt_avg_seconds") > 0.0, "{v}");
        for dir in ["forward", "reverse"] {
            for stat in ["min", "avg", "max"] {
                let key = format!("{dir}_delay_{stat}_seconds");
                assert!(v[&key].is_null(), "{key} without a synchronised clock: {v}");
            }
        }
    }

    // Synchronised (both ends share this kernel's clock): a tbf queue on the way out,
    // filled by an iperf3 upload, raises the forward delay and not the reverse.
    let _sync = KernelSync::set(true);
    assert!(kernel_synced());
    let idle = stamp(&ns, REFLECTOR, &args);
    report("synchronised, idle", &idle);
    let idle_fw = f64_of(&idle, "forward_delay_avg_seconds");
    let idle_rv = f64_of(&idle, "reverse_delay_avg_seconds");
    assert!((0.0..0.005).contains(&idle_fw), "{idle}");
    assert!((0.0..0.005).contains(&idle_rv), "{idle}");

    sh(
        "tc",
        &[
            "-n",
            &ns.names[0],
            "qdisc",
            "add",
            "dev",
            "veth-a",
            "root",
            "tbf",
            "rate",
            "10mbit",
            "burst",
            "16kb",
            "latency",
            "80ms",
        ],
    );
    let _iperf = ns.spawn(1, "iperf3", &["-s", "-B", REFLECTOR]);
    std::thread::sleep(Duration::from_millis(300));
    // Reno fills the queue as real senders do; the default bbr keeps it short, and the
    // forward delay then rose to only about 8 ms under CI's load.
    let _load = ns.spawn(0, "iperf3", &["-c", REFLECTOR, "-t", "8", "-C", "reno"]);
    std::thread::sleep(Duration::from_secs(2));
    let loaded = stamp(&ns, REFLECTOR, &args);
    report("synchronised, forward queue", &loaded);
    let fw = f64_of(&loaded, "forward_delay_avg_seconds");
    let rv = f64_of(&loaded, "reverse_delay_avg_seconds");
    assert!(
        fw > 0.008 && fw > 10.0 * idle_fw,
        "the queue delays the forward direction: {loaded}"
    );
    assert!(rv < 0.005 && rv < fw / 5.0, "not the reverse: {loaded}");
    assert!(f64_of(&loaded, "mos") <= f64_of(&idle, "mos"), "{loaded}");
}

#[test]
fn speed_reports_loaded_loss_per_direction_only_with_a_reflector() {
    let _heavy = heavy_lock();
    let Some(ns) = Netns::pair(None) else { return };
    let target = our_reflector(&ns, &[]);
    // STAMP only: 10 % lost on the way to the target, 20 % on the way back. The stream runs
    // after the 2 s warm-up: 6 s of 50 packets/s per direction.
    drop_udp(&ns, 1, &["--dport", "862"], "0.10");
    drop_udp(&ns, 0, &["--sport", "862"], "0.20");
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "speed",
        &target.url(),
        &["--duration", "8s", "--streams", "2"],
    );
    assert_eq!(code, 0, "{v}");
    let down = f64_of(&v, "download_loaded_loss_ratio");
    let up = f64_of(&v, "upload_loaded_loss_ratio");
    eprintln!(
        "speed with a reflector: download loaded loss {down:.4} (20 % dropped back), \
         upload loaded loss {up:.4} (10 % dropped out)"
    );
    assert!(
        (down - 0.20).abs() <= 0.10,
        "download: reverse loss {down}: {v}"
    );
    assert!((up - 0.10).abs() <= 0.08, "upload: forward loss {up}: {v}");

    // A stock LibreSpeed backend in the same namespace, no reflector: both null.
    drop(target);
    let addr = in_netns(&ns.names[1], || {
        crate::speed::stock_librespeed_on("10.77.0.2:0").0
    });
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "speed",
        &format!("http://{addr}/"),
        &["--duration", "1s", "--streams", "2"],
    );
    assert_eq!(code, 0, "{v}");
    eprintln!(
        "speed against stock LibreSpeed: download loaded loss {}, upload loaded loss {}",
        v["download_loaded_loss_ratio"], v["upload_loaded_loss_ratio"]
    );
    assert!(v["download_loaded_loss_ratio"].is_null(), "{v}");
    assert!(v["upload_loaded_loss_ratio"].is_null(), "{v}");
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

#[test]
fn our_reflector_under_a_flood_stays_bounded() {
    let _heavy = heavy_lock();
    let Some(ns) = Netns::pair(None) else { return };
    let target = our_reflector(&ns, &["--stamp-rate", "1000", "--stamp-burst", "100"]);
    let pid = target.proc.0.id();
    let socket = in_netns(&ns.names[0], || UdpSocket::bind("10.77.0.1:0").unwrap());
    socket.connect((REFLECTOR, 862)).unwrap();
    socket.set_nonblocking(true).unwrap();
    let socket = Arc::new(socket);
    let done = Arc::new(AtomicBool::new(false));
    let (back, back_bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counter = {
        let (socket, done, back, back_bytes) = (
            socket.clone(),
            done.clone(),
            back.clone(),
            back_bytes.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut last = Instant::now();
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        back.fetch_add(1, Ordering::Relaxed);
                        back_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        last = Instant::now();
                    }
                    Err(_) => {
                        if done.load(Ordering::Relaxed)
                            && last.elapsed() > Duration::from_millis(500)
                        {
                            break;
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        })
    };
    let flood = Duration::from_secs(3);
    let rate = 100_000.0;
    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    // Two threads (one core cannot push 100,000 packets/s through a veth here), one socket:
    // one address, one session.
    let senders: Vec<_> = (0..2u64)
        .map(|k| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                // Packets due (pacing) and packets the kernel took, with their bytes.
                let (mut attempted, mut sent, mut bytes) = (0u64, 0u64, 0u64);
                while start.elapsed() < flood {
                    // Paced to half the rate: what is due in batches of 64 (sendmmsg).
                    let due = (start.elapsed().as_secs_f64() * rate / 2.0) as u64;
                    while attempted < due && start.elapsed() < flood {
                        let n = (due - attempted).min(64) as usize;
                        let (packets, b) = send_batch(&socket, attempted * 2 + k, n);
                        attempted += n as u64;
                        sent += packets as u64;
                        bytes += b;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                (attempted, sent, bytes)
            })
        })
        .collect();
    let (mut attempted, mut sent, mut sent_bytes) = (0u64, 0u64, 0u64);
    for sender in senders {
        let (a, s, b) = sender.join().unwrap();
        attempted += a;
        sent += s;
        sent_bytes += b;
    }
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    let cpu = cpu_seconds(pid) - cpu_before;
    let (back, back_bytes) = (
        back.load(Ordering::Relaxed),
        back_bytes.load(Ordering::Relaxed),
    );
    eprintln!(
        "flood: {attempted} packets offered, {sent} taken by the kernel ({sent_bytes} bytes) in \
         {elapsed:.2} s ({:.0}/s offered, {:.0}/s sent); reflected {back} ({back_bytes} bytes); \
         reflector CPU {cpu:.2} s ({:.2} core-s per s)",
        attempted as f64 / elapsed,
        sent as f64 / elapsed,
        cpu / elapsed
    );
    assert!(sent as f64 / elapsed > 50_000.0, "the flood was a flood");
    // Bound: well under one core for a 100,000 packets/s flood.
    assert!(cpu / elapsed < 1.0, "CPU {cpu} s in {elapsed} s");
    // The rate limit: 1000/s plus the burst (and a little for the drain after the flood).
    let allowed = 1000.0 * (elapsed + 0.6) + 100.0;
    assert!((back as f64) <= allowed, "reflected {back} > {allowed}");
    assert!(back >= 1000, "still reflecting at its rate: {back}");
    assert!(back_bytes <= sent_bytes, "no amplification");
    assert!(
        back_bytes <= back * 64,
        "no reflection longer than its packet"
    );
}

#[test]
fn stamp_over_ipv6_with_dscp_and_padding() {
    let port = UdpSocket::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stamp_listen = format!("[::1]:{port}");
    let _target = Target::start_with(None, "[::1]:0", 4, &["--stamp-listen", &stamp_listen]);
    let (v, code) = crate::util::probe(
        "stamp",
        &stamp_listen,
        &[
            "--count",
            "50",
            "--interval",
            "5ms",
            "--dscp",
            "46",
            "--packet-size",
            "200",
        ],
    );
    report("IPv6 loopback, EF, 200 bytes", &v);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        (v["sent"].as_u64(), v["received"].as_u64()),
        (Some(50), Some(50))
    );
    assert_eq!(f64_of(&v, "forward_loss_ratio"), 0.0);
    assert!(f64_of(&v, "rtt_max_seconds") < 0.05, "{v}");
    // A run cut off by its limit keeps what it measured.
    let (v, code) = crate::util::probe(
        "stamp",
        &stamp_listen,
        &["--count", "1000", "--interval", "5ms", "--timeout", "1s"],
    );
    assert_eq!((code, class(&v)), (1, "timeout"), "{v}");
    let sent = v["sent"].as_u64().unwrap();
    assert!((100..1000).contains(&sent), "{v}");
    assert!(v["received"].as_u64().unwrap() > 50, "{v}");
    assert!(f64_of(&v, "rtt_avg_seconds") > 0.0, "{v}");
    // An explicit --stamp-listen that cannot be bound is an error, not a warning.
    let out = std::process::Command::new(crate::util::BIN)
        .args([
            "serve-target",
            "--listen",
            "127.0.0.1:0",
            "--stamp-listen",
            "192.0.2.1:862",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reflect STAMP on UDP 192.0.2.1:862"),
        "{stderr}"
    );
}

/// Sends `n` packets (44 or 64 bytes, alternately, numbered from `first`) in one
/// sendmmsg; returns how many the kernel took and their bytes.
fn send_batch(socket: &UdpSocket, first: u64, n: usize) -> (usize, u64) {
    let mut packets = vec![[0u8; 64]; n];
    let lens: Vec<usize> = (0..n as u64)
        .map(|i| {
            if (first + i).is_multiple_of(2) {
                44
            } else {
                64
            }
        })
        .collect();
    for (i, p) in packets.iter_mut().enumerate() {
        p[0..4].copy_from_slice(&((first + i as u64) as u32).to_be_bytes());
    }
    let mut iovs: Vec<libc::iovec> = packets
        .iter_mut()
        .zip(&lens)
        .map(|(p, len)| libc::iovec {
            iov_base: p.as_mut_ptr().cast(),
            iov_len: *len,
        })
        .collect();
    // SAFETY: mmsghdr is a plain C struct (all zeroes valid); each points to one iovec
    // that, with its packet, outlives the call; the socket is connected (no name).
    let sent = unsafe {
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = std::mem::zeroed();
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as u32,
            libc::MSG_DONTWAIT,
        )
    };
    let sent = usize::try_from(sent).unwrap_or(0);
    (sent, lens[..sent].iter().map(|l| *l as u64).sum())
}

/// The reflection carries the TTL (hop limit) the sender's packet arrived with: 64 sent,
/// four routers on the way, 60 at the reflector; IPv4 and IPv6 on one dual-stack socket.
#[test]
fn our_reflector_returns_the_ttl_the_packet_arrived_with() {
    use crate::chain::{Chain, DEST, ROUTERS, SOURCE};
    let Some(chain) = Chain::build() else { return };
    let _target = Target::start_with(
        Some(chain.name(DEST)),
        &format!("{}:8080", chain.dest(false)),
        4,
        &["--stamp-listen", "[::]:862"],
    );
    for ipv6 in [false, true] {
        let dest: std::net::IpAddr = chain.dest(ipv6).parse().unwrap();
        let socket = in_netns(chain.name(SOURCE), move || {
            let s = UdpSocket::bind(if ipv6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
            s.connect((dest, 862)).unwrap();
            s
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut p = [0u8; 44];
        p[3] = 1;
        let mut got = None;
        let mut buf = [0u8; 128];
        for _ in 0..10 {
            socket.send(&p).unwrap();
            if let Ok(n) = socket.recv(&mut buf) {
                got = Some(n);
                break;
            }
        }
        let n = got.expect("a reflection through the chain");
        assert_eq!(n, 44);
        let ttl = buf[40];
        eprintln!(
            "{}: Ses-Sender TTL {ttl} after {ROUTERS} routers",
            if ipv6 { "IPv6" } else { "IPv4" }
        );
        assert_eq!(ttl, 64 - ROUTERS as u8, "ipv6 {ipv6}");
    }
}

/// The default STAMP address that cannot be bound is a warning (the target serves HTTP
/// without it); `--stamp-listen off` binds nothing.
#[test]
fn a_taken_default_stamp_port_is_a_warning_and_off_is_off() {
    let Some(ns) = Netns::pair(None) else { return };
    let first = our_reflector(&ns, &[]);
    // Default 10.77.0.2:862 is taken by `first`: this one still starts.
    let second = Target::start_with(Some(&ns.names[1]), "10.77.0.2:8081", 4, &[]);
    let off = Target::start_with(
        Some(&ns.names[1]),
        "10.77.0.2:8082",
        4,
        &["--stamp-listen", "off"],
    );
    let v = stamp(&ns, REFLECTOR, &["--count", "5", "--interval", "10ms"]);
    assert_eq!(v["received"], 5, "{v}");
    drop(first);
    // Neither of the others reflects.
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "stamp",
        REFLECTOR,
        &["--count", "5", "--interval", "10ms"],
    );
    assert_eq!((code, class(&v)), (1, "refused"), "{v}");
    // Both still serve HTTP.
    for t in [&second, &off] {
        let (v, code) = probe_in(Some(&ns.names[0]), "tcp", &t.addr.to_string(), &[]);
        assert_eq!(code, 0, "{v}");
    }
}

/// `--dscp 46` marks every test packet EF, as the reflector's side sees it (an iptables
/// `dscp` match counts them).
#[test]
fn stamp_marks_its_packets_with_the_dscp_asked_for() {
    let Some(ns) = Netns::pair(None) else { return };
    let _reflector = independent_reflector(&ns, 8621);
    for rule in [
        ["-m", "dscp", "--dscp", "46"],
        ["-m", "dscp", "--dscp", "0"],
    ] {
        let mut args = vec!["-A", "INPUT", "-p", "udp", "--dport", "8621"];
        args.extend_from_slice(&rule);
        args.extend_from_slice(&["-j", "ACCEPT"]);
        ns.exec(1, "iptables", &args);
    }
    let counts = || -> Vec<u64> {
        ns.exec(1, "iptables", &["-L", "INPUT", "-v", "-n", "-x"])
            .lines()
            .filter(|l| l.contains("dpt:8621"))
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };
    let target = format!("{REFLECTOR}:8621");
    let v = stamp(
        &ns,
        &target,
        &["--count", "20", "--interval", "5ms", "--dscp", "46"],
    );
    assert_eq!(v["received"], 20, "{v}");
    assert_eq!(counts(), vec![20, 0], "EF, then best effort");
    let v = stamp(&ns, &target, &["--count", "10", "--interval", "5ms"]);
    assert_eq!(v["received"], 10, "{v}");
    assert_eq!(counts(), vec![20, 10]);
}
