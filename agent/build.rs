//! Link option of the agent binary (docs/BENCHMARKS.md "Agent footprint"): relative
//! relocations packed as DT_RELR (glibc 2.36+) instead of 50,000 RELA entries of 24 bytes,
//! which the dynamic loader reads at every start and which stay resident.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
