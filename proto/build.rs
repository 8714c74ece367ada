fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/edgeprobe/v1/edgeprobe.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/edgeprobe/v1/edgeprobe.proto"], &["proto"])?;
    Ok(())
}
