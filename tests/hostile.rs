//! Hostile input through the real server: request-head limits (431, 414), bodies (413, 400, 408),
//! malformed HTTP, slow clients. Each refusal is written by the sidecar (in the route's error
//! shape when a hook ran) and never reaches an instance. Loops are bounded in count and time;
//! every socket and process is closed or killed by the end of its test.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Writes `request`, then reads until the connection closes or `limit` passes.
fn raw_exchange(port: u16, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(limit)).ok();
    s.set_write_timeout(Some(limit)).ok();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if response_complete(&out) {
                    break;
                }
            }
        }
    }
    out
}

/// A response whose head and `Content-Length` body are all there.
fn response_complete(data: &[u8]) -> bool {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(n) => data.len() >= end + 4 + n,
        None => false,
    }
}

fn status_of(resp: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn body_of(resp: &[u8]) -> &[u8] {
    match resp.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &resp[end + 4..],
        None => &[],
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Ollama,
    OpenAi,
    Anthropic,
    /// Pingora's own answer, before any hook: no JSON body.
    Bare,
}

fn check_shape(shape: Shape, body: &[u8], what: &str) {
    if shape == Shape::Bare {
        return;
    }
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(body)));
    match shape {
        Shape::Ollama => assert!(v["error"].is_string(), "{what}: {v}"),
        Shape::OpenAi => assert!(
            v["error"]["message"].is_string() && v["error"]["type"].is_string(),
            "{what}: {v}"
        ),
        Shape::Anthropic => assert!(
            v["type"] == "error" && v["error"]["message"].is_string(),
            "{what}: {v}"
        ),
        Shape::Bare => {}
    }
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn with_headers(path: &str, n: usize) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for i in 0..n {
        r.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}

fn sidecar_for(mock: &Mock, extra: &str) -> Sidecar {
    Sidecar::start(&format!(
        "limits:\n  max_body: 1MiB\n  body_read_timeout: 1s\n{extra}{}",
        external_instances(&[mock], 2)
    ))
}

#[test]
fn malformed_input_table() {
    let mock = Mock::start(&[]);
    let sc = sidecar_for(&mock, "");
    let before = client_requests(&mock);
    let deep = format!(
        "{{\"model\":\"m\",\"x\":{}1{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let big_header = format!(
        "GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(70 << 10)
    );
    let long_uri = |path: &str| {
        format!(
            "GET {path}?q={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "u".repeat(9 << 10)
        )
    };
    let declared_big = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{",
            2 << 20
        )
    };
    let cases: Vec<(&str, Vec<u8>, u16, Shape)> = vec![
        // Bodies on inference routes: 400 in the route's shape.
        ("truncated JSON", post("/api/chat", b"{"), 400, Shape::Ollama),
        ("not JSON", post("/api/generate", b"hello there"), 400, Shape::Ollama),
        ("model is a number", post("/api/chat", br#"{"model":5}"#), 400, Shape::Ollama),
        ("model is an object", post("/api/embed", br#"{"model":{"x":1}}"#), 400, Shape::Ollama),
        ("stream is a string", post("/api/chat", br#"{"model":"m","stream":"yes"}"#), 400, Shape::Ollama),
        ("an array body", post("/api/chat", b"[1,2]"), 400, Shape::Ollama),
        ("empty body", post("/api/chat", b""), 400, Shape::Ollama),
        ("whitespace body", post("/api/generate", b" \r\n\t "), 400, Shape::Ollama),
        ("invalid UTF-8 in a string", post("/api/chat", b"{\"model\":\"\xff\xfe\"}"), 400, Shape::Ollama),
        ("UTF-16 body", post("/api/chat", b"\xff\xfe{\x00\"\x00m\x00\"\x00}\x00"), 400, Shape::Ollama),
        ("UTF-8 BOM", post("/api/chat", b"\xef\xbb\xbf{\"model\":\"m\"}"), 400, Shape::Ollama),
        ("NUL byte", post("/api/chat", b"{\"model\":\"m\"\x00}"), 400, Shape::Ollama),
        ("trailing garbage", post("/api/chat", br#"{"model":"m"} {"model":"n"}"#), 400, Shape::Ollama),
        ("duplicate model field", post("/api/chat", br#"{"model":"a","model":"b"}"#), 400, Shape::Ollama),
        ("nesting 5000 deep", post("/api/chat", deep.as_bytes()), 400, Shape::Ollama),
        ("OpenAI: truncated JSON", post("/v1/chat/completions", b"{\"model\":"), 400, Shape::OpenAi),
        ("OpenAI: model is a bool", post("/v1/chat/completions", br#"{"model":true}"#), 400, Shape::OpenAi),
        ("OpenAI: stream is a number", post("/v1/completions", br#"{"model":"m","stream":1}"#), 400, Shape::OpenAi),
        ("OpenAI: a string body", post("/v1/embeddings", br#""text""#), 400, Shape::OpenAi),
        ("Anthropic: truncated JSON", post("/v1/messages", b"{"), 400, Shape::Anthropic),
        ("Responses: invalid UTF-8", post("/v1/responses", b"{\"model\":\"\xc3\x28\"}"), 400, Shape::OpenAi),
        // Sizes.
        ("declared body over max_body", declared_big("/api/chat").into_bytes(), 413, Shape::Ollama),
        ("OpenAI: declared body over max_body", declared_big("/v1/chat/completions").into_bytes(), 413, Shape::OpenAi),
        ("120 header fields", with_headers("/api/tags", 120), 431, Shape::Ollama),
        ("OpenAI: 120 header fields", with_headers("/v1/models", 120), 431, Shape::OpenAi),
        ("a 70 KiB header", big_header.into_bytes(), 431, Shape::Ollama),
        ("a 9 KiB request target", long_uri("/api/tags").into_bytes(), 414, Shape::Ollama),
        ("OpenAI: a 9 KiB request target", long_uri("/v1/models").into_bytes(), 414, Shape::OpenAi),
        ("Anthropic: a 9 KiB request target", long_uri("/v1/messages").into_bytes(), 414, Shape::Anthropic),
        // Malformed HTTP: Pingora refuses it before any hook.
        ("300 header fields", with_headers("/api/tags", 300), 400, Shape::Bare),
        ("not HTTP", b"GARBAGE\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("invalid method token", b"G(T /api/tags HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("header without a colon", b"GET /api/tags HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("space in a header name", b"GET /api/tags HTTP/1.1\r\nBad Header: x\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("Content-Length and Transfer-Encoding", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("two Content-Lengths", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{\"a\":1}".to_vec(), 400, Shape::Bare),
        ("Content-Length: abc", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}".to_vec(), 400, Shape::Bare),
        ("Transfer-Encoding: gzip", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}".to_vec(), 400, Shape::Bare),
        ("bad chunk size", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(), 400, Shape::Ollama),
        ("OpenAI: chunk size overflow", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n".to_vec(), 400, Shape::OpenAi),
        ("HTTP/2 preface without h2c", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("obsolete header folding", b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("NUL in a header value", b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("target without a leading slash", b"GET api/tags HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("non-ASCII path", b"GET /api/\xfftags HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("unknown HTTP version", b"GET /api/tags HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(), 400, Shape::Bare),
        ("CONNECT", b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_vec(), 405, Shape::Bare),
    ];
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (what, request, status, shape) in &cases {
        let resp = raw_exchange(sc.port, request, Duration::from_secs(5));
        let got = status_of(&resp);
        if got != *status {
            failures.push(format!(
                "{what}: expected {status}, got {got}: {}",
                String::from_utf8_lossy(&resp[..resp.len().min(300)])
            ));
            continue;
        }
        check_shape(*shape, body_of(&resp), what);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The sidecar is still fine, and the instance saw none of it.
    assert_eq!(
        client_requests(&mock),
        before,
        "a malformed request reached the instance"
    );
    let ok = client().get(sc.url("/api/tags")).send().expect("tags");
    assert_eq!(ok.status(), 200);
}

#[test]
fn head_limits_are_configurable() {
    let mock = Mock::start(&[]);
    let sc = sidecar_for(
        &mock,
        "  max_headers: 10\n  max_header_bytes: 2KiB\n  max_uri_bytes: 512\n",
    );
    let before = client_requests(&mock);
    let resp = raw_exchange(
        sc.port,
        &with_headers("/api/chat", 12),
        Duration::from_secs(5),
    );
    assert_eq!(status_of(&resp), 431);
    let big = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(3000)
    );
    let resp = raw_exchange(sc.port, big.as_bytes(), Duration::from_secs(5));
    assert_eq!(status_of(&resp), 431);
    check_shape(Shape::OpenAi, body_of(&resp), "431");
    let long = format!(
        "GET /api/tags?{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "q".repeat(600)
    );
    let resp = raw_exchange(sc.port, long.as_bytes(), Duration::from_secs(5));
    assert_eq!(status_of(&resp), 414);
    assert_eq!(client_requests(&mock), before);
    // Within the limits: served.
    let resp = raw_exchange(
        sc.port,
        &with_headers("/api/tags", 5),
        Duration::from_secs(5),
    );
    assert_eq!(status_of(&resp), 200);
}

fn admin_status(sc: &Sidecar) -> Value {
    client()
        .get(format!("http://127.0.0.1:{}/status", sc.admin_port))
        .send()
        .and_then(|r| r.json())
        .expect("status")
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

#[test]
fn slowloris_headers_hold_no_slot() {
    let mock = Mock::start(&[]);
    let sc = sidecar_for(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || port_open(
        sc.admin_port
    )));
    let request = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut tricklers: Vec<TcpStream> = (0..100)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(200))).ok();
            s.set_nodelay(true).ok();
            s
        })
        .collect();
    // One thread trickles a byte to every connection every 20 ms, for at most 8 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(8);
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && Instant::now() < deadline
                && sent < request.len()
            {
                for s in tricklers.iter_mut() {
                    let _ = s.write_all(&request[sent..sent + 1]);
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            // Hold the connections (headers never finished) until told to stop.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            tricklers.len()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let c = client();
    let mut latencies = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let resp = c
            .post(sc.url("/api/chat"))
            .body(format!(r#"{{"model":"llama3.2","messages":[{{"role":"user","content":"hi {i}"}}],"stream":false}}"#))
            .send()
            .expect("chat");
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes();
        latencies.push(t.elapsed());
    }
    let status = admin_status(&sc);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let held = trickler.join().expect("trickler");
    assert_eq!(held, 100);
    let p99 = percentile(latencies.clone(), 0.99);
    eprintln!(
        "slowloris: 100 trickling connections; 20 chats p50 {:?}, p99 {p99:?}",
        percentile(latencies.clone(), 0.5)
    );
    assert!(
        p99 < Duration::from_millis(200),
        "p99 {p99:?} of {latencies:?}"
    );
    assert_eq!(status["queue"]["held_slots"], 0, "{status}");
    assert_eq!(status["queue"]["queued"], 0, "{status}");
    assert_eq!(status["queue"]["counters"]["admitted"], 20, "{status}");
}

#[test]
fn trickled_bodies_are_cut_before_admission() {
    let mock = Mock::start(&[]);
    let sc = sidecar_for(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || port_open(
        sc.admin_port
    )));
    let before_mock = client_requests(&mock);
    let before = admin_status(&sc)["queue"]["counters"].clone();

    for (path, shape) in [
        ("/api/chat", Shape::Ollama),
        ("/v1/chat/completions", Shape::OpenAi),
        ("/v1/messages", Shape::Anthropic),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        );
        s.write_all(head.as_bytes()).expect("head");
        // A byte every 300 ms (under the 1 s timeout) for 1.5 s: still reading, no slot taken.
        let started = Instant::now();
        let mut last_write = Instant::now();
        for (i, b) in br#"{"model""#.iter().take(5).enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            s.write_all(&[*b]).expect("byte");
            last_write = Instant::now();
        }
        let status = admin_status(&sc);
        assert_eq!(status["queue"]["queued"], 0, "{status}");
        assert_eq!(status["queue"]["held_slots"], 0, "{status}");
        // Then silence: cut off after `limits.body_read_timeout`.
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let waited = last_write.elapsed();
        assert_eq!(
            status_of(&resp),
            408,
            "{path}: {}",
            String::from_utf8_lossy(&resp)
        );
        check_shape(shape, body_of(&resp), path);
        assert!(
            waited >= Duration::from_millis(950) && waited < Duration::from_secs(3),
            "{path}: cut after {waited:?} of silence ({:?} in all)",
            started.elapsed()
        );
    }
    let after = admin_status(&sc)["queue"]["counters"].clone();
    assert_eq!(before, after, "a trickled body reached admission");
    assert_eq!(
        client_requests(&mock),
        before_mock,
        "a trickled body reached the instance"
    );
}

#[test]
fn trickled_upload_on_the_proxy_path_is_cut() {
    let mock = Mock::start(&[]);
    let sc = sidecar_for(&mock, "");
    let mut s = TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(
        b"POST /api/blobs/sha256:0000 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nsome",
    )
    .expect("write");
    let t = Instant::now();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "not cut: {:?}",
        t.elapsed()
    );
    assert_eq!(status_of(&resp), 408, "{}", String::from_utf8_lossy(&resp));
}
