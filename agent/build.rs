//! Link option of the agent binary (docs/BENCHMARKS.md "Agent footprint"), opt-in: with
//! `EDGEPROBE_PACK_RELOCS=1` at build time the relative relocations are packed as DT_RELR
//! instead of about 50,000 RELA entries of 24 bytes, which the dynamic loader reads at every
//! start and which stay resident (1.2 MB of binary and of RSS). Such a binary needs glibc
//! 2.36 or later (GLIBC_ABI_DT_RELR: Debian 12, Ubuntu 24.04, RHEL 10), so the packages are
//! built without it and keep running on RHEL 9 and Ubuntu 22.04 (glibc 2.34, 2.35).
fn main() {
    println!("cargo:rerun-if-env-changed=EDGEPROBE_PACK_RELOCS");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let wanted = std::env::var("EDGEPROBE_PACK_RELOCS").is_ok_and(|v| v == "1");
    if wanted && os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
