//! Compiles `understudy/v1/*.proto` with protox (pure Rust), so no system
//! `protoc` is needed, then generates prost messages (and tonic stubs when the
//! `grpc` feature is on).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["understudy/v1/reports.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .compile_fds(descriptors)?;
    Ok(())
}
