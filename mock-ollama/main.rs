//! The `mock-ollama` executable: all of it is the `mock_ollama` library (this directory's
//! crate). This file belongs to the root package (../Cargo.toml, [[bin]] mock-ollama) so that the
//! sidecar's integration tests can run the binary (CARGO_BIN_EXE_mock-ollama).

fn main() -> std::process::ExitCode {
    mock_ollama::main()
}
