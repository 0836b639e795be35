//! Transparency: clients pointed at the sidecar instead of Ollama see no difference, on every
//! route, streaming or not. Real sidecar binary, real mock Ollama, real sockets.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn hex_sha256(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    format!("{:x}", h.finalize())
}

fn setup(env: &[(&str, &str)]) -> (Mock, Sidecar) {
    let mock = Mock::start(env);
    let sidecar = Sidecar::start(&external_instances(&[&mock], 4));
    (mock, sidecar)
}

/// Sends raw bytes and reads until the connection closes or `limit` passes.
fn raw_exchange(port: u16, request: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(limit)).ok();
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn every_route_answers_like_ollama() {
    let (mock, sidecar) = setup(&[]);
    let c = client();
    // (method, path, body, streams): each answered through the sidecar as the mock answers it.
    let cases: Vec<(&str, &str, Option<Value>)> = vec![
        ("GET", "/", None),
        ("HEAD", "/", None),
        ("GET", "/api/version", None),
        ("HEAD", "/api/version", None),
        ("GET", "/api/tags", None),
        ("HEAD", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", Some(json!({"model":"llama3.2"}))),
        ("POST", "/api/show", Some(json!({"name":"llama3.2"}))),
        (
            "POST",
            "/api/generate",
            Some(json!({"model":"llama3.2","prompt":"hi"})),
        ),
        (
            "POST",
            "/api/generate",
            Some(json!({"model":"llama3.2","prompt":"hi","stream":false})),
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}]})),
        ),
        (
            "POST",
            "/api/chat",
            Some(
                json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}),
            ),
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"model":"llama3.2","messages":[]})),
        ),
        (
            "POST",
            "/api/embed",
            Some(json!({"model":"nomic-embed-text","input":["a","b"]})),
        ),
        (
            "POST",
            "/api/embeddings",
            Some(json!({"model":"nomic-embed-text","prompt":"a"})),
        ),
        ("POST", "/api/pull", Some(json!({"model":"tinyllama"}))),
        (
            "POST",
            "/api/pull",
            Some(json!({"model":"tinyllama","stream":false})),
        ),
        (
            "POST",
            "/api/copy",
            Some(json!({"source":"llama3.2","destination":"llama-copy"})),
        ),
        (
            "DELETE",
            "/api/delete",
            Some(json!({"model":"never-there"})),
        ),
        (
            "HEAD",
            "/api/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            Some(json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}]})),
        ),
        (
            "POST",
            "/v1/chat/completions",
            Some(
                json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}),
            ),
        ),
        (
            "POST",
            "/v1/completions",
            Some(json!({"model":"llama3.2","prompt":"hi"})),
        ),
        (
            "POST",
            "/v1/embeddings",
            Some(json!({"model":"nomic-embed-text","input":"a"})),
        ),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/llama3.2", None),
        (
            "POST",
            "/api/generate",
            Some(json!({"model":"no-such-model","prompt":"hi"})),
        ),
        ("GET", "/no/such/path", None),
        ("GET", "/api/chat", None),
    ];
    for (method, path, body) in cases {
        let send = |base: &dyn Fn(&str) -> String| {
            let mut rb = c.request(method.parse().unwrap(), base(path));
            if let Some(b) = &body {
                rb = rb.json(b);
            }
            let r = rb.send().expect("request");
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let allow = r
                .headers()
                .get("allow")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let text = r.text().unwrap_or_default();
            (status, ct, allow, text)
        };
        let direct = send(&|p| mock.url(p));
        let proxied = send(&|p| sidecar.url(p));
        let what = format!("{method} {path} {body:?}");
        assert_eq!(proxied.0, direct.0, "status of {what}");
        assert_eq!(proxied.1, direct.1, "content-type of {what}");
        assert_eq!(proxied.2, direct.2, "allow of {what}");
        // Same framing: same number of lines, each the same JSON keys (values carry timestamps).
        let lines = |t: &str| t.lines().map(str::to_string).collect::<Vec<_>>();
        let (dl, pl) = (lines(&direct.3), lines(&proxied.3));
        assert_eq!(
            pl.len(),
            dl.len(),
            "line count of {what}:\n{}\n--\n{}",
            proxied.3,
            direct.3
        );
        for (p, d) in pl.iter().zip(&dl) {
            let strip = |l: &str| l.strip_prefix("data: ").unwrap_or(l).to_string();
            match (
                serde_json::from_str::<Value>(&strip(p)),
                serde_json::from_str::<Value>(&strip(d)),
            ) {
                (Ok(Value::Object(a)), Ok(Value::Object(b))) => {
                    let mut ka: Vec<_> = a.keys().collect();
                    let mut kb: Vec<_> = b.keys().collect();
                    ka.sort();
                    kb.sort();
                    assert_eq!(ka, kb, "JSON keys of a line of {what}");
                }
                _ => assert_eq!(strip(p), strip(d), "text line of {what}"),
            }
        }
    }
}

#[test]
fn copy_then_delete_through_the_sidecar() {
    let (_mock, sidecar) = setup(&[]);
    let c = client();
    let r = c
        .post(sidecar.url("/api/copy"))
        .json(&json!({"source":"llama3.2","destination":"llama-copy"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let delete = || {
        c.delete(sidecar.url("/api/delete"))
            .json(&json!({"model":"llama-copy"}))
            .send()
            .unwrap()
    };
    let r = delete();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().unwrap(),
        "",
        "Ollama's delete answers an empty body"
    );
    let r = delete();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().unwrap()["error"],
        "model 'llama-copy' not found"
    );
}

#[test]
fn head_query_headers_host_and_request_id_arrive_as_sent() {
    let (mock, sidecar) = setup(&[]);
    let c = client();
    let r = c.head(sidecar.url("/")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "", "HEAD has no body");

    let r = c
        .get(sidecar.url("/api/tags?verbose=true&x=%2F"))
        .header(
            "User-Agent",
            "ollama-python/0.6.0 (x86_64 linux) Python/3.11",
        )
        .header("Authorization", "Bearer cloud-token")
        .header("X-Custom", "kept")
        .header("Connection", "keep-alive, X-Hop")
        .header("X-Hop", "must-not-pass")
        .header("Proxy-Authorization", "Basic Zm9vOmJhcg==")
        .header("Host", "gpu-box.example.com")
        .header("X-Request-Id", "req-42")
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a foreign Host is rewritten, so Ollama's host check passes"
    );
    assert_eq!(r.headers()["x-request-id"], "req-42");
    let log = mock_requests(&mock);
    let seen = log
        .iter()
        .rev()
        .find(|q| q["path"] == "/api/tags")
        .expect("the mock saw the request");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["query"], "verbose=true&x=%2F");
    assert_eq!(
        logged_header(seen, "user-agent").as_deref(),
        Some("ollama-python/0.6.0 (x86_64 linux) Python/3.11")
    );
    assert_eq!(
        logged_header(seen, "authorization").as_deref(),
        Some("Bearer cloud-token")
    );
    assert_eq!(logged_header(seen, "x-custom").as_deref(), Some("kept"));
    assert_eq!(
        logged_header(seen, "x-request-id").as_deref(),
        Some("req-42")
    );
    assert_eq!(
        logged_header(seen, "x-hop"),
        None,
        "Connection-nominated header stripped"
    );
    assert_eq!(logged_header(seen, "proxy-authorization"), None);
    assert_eq!(
        logged_header(seen, "host"),
        Some(format!("127.0.0.1:{}", mock.port))
    );

    // Without an id, one is generated, sent upstream and returned.
    let r = c.get(sidecar.url("/api/version")).send().unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 16);
    let log = mock_requests(&mock);
    let seen = log
        .iter()
        .rev()
        .find(|q| q["path"] == "/api/version")
        .unwrap();
    assert_eq!(logged_header(seen, "x-request-id"), Some(id));

    // Content-Type and Content-Encoding of an inference body are forwarded untouched.
    let body = br#"{"model":"llama3.2","prompt":"x","stream":false}"#;
    let r = c
        .post(sidecar.url("/api/generate"))
        .header("Content-Type", "application/json; charset=utf-8")
        .body(body.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let log = mock_requests(&mock);
    let seen = log
        .iter()
        .rev()
        .find(|q| q["path"] == "/api/generate")
        .unwrap();
    assert_eq!(
        logged_header(seen, "content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(seen["body_sha256"], hex_sha256(body));
}

#[test]
fn expect_100_continue_on_inference_and_blob_routes() {
    let (_mock, sidecar) = setup(&[]);
    for (path, body) in [
        (
            "/api/chat",
            br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#
                .to_vec(),
        ),
        (
            "/api/blobs/sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            b"hello".to_vec(),
        ),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("HTTP/1.1 100"),
            "{path}: expected 100 Continue, got {line:?}"
        );
        let mut header_line = String::new();
        while reader.read_line(&mut header_line).unwrap() > 0 && header_line != "\r\n" {
            header_line.clear();
        }
        s.write_all(&body).unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(
            status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.1 201"),
            "{path}: {status:?}"
        );
    }
}

#[test]
fn chunked_100_mib_blob_upload_is_streamed_not_buffered() {
    let (_mock, sidecar) = setup(&[]);
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 100;
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let mut h = Sha256::new();
    for _ in 0..CHUNKS {
        h.update(&chunk);
    }
    let digest = format!("{:x}", h.finalize());
    let rss_before = sidecar.rss_kib();

    let mut s = TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /api/blobs/sha256:{digest} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let mut peak = rss_before;
    for i in 0..CHUNKS {
        write!(s, "{CHUNK:x}\r\n").unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
        if i % 10 == 0 {
            peak = peak.max(sidecar.rss_kib());
        }
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 201"), "{status:?}");
    peak = peak.max(sidecar.rss_kib());
    assert!(
        peak.saturating_sub(rss_before) < 40 * 1024,
        "the sidecar grew by {} KiB while relaying 100 MiB: it buffered the upload",
        peak - rss_before
    );
}

#[test]
fn twenty_mib_chat_body_arrives_byte_identical() {
    let (mock, sidecar) = setup(&[]);
    let image = "A".repeat(20 << 20);
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"what is this?","images":["{image}"]}}],"stream":false,"model":"llama3.2"}}"#
    );
    let r = client()
        .post(sidecar.url("/api/chat"))
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["done"], true);
    let log = mock_requests(&mock);
    let seen = log.iter().rev().find(|q| q["path"] == "/api/chat").unwrap();
    assert_eq!(
        seen["body_len"].as_u64().or(seen["body_length"].as_u64()),
        Some(body.len() as u64)
    );
    assert_eq!(seen["body_sha256"], hex_sha256(body.as_bytes()));
}

#[test]
fn streamed_chunks_are_not_held_back() {
    let (_mock, sidecar) = setup(&[("MOCK_TOKENS", "6"), ("MOCK_TOKEN_DELAY_MS", "200")]);
    let mut reader = post_raw(
        sidecar.port,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"count"}"#,
        "",
    );
    let mut lags = Vec::new();
    for_each_json_line(&mut reader, Duration::from_secs(10), |v, received| {
        let created = humantime::parse_rfc3339_weak(v["created_at"].as_str().unwrap())
            .expect("created_at is RFC 3339");
        lags.push(received.duration_since(created).unwrap_or_default());
        v["done"] != true
    });
    assert!(lags.len() >= 6, "got {} chunks", lags.len());
    for (i, lag) in lags.iter().enumerate() {
        assert!(
            *lag < Duration::from_millis(20),
            "chunk {i} reached the client {lag:?} after it left the mock"
        );
    }
}

#[test]
fn upstream_statuses_pass_through() {
    // Retries off: a 503 would otherwise be retried (tests/retries.rs).
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "retries:\n  max_attempts: 1\n{}",
        external_instances(&[&mock], 4)
    ));
    let c = client();
    for status in [499u16, 500, 503, 429] {
        c.post(mock.url("/mock/faults"))
            .json(&json!({"fail_next": 1, "status": status}))
            .send()
            .unwrap();
        let r = c
            .post(sidecar.url("/api/generate"))
            .json(&json!({"model":"llama3.2","prompt":"x","stream":false}))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().unwrap();
        assert!(v["error"].is_string(), "Ollama's error shape: {v}");
    }
    let r = c
        .post(sidecar.url("/api/chat"))
        .json(&json!({"model":"ghost","messages":[]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().unwrap()["error"],
        "model 'ghost' not found"
    );
}

#[test]
fn proxy_failures_answer_in_the_route_shape() {
    // The instance passes its startup check, then goes away: the next requests meet a refused
    // connection (health checks are too slow to notice first).
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "health:\n  interval: 1h\nretries:\n  max_attempts: 1\ninstances:\n  - name: gone\n    url: http://127.0.0.1:{}\n",
        mock.port
    ));
    drop(mock);
    let c = client();
    let r = c.get(sidecar.url("/api/tags")).send().unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let v: Value = r.json().unwrap();
    assert!(v["error"].as_str().unwrap().contains("gone"), "{v}");

    let r = c
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model":"m","messages":[]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    assert_eq!(v["error"]["type"], "api_error");

    let r = c
        .post(sidecar.url("/api/chat"))
        .json(&json!({"model":"m","messages":[]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.json::<Value>().unwrap()["error"].is_string());
}

#[test]
fn an_upstream_that_never_answers_gets_504() {
    let mock = Mock::start(&[("MOCK_HANG", "true")]);
    let sidecar = Sidecar::start(&format!(
        "timeouts:\n  response_header: 1s\nretries:\n  max_attempts: 1\n{}",
        external_instances(&[&mock], 1)
    ));
    let started = Instant::now();
    let r = client()
        .post(sidecar.url("/api/generate"))
        .json(&json!({"model":"llama3.2","prompt":"x"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    let v: Value = r.json().unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("timeouts.response_header"),
        "{v}"
    );
}

#[test]
fn bad_input_gets_a_clear_answer_and_the_proxy_keeps_serving() {
    let (mock, sidecar) = setup(&[("MOCK_TOKENS", "50"), ("MOCK_TOKEN_DELAY_MS", "20")]);
    let c = client();

    // Malformed JSON on an inference route: a 400 in Ollama's shape, never forwarded.
    let before = mock_stats(&mock)["requests"]["/api/chat"]
        .as_u64()
        .unwrap_or(0);
    let r = c
        .post(sidecar.url("/api/chat"))
        .header("Content-Type", "application/json")
        .body("{\"model\": ")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("invalid JSON"));
    let r = c
        .post(sidecar.url("/v1/chat/completions"))
        .body("not json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    let after = mock_stats(&mock)["requests"]["/api/chat"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(before, after, "malformed bodies never reach the instance");

    // Oversized header: refused (or the connection closed), never a crash.
    // Pingora's limit is Ollama's own (Go's net/http): 1 MiB of header.
    let big = "x".repeat(2 << 20);
    let reply = raw_exchange(
        sidecar.port,
        format!("GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    );
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
        "oversized header: {:?}",
        &reply[..reply.len().min(80)]
    );

    // A client that leaves mid-upload.
    let mut s = TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
    s.write_all(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"model\":\"llama3.2\"")
        .unwrap();
    drop(s);

    // A client that leaves mid-stream: the mock sees the stream end early.
    let disconnects_before = mock_stats(&mock)["disconnects"].as_u64().unwrap_or(0);
    let mut s = TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
    let body = r#"{"model":"llama3.2","prompt":"long"}"#;
    write!(
        s,
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read(&mut first);
    drop(s);
    assert!(
        wait_until(Duration::from_secs(3), || {
            mock_stats(&mock)["disconnects"].as_u64().unwrap_or(0) > disconnects_before
        }),
        "the upstream stream was not closed after the client left"
    );

    // Still serving.
    let r = c.get(sidecar.url("/api/version")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        sidecar.log_text().find("panicked").is_none(),
        "{}",
        sidecar.log_text()
    );
}

/// The access-log line of the request with this id, waited for (it is written when the request ends).
fn access_line(sidecar: &Sidecar, request_id: &str) -> String {
    let mut line = String::new();
    let logged = wait_until(Duration::from_secs(5), || {
        line = sidecar
            .log_text()
            .lines()
            .find(|l| l.contains("access:") && l.contains(request_id))
            .unwrap_or_default()
            .to_string();
        !line.is_empty()
    });
    assert!(logged, "no access line; log:\n{}", sidecar.log_text());
    line
}

#[test]
fn a_failure_is_logged_by_its_label_not_an_internal_name() {
    let port = free_port();
    let sidecar = Sidecar::start(&format!(
        "instances:\n  - name: gone\n    url: http://127.0.0.1:{port}\n"
    ));
    let r = client()
        .get(sidecar.url("/api/tags"))
        .header("x-request-id", "no-instance-1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    let line = access_line(&sidecar, "no-instance-1");
    assert!(line.contains("error=\"no_instance\""), "{line}");
    assert!(line.contains("outcome=\"failed\""), "{line}");
    assert!(!line.contains("NoInstanceReady"), "{line}");
    // Absent values are left out, not written as "-".
    assert!(!line.contains("model="), "{line}");
    assert!(!line.contains("\"-\""), "{line}");
}

#[test]
fn a_request_no_instance_can_serve_logs_why_the_instances_are_not_ready() {
    let port = free_port();
    let sidecar = Sidecar::start(&format!(
        "instances:\n  - name: gone\n    url: http://127.0.0.1:{port}\n"
    ));
    let refused = wait_until(Duration::from_secs(10), || {
        sidecar.status()["instances"][0]["last_check"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection refused"))
    });
    assert!(refused, "{}", sidecar.status());
    let r = client()
        .get(sidecar.url("/api/tags"))
        .header("x-request-id", "no-instance-why")
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().unwrap();
    // The cause is the operator's to read, not the client's.
    assert!(!body.contains("connection refused"), "{body}");
    let line = access_line(&sidecar, "no-instance-why");
    assert!(line.contains("error=\"no_instance\""), "{line}");
    let instances = line
        .split(" instances=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no instances field: {line}"));
    assert!(instances.starts_with("gone: unhealthy ("), "{line}");
    assert!(
        instances.contains(&format!("127.0.0.1:{port}: connection refused")),
        "{line}"
    );
}

#[test]
fn an_announced_body_over_max_body_gets_413_before_100_continue() {
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "limits:\n  max_body: 1KiB\n{}",
        external_instances(&[&mock], 1)
    ));
    let mut s = TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    // The client is told at once, and never invited to send the 4 KiB.
    assert!(line.starts_with("HTTP/1.1 413"), "{line:?}");
}
