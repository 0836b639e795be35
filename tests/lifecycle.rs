//! Supervised instances and in-flight streams: a crash mid-stream ends the client's stream
//! cleanly, and a SIGTERM lets streams in flight finish before the instances are stopped.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn supervised(port: u16, env: &[(&str, &str)]) -> String {
    let mut s = format!(
        "  - name: sup\n    command: {MOCK}\n    port: {port}\n    num_parallel: 2\n    restart:\n      initial_backoff: 100ms\n      max_backoff: 500ms\n"
    );
    if !env.is_empty() {
        s.push_str("    env:\n");
        for (k, v) in env {
            s.push_str(&format!("      {k}: \"{v}\"\n"));
        }
    }
    s
}

fn start_stream(port: u16) -> BufReader<TcpStream> {
    post_raw(
        port,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"tell me a long story"}"#,
        "",
    )
}

fn ready(sidecar: &Sidecar) -> bool {
    client()
        .get(sidecar.url("/api/version"))
        .send()
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

#[test]
fn kill_9_mid_stream_ends_the_stream_cleanly_and_the_instance_comes_back() {
    let port = free_port();
    let sidecar = Sidecar::start(&format!(
        "instances:\n{}",
        supervised(
            port,
            &[("MOCK_TOKENS", "200"), ("MOCK_TOKEN_DELAY_MS", "20")]
        )
    ));
    assert!(wait_until(Duration::from_secs(10), || ready(&sidecar)));
    let pid = mock_pid_on(port) as i32;
    let mut stream = start_stream(sidecar.port);
    let mut first = String::new();
    for _ in 0..20 {
        first.clear();
        stream.read_line(&mut first).unwrap();
        if first.trim_start().starts_with('{') {
            break;
        }
    }
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let killed = Instant::now();
    let (objects, ended) = read_json_lines(&mut stream, Duration::from_secs(5));
    assert!(ended, "the client's stream ended instead of hanging");
    assert!(killed.elapsed() < Duration::from_secs(3));
    let last = objects
        .last()
        .expect("an in-band error line ends the stream");
    assert!(last["error"].is_string(), "last line: {last}");
    assert!(
        objects.iter().all(|o| o["done"] != true),
        "no fake completion"
    );
    // Back and serving within the backoff (100 ms, then the mock starts in milliseconds).
    assert!(
        wait_until(Duration::from_secs(5), || ready(&sidecar)
            && client()
                .post(sidecar.url("/api/generate"))
                .body(r#"{"model":"llama3.2","prompt":"x","stream":false}"#)
                .send()
                .map(|r| r.status() == 200)
                .unwrap_or(false)),
        "the instance did not come back: {}",
        sidecar.log_text()
    );
}

#[test]
fn sigterm_lets_a_stream_in_flight_finish_then_leaves_no_child() {
    let port = free_port();
    let mut sidecar = Sidecar::start(&format!(
        "shutdown:\n  drain_timeout: 10s\ninstances:\n{}",
        supervised(
            port,
            &[("MOCK_TOKENS", "30"), ("MOCK_TOKEN_DELAY_MS", "30")]
        )
    ));
    assert!(wait_until(Duration::from_secs(10), || ready(&sidecar)));
    let pid = mock_pid_on(port);
    let mut stream = start_stream(sidecar.port);
    let mut line = String::new();
    stream.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    sidecar.proc.signal(libc::SIGTERM);
    // New requests are refused while the stream drains.
    std::thread::sleep(Duration::from_millis(100));
    let r = client().get(sidecar.url("/api/tags")).send();
    if let Ok(r) = r {
        assert_eq!(r.status(), 503, "refused while draining");
        assert!(r.headers().contains_key("retry-after"));
    }
    let (objects, ended) = read_json_lines(&mut stream, Duration::from_secs(8));
    assert!(ended);
    assert_eq!(
        objects.last().map(|o| o["done"].clone()),
        Some(Value::Bool(true)),
        "the stream in flight finished: {objects:?}"
    );
    let status = sidecar.proc.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        sidecar.log_text()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the instance process {pid} is gone (not even a zombie)"
    );
}

#[test]
fn warmup_models_are_loaded_before_the_instance_takes_traffic() {
    let port = free_port();
    let sidecar = Sidecar::start(&format!(
        "instances:\n{}    warmup: [\"qwen2.5:0.5b\"]\n    keep_alive: 30m\n",
        supervised(port, &[("MOCK_LOAD_DELAY_MS", "300")])
    ));
    assert!(wait_until(Duration::from_secs(10), || ready(&sidecar)));
    let stats = client()
        .get(format!("http://127.0.0.1:{port}/mock/stats"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    let loaded = stats["loaded"].to_string();
    assert!(
        loaded.contains("qwen2.5:0.5b"),
        "loaded at first ready: {loaded}"
    );
    assert!(
        sidecar.log_text().contains("warming"),
        "{}",
        sidecar.log_text()
    );
}
