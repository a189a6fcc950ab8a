//! Generates the gRPC code from `proto/meridian/v1/meridian.proto` with protox,
//! a pure-Rust protobuf compiler, so no system `protoc` is ever needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/meridian/v1/meridian.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".meridian.v1")
        // Prost with small first buffers: see `src/codec.rs`.
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
