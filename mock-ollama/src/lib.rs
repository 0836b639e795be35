//! `mock-ollama`: a fast, faithful stand-in for `ollama serve`.
//!
//! A crate of its own in the workspace (the `mock-ollama` executable, built by the root package,
//! only calls [`main`]); it does not use the `ollama_sidecar` library. The project's integration
//! tests, the demo configuration (supervised exactly like `ollama serve`) and the
//! benchmarks run it. Behaviour follows Ollama 0.33's routes, shapes, scheduler limits
//! (`OLLAMA_NUM_PARALLEL`, `OLLAMA_MAX_QUEUE`), keep-alive, CORS and Host checks; knobs
//! add delays and faults. `mock-ollama --help` lists them; `/mock/*` controls it at run time.

// Handlers return early with a ready `Response` as the error side of `Result`; those paths
// are cold, so boxing them would only add noise.
#![allow(clippy::result_large_err)]

mod bind;
mod cli;
mod control;
mod gojson;
mod gourl;
mod http;
mod infer;
mod native;
mod openai;
mod router;
mod state;
mod stream;
mod util;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::cli::{Args, Config};
use crate::state::State;

/// The whole program: parses the command line and serves until SIGTERM or SIGINT.
pub fn main() -> ExitCode {
    let cfg = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(cfg))
}

/// Go's wording for the common bind errors.
fn bind_error_text(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        AddrInUse => "address already in use".into(),
        AddrNotAvailable => "cannot assign requested address".into(),
        PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// A slog-style line like Ollama's own log.
fn log_line(msg: &str) {
    eprintln!(
        "time={} level=INFO source=routes.go:1 msg=\"{}\"",
        util::rfc3339(SystemTime::now()),
        msg.replace('"', "\\\"")
    );
}

async fn run(cfg: Config) -> ExitCode {
    if let Some(ms) = cfg.exit_after_ms {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("mock-ollama: exiting with code 1 after {ms} ms (--exit-after-ms)");
            std::process::exit(1);
        });
    }
    if let Some(ms) = cfg.start_delay_ms.filter(|ms| *ms > 0) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let Some((listener, addr)) = listen(&cfg).await else {
        return ExitCode::from(1);
    };
    let state = Arc::new(State::new(cfg, addr));
    log_line(&format!(
        "Listening on {addr} (version {})",
        crate::cli::VERSION
    ));

    use tokio::signal::unix::{signal, SignalKind};
    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("Error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => serve(&builder, sock, &state),
                Err(e) => {
                    // EMFILE and friends: back off a little, keep serving.
                    if state.cfg.log {
                        eprintln!("mock-ollama: accept: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Like Ollama's srvr.Close(): stop accepting and end; open connections are cut.
    drop(listener);
    ExitCode::SUCCESS
}

/// Bind the configured address; on failure print `ollama serve`'s error (None).
async fn listen(cfg: &Config) -> Option<(TcpListener, SocketAddr)> {
    let display = if cfg.bind_host.contains(':') {
        format!("[{}]:{}", cfg.bind_host, cfg.bind_port)
    } else {
        format!("{}:{}", cfg.bind_host, cfg.bind_port)
    };
    let listener = match TcpListener::bind((cfg.bind_host.as_str(), cfg.bind_port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: listen tcp {display}: bind: {}", bind_error_text(&e));
            return None;
        }
    };
    match listener.local_addr() {
        Ok(addr) => Some((listener, addr)),
        Err(e) => {
            eprintln!("Error: {e}");
            None
        }
    }
}

/// Serve one accepted connection on its own task.
fn serve(builder: &http1::Builder, sock: TcpStream, state: &Arc<State>) {
    let _ = sock.set_nodelay(true);
    let log = state.cfg.log;
    let state = state.clone();
    let conn = builder.serve_connection(
        TokioIo::new(sock),
        service_fn(move |req| http::handle(state.clone(), req)),
    );
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            if log {
                eprintln!("mock-ollama: connection: {e}");
            }
        }
    });
}
