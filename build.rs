//! Compiles `protos/` with protox (a pure-Rust protobuf compiler), so a
//! fresh machine builds with `cargo build` alone and needs no system `protoc`.
//!
//! The castore BlobService exists under two package names with the same wire
//! format: `snix.castore.v1` and the older `tvix.castore.v1`. The snix file is
//! the single source; the tvix variant is derived from it by renaming the
//! package, and its messages are mapped onto the snix Rust types so one
//! server implementation serves both.

use std::path::PathBuf;

const SNIX_PROTO: &str = "protos/snix/castore/v1/rpc_blobstore.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={SNIX_PROTO}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    // Derive the tvix flavour of the protocol from the snix source.
    let tvix_root = out.join("tvix-protos");
    let tvix_dir = tvix_root.join("tvix/castore/v1");
    std::fs::create_dir_all(&tvix_dir)?;
    let snix_src = std::fs::read_to_string(SNIX_PROTO)?;
    let tvix_src = snix_src.replace("package snix.castore.v1;", "package tvix.castore.v1;");
    if tvix_src == snix_src {
        return Err("the snix proto no longer declares `package snix.castore.v1;`".into());
    }
    std::fs::write(tvix_dir.join("rpc_blobstore.proto"), tvix_src)?;

    let fds = protox::compile(
        [
            "snix/castore/v1/rpc_blobstore.proto",
            "tvix/castore/v1/rpc_blobstore.proto",
        ],
        [PathBuf::from("protos"), tvix_root],
    )?;

    tonic_prost_build::configure()
        // Blob payloads travel as `Bytes`, so they move between the wire and
        // the tiers without copies.
        .bytes(".")
        // One set of message types for both packages.
        .extern_path(".tvix.castore.v1", "crate::proto::snix")
        .compile_fds(fds)?;
    Ok(())
}
