//! Generates the bakeoff.v1 code at build time (protoc from Debian's protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/bakeoff/v1/ingest.proto",
            "proto/bakeoff/v1/query.proto",
            "proto/bakeoff/v1/control.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
