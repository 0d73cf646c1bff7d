//! Compiles the `.proto` files with `protox` (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/buildlet.proto",
        "proto/coordinator.proto",
        "proto/revdial.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Bulk chunks are `bytes::Bytes`: decoding slices the received buffer instead of
    // copying every chunk into a fresh `Vec`, and senders hand over their buffers.
    tonic_prost_build::configure()
        .bytes(".buildfarm.buildlet.v1.DataChunk.data")
        .bytes(".buildfarm.buildlet.v1.PutTarRequest.data")
        .compile_fds(fds)?;
    Ok(())
}
