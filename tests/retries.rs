//! Health checks and retries through the real server: an instance that is down, overloaded,
//! broken mid-stream or hung costs the client nothing it can see, or gets a clear answer.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

fn generate(sidecar: &Sidecar) -> (u16, Value) {
    let r = client()
        .post(sidecar.url("/api/generate"))
        .json(&json!({"model":"llama3.2","prompt":"hi","stream":false}))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn inference_count(mock: &Mock) -> u64 {
    mock_stats(mock)["requests"]["/api/generate"]
        .as_u64()
        .unwrap_or(0)
}

fn set_faults(mock: &Mock, faults: Value) {
    let r = client()
        .post(mock.url("/mock/faults"))
        .json(&faults)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Health checks that do not run during the test (so an instance killed mid-test still looks
/// ready until real traffic says otherwise).
const SLOW_CHECKS: &str = "health:\n  interval: 1h\n";

#[test]
fn an_instance_that_refuses_connections_costs_the_client_nothing() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "{SLOW_CHECKS}{}",
        external_instances(&[&a, &b], 2)
    ));
    drop(a); // now refusing connections
    for _ in 0..20 {
        let (status, body) = generate(&sidecar);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["done"], true);
        let r = client().get(sidecar.url("/api/tags")).send().unwrap();
        assert_eq!(
            r.status(),
            200,
            "metadata retried on the other instance too"
        );
    }
    assert_eq!(inference_count(&b), 20);
}

#[test]
fn server_busy_is_retried_on_another_instance() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let sidecar = Sidecar::start(&external_instances(&[&a, &b], 2));
    set_faults(&a, json!({"fail_next": 100, "status": 503}));
    set_faults(&b, json!({"fail_next": 0}));
    for _ in 0..6 {
        let (status, body) = generate(&sidecar);
        assert_eq!(status, 200, "{body}");
    }
    let (on_a, on_b) = (inference_count(&a), inference_count(&b));
    assert_eq!(on_b, 6, "every request was answered by b");
    assert!(on_a >= 1, "a was tried");
    assert!(
        sidecar.log_text().contains("retrying on another instance"),
        "the retry is logged"
    );
}

#[test]
fn a_reset_after_the_first_chunk_ends_in_band_with_no_duplicate_bytes() {
    let a = Mock::start(&[("MOCK_TOKENS", "10"), ("MOCK_CLOSE_AFTER_CHUNKS", "2")]);
    let sidecar = Sidecar::start(&external_instances(&[&a], 1));
    let mut reader = post_raw(
        sidecar.port,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"x"}"#,
        "",
    );
    let (objects, ended) = read_json_lines(&mut reader, Duration::from_secs(10));
    assert!(ended, "the stream ends");
    assert_eq!(
        objects.len(),
        3,
        "two chunks, then one error line: {objects:?}"
    );
    assert_eq!(objects[0]["done"], false);
    assert_eq!(objects[1]["done"], false);
    assert_ne!(objects[0]["response"], Value::Null);
    assert!(objects[2]["error"].is_string(), "{:?}", objects[2]);
    assert_eq!(
        inference_count(&a),
        1,
        "nothing is retried after the first byte"
    );
}

#[test]
fn an_ejected_instance_comes_back_only_through_a_half_open_trial() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "health:\n  interval: 1h\n  passive:\n    failures: 1\n    cooldown: 1s\n    max_cooldown: 4s\n{}",
        external_instances(&[&a, &b], 4)
    ));
    // a answers its next two requests with 503 (each retried on b): the first ejects it for 1 s.
    set_faults(&a, json!({"fail_next": 2, "status": 503}));
    let mut a_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && a_seen == 0 {
        assert_eq!(generate(&sidecar).0, 200);
        a_seen = inference_count(&a);
    }
    assert_eq!(a_seen, 1, "a got traffic before its failure");
    // During the cool-down, a gets nothing.
    for _ in 0..10 {
        assert_eq!(generate(&sidecar).0, 200);
    }
    assert_eq!(
        inference_count(&a),
        1,
        "an ejected instance gets no traffic"
    );
    // After the cool-down, exactly one trial reaches a; it fails (503, retried on b), and a is
    // ejected again for twice as long.
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..10 {
        assert_eq!(generate(&sidecar).0, 200);
    }
    assert_eq!(
        inference_count(&a),
        2,
        "one trial request after the cool-down"
    );
    // a is healthy now; after the longer cool-down its trial succeeds and it is back in rotation.
    std::thread::sleep(Duration::from_millis(2100));
    for _ in 0..12 {
        assert_eq!(generate(&sidecar).0, 200);
    }
    assert!(
        inference_count(&a) >= 4,
        "after a good trial, a takes traffic again: {}",
        inference_count(&a)
    );
    assert!(sidecar.log_text().contains("back in rotation"));
}

#[test]
fn the_retry_budget_caps_retries_under_a_total_outage() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "health:\n  passive:\n    failures: 1000\nretries:\n  budget_ratio: 0.2\n  budget_min: 2\n  budget_window: 60s\n{}",
        external_instances(&[&a, &b], 2)
    ));
    set_faults(&a, json!({"fail_next": 1000, "status": 503}));
    set_faults(&b, json!({"fail_next": 1000, "status": 503}));
    let requests = 20;
    for _ in 0..requests {
        let (status, body) = generate(&sidecar);
        assert_eq!(status, 503, "the outage is passed on: {body}");
        assert!(body["error"].is_string());
    }
    let upstream = inference_count(&a) + inference_count(&b);
    // 20% of 20 requests = 4 retries; without the budget it would be 20 x 3 = 60 attempts.
    assert!(
        upstream <= requests + 4,
        "{upstream} attempts for {requests} requests: the budget did not hold"
    );
    assert!(upstream > requests, "some retries were made");
}

#[test]
fn an_instance_that_hangs_before_headers_is_cut_at_the_timeout() {
    let a = Mock::start(&[("MOCK_HANG", "true")]);
    let b = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "timeouts:\n  response_header: 500ms\n{}",
        external_instances(&[&a, &b], 2)
    ));
    for _ in 0..4 {
        let t = Instant::now();
        let (status, body) = generate(&sidecar);
        assert_eq!(status, 200, "{body}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    // With retries off, the client gets a 504 at the timeout.
    let lone = Mock::start(&[("MOCK_HANG", "true")]);
    let sidecar = Sidecar::start(&format!(
        "timeouts:\n  response_header: 500ms\nretries:\n  max_attempts: 1\n{}",
        external_instances(&[&lone], 1)
    ));
    let t = Instant::now();
    let (status, body) = generate(&sidecar);
    assert_eq!(status, 504);
    assert!(t.elapsed() >= Duration::from_millis(450) && t.elapsed() < Duration::from_secs(3));
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("timeouts.response_header"));
}

#[test]
fn health_checks_never_touch_an_inference_route() {
    let a = Mock::start(&[]);
    let _sidecar = Sidecar::start(&format!(
        "health:\n  interval: 100ms\n  models_interval: 100ms\n{}",
        external_instances(&[&a], 1)
    ));
    std::thread::sleep(Duration::from_millis(1200));
    let stats = mock_stats(&a);
    let by_path = stats["requests"].as_object().unwrap();
    assert!(
        by_path["/api/version"].as_u64().unwrap_or(0) >= 8,
        "checked about every 100 ms: {stats}"
    );
    for path in by_path.keys() {
        assert!(
            ["/api/version", "/api/ps", "/api/tags", "/api/show"].contains(&path.as_str()),
            "health checks reached {path}"
        );
    }
    // `/api/show` (metadata, no load) once per installed model, not once per check.
    let tags: Value = client()
        .get(a.url("/api/tags"))
        .send()
        .and_then(|r| r.json())
        .expect("tags");
    let installed = tags["models"].as_array().map_or(0, Vec::len) as u64;
    let shows = by_path
        .get("/api/show")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(shows <= installed, "{shows} shows for {installed} models");
}

#[test]
fn a_20_mib_body_retried_after_a_refusal_arrives_byte_identical() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "{SLOW_CHECKS}{}",
        external_instances(&[&a, &b], 1)
    ));
    drop(a);
    let body = format!(
        r#"{{"model":"llama3.2","stream":false,"messages":[{{"role":"user","content":"see","images":["{}"]}}]}}"#,
        "B".repeat(20 << 20)
    );
    // Two requests: one of them meets a first.
    for _ in 0..2 {
        let r = client()
            .post(sidecar.url("/api/chat"))
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let expected = format!("{:x}", Sha256::digest(body.as_bytes()));
    let log = mock_requests(&b);
    let chats: Vec<_> = log.iter().filter(|r| r["path"] == "/api/chat").collect();
    assert_eq!(chats.len(), 2);
    for c in chats {
        assert_eq!(c["body_sha256"], expected);
    }
}

#[test]
fn with_no_instance_ready_inference_waits_and_metadata_is_refused_at_once() {
    let port = free_port();
    let sidecar = Sidecar::start(&format!(
        "health:\n  interval: 100ms\n  rise: 1\nadmission:\n  max_wait: 10s\ninstances:\n  - name: late\n    url: http://127.0.0.1:{port}\n"
    ));
    let t = Instant::now();
    let r = client().get(sidecar.url("/api/tags")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert!(t.elapsed() < Duration::from_millis(500));
    assert!(r.json::<Value>().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("no Ollama instance"));
    // An inference request waits for the instance to come up, then is served.
    let url = sidecar.url("/api/generate");
    let waiter = std::thread::spawn(move || {
        let r = client()
            .post(url)
            .json(&json!({"model":"llama3.2","prompt":"hi","stream":false}))
            .send()
            .unwrap();
        r.status().as_u16()
    });
    std::thread::sleep(Duration::from_millis(500));
    let _late = Mock::start_on(port, &[]);
    assert_eq!(waiter.join().unwrap(), 200);
}

#[test]
fn a_stream_silent_past_the_idle_timeout_ends_in_band() {
    let a = Mock::start(&[("MOCK_TOKENS", "3"), ("MOCK_TOKEN_DELAY_MS", "3000")]);
    let sidecar = Sidecar::start(&format!(
        "timeouts:\n  idle: 300ms\n{}",
        external_instances(&[&a], 1)
    ));
    let started = Instant::now();
    let mut reader = post_raw(
        sidecar.port,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"slow"}"#,
        "",
    );
    let (objects, ended) = read_json_lines(&mut reader, Duration::from_secs(10));
    assert!(ended, "the stream ended");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut at the idle timeout, not after the whole answer: {:?}",
        started.elapsed()
    );
    let last = objects.last().expect("an error line");
    assert!(
        last["error"]
            .as_str()
            .unwrap_or("")
            .contains("timeouts.idle"),
        "{objects:?}"
    );
    assert!(objects.iter().all(|o| o["done"] != true));
}
