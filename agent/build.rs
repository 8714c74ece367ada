//! Link options of the agent binary (docs/BENCHMARKS.md "Agent footprint").
//!
//! - **Symbols** are stripped by the linker here (`--strip-all`), not by the profile, so a
//!   build with `EDGEPROBE_KEEP_SYMBOLS=1` differs from the shipped one only in its symbol
//!   table: the same crate metadata, the same symbol names. `scripts/agent-link-order`
//!   needs those names.
//! - **Function order**: the release binary of x86_64-unknown-linux-gnu, which rustc 1.90
//!   and later links with its own LLD, places the functions listed in `link-order.txt` (the ones the agent
//!   runs, found by `scripts/agent-link-order` under callgrind) first in `.text`, in that
//!   order. Spread over 6 MB of text, the 2-3 MB the agent runs made the kernel map nearly
//!   all of it (each fault maps the 64 KiB around it from the page cache, fault-around);
//!   packed together they are what is mapped. A name the build no longer has (a renamed
//!   function, a new compiler) is skipped without a warning: the order only gets worse,
//!   never wrong, and the benchmark shows it.
//! - **Packed relocations**, opt-in: with `EDGEPROBE_PACK_RELOCS=1` the relative
//!   relocations are packed as DT_RELR instead of about 50,000 RELA entries of 24 bytes,
//!   which the dynamic loader reads at every start and which stay resident (1.2 MB of
//!   binary and of RSS). Such a binary needs glibc 2.36 or later (GLIBC_ABI_DT_RELR: Debian
//!   12, Ubuntu 24.04, RHEL 10), so the packages are built without it and keep running on
//!   RHEL 9 and Ubuntu 22.04 (glibc 2.34, 2.35).
fn main() {
    println!("cargo:rerun-if-env-changed=EDGEPROBE_PACK_RELOCS");
    println!("cargo:rerun-if-env-changed=EDGEPROBE_KEEP_SYMBOLS");
    println!("cargo:rerun-if-changed=link-order.txt");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let linux_gnu = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let release = var("PROFILE") == "release";
    if release && var("EDGEPROBE_KEEP_SYMBOLS") != "1" {
        println!("cargo:rustc-link-arg-bins=-Wl,--strip-all");
    }
    if release && var("TARGET") == "x86_64-unknown-linux-gnu" && rustc_links_with_lld(&var("RUSTC"))
    {
        let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link-order.txt");
        if order.exists() {
            println!(
                "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                order.display()
            );
            println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
    }
    if var("EDGEPROBE_PACK_RELOCS") == "1" && linux_gnu {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// rustc links x86_64-unknown-linux-gnu with its own LLD from 1.90 on; before, with the
/// system's linker (GNU ld), which has no `--symbol-ordering-file`.
fn rustc_links_with_lld(rustc: &str) -> bool {
    let Ok(out) = std::process::Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
