//! The agent's footprint (docs/BENCHMARKS.md "Agent footprint"): a running agent holds
//! none of its relocation table's whole pages, which the loader read once before `main`.
//! The table's place comes from `readelf` (binutils), not from the agent's own parser.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::BIN;

/// `.rela.dyn`'s address and size in the agent binary, by `readelf -SW`.
fn rela_dyn() -> (u64, u64) {
    let out = Command::new("readelf")
        .args(["-SW", BIN])
        .output()
        .expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(" .rela.dyn "))
        .unwrap_or_else(|| panic!("no .rela.dyn in {BIN}:\n{text}"));
    // [Nr] Name Type Address Off Size ...
    let fields: Vec<&str> = line
        .split(']')
        .nth(1)
        .expect("section line")
        .split_whitespace()
        .collect();
    let hex = |s: &str| u64::from_str_radix(s, 16).expect("hex");
    (hex(fields[2]), hex(fields[4]))
}

/// Of the pages wholly inside [start, end) of process `pid`, those present (pagemap bit 63).
fn present_pages(pid: u32, start: u64, end: u64) -> (u64, u64) {
    let page = 4096;
    let (first, last) = (start.div_ceil(page), end / page);
    let mut map = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("pagemap");
    let mut buf = vec![0u8; ((last - first) * 8) as usize];
    use std::io::{Seek, SeekFrom};
    map.seek(SeekFrom::Start(first * 8)).unwrap();
    map.read_exact(&mut buf).unwrap();
    let present = buf
        .chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
        .count() as u64;
    (present, last - first)
}

/// The address of the `PT_LOAD` at file offset 0, page-aligned, by `readelf -lW`.
fn first_load_vaddr() -> u64 {
    let out = Command::new("readelf")
        .args(["-lW", BIN])
        .output()
        .expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"LOAD") && f.get(1) == Some(&"0x000000"))
        .map(|f| u64::from_str_radix(f[2].trim_start_matches("0x"), 16).expect("hex") & !0xfff)
        .unwrap_or_else(|| panic!("no LOAD at offset 0 in {BIN}:\n{text}"))
}

#[test]
fn a_running_agent_holds_no_page_of_its_relocation_table() {
    let sections = Command::new("readelf")
        .args(["-SW", BIN])
        .output()
        .expect("readelf (binutils)");
    if String::from_utf8_lossy(&sections.stdout).contains(".relr.dyn") {
        eprintln!("built with packed relocations (EDGEPROBE_PACK_RELOCS=1): nothing to release");
        return;
    }
    let (addr, size) = rela_dyn();
    assert!(size > 64 * 4096, "a relocation table of {size} bytes");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"footprint\"\nstate_dir = \"{}\"\n[collector]\nendpoints = [\"http://127.0.0.1:9\"]\ninsecure = true\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the agent");
    let pid = child.id();
    // The agent is up once its buffer exists (it opens it after the release).
    let start = Instant::now();
    while !dir.path().join("state").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let base = maps
        .lines()
        .find(|l| l.ends_with(&*exe.to_string_lossy()) && l.split(' ').nth(2) == Some("00000000"))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .unwrap_or_else(|| panic!("the agent's mapping at offset 0 in:\n{maps}"));
    // The table's place in the running agent: the load bias plus its address, inside the
    // mapping that starts at offset 0 (else pagemap would say "absent" of anything).
    let (start, end) = (
        base - first_load_vaddr() + addr,
        base - first_load_vaddr() + addr + size,
    );
    let mapping_end = maps
        .lines()
        .filter_map(|l| {
            let mut range = l.split(' ').next()?.split('-');
            let from = u64::from_str_radix(range.next()?, 16).ok()?;
            Some((from, u64::from_str_radix(range.next()?, 16).ok()?))
        })
        .find_map(|(from, to)| (from == base).then_some(to))
        .expect("the offset-0 mapping's end");
    assert!(
        end <= mapping_end,
        "the table {start:x}-{end:x} lies past {mapping_end:x}"
    );
    let (present, pages) = present_pages(pid, start, end);
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("relocation table: {size} bytes, {present} of its {pages} whole pages resident");
    assert_eq!(
        present, 0,
        "{present} of the {pages} whole pages of .rela.dyn are resident"
    );
}
