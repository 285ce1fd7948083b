//! Compiles `proto/` into Rust with the pure-Rust `protox` compiler (no system `protoc`)
//! and writes the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_set = protox::compile(["featurestore/v1/featurestore.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("featurestore_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptor_set),
    )?;
    // Requests that do not decode are the caller's fault: see `src/codec.rs`.
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptor_set)?;
    Ok(())
}
