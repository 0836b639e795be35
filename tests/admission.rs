//! Admission through the real server: slots, fairness, bounds, cancellation and model-aware
//! dispatch, observed from the client and from the mock instances.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends a streaming chat request on a raw socket and returns its reader.
fn start_stream(port: u16, client_id: &str, marker: &str) -> BufReader<TcpStream> {
    let body =
        json!({"model":"llama3.2","messages":[{"role":"user","content":marker}]}).to_string();
    post_raw(
        port,
        "/api/chat",
        &body,
        &format!("X-Client-Id: {client_id}\r\n"),
    )
}

/// Reads lines until one is a JSON object (the first streamed chunk); returns when it arrived.
fn first_chunk(reader: &mut BufReader<TcpStream>) -> Instant {
    let mut line = String::new();
    for _ in 0..64 {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.trim_start().starts_with('{') {
            return Instant::now();
        }
    }
    panic!("no chunk arrived");
}

/// Reads to the end of the response (the final `done` chunk).
fn read_to_done(reader: &mut BufReader<TcpStream>) {
    let mut line = String::new();
    for _ in 0..10_000 {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line.contains("\"done\":true") {
            return;
        }
    }
}

fn chat(port: u16, client_id: &str) -> (u16, Value, Option<String>) {
    let r = client()
        .post(format!("http://127.0.0.1:{port}/api/chat"))
        .header("X-Client-Id", client_id)
        .json(
            &json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}),
        )
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().unwrap_or(Value::Null), retry)
}

const FAIR: &str = "admission:\n  client_id_header: X-Client-Id\n";

#[test]
fn never_more_than_num_parallel_reach_an_instance() {
    for slots in [1usize, 2] {
        let mock = Mock::start(&[
            ("OLLAMA_NUM_PARALLEL", "16"),
            ("MOCK_TOKENS", "5"),
            ("MOCK_TOKEN_DELAY_MS", "20"),
        ]);
        let sidecar = Sidecar::start(&format!("{FAIR}{}", external_instances(&[&mock], slots)));
        let port = sidecar.port;
        let handles: Vec<_> = (0..12)
            .map(|i| std::thread::spawn(move || chat(port, &format!("c{i}")).0))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200);
        }
        let stats = mock_stats(&mock);
        assert_eq!(
            stats["peak_inference_in_flight"].as_u64(),
            Some(slots as u64),
            "num_parallel {slots}: {stats}"
        );
    }
}

#[test]
fn a_flood_from_one_client_does_not_delay_another() {
    // One slot; each request takes about 100 ms (5 tokens x 20 ms).
    let mock = Mock::start(&[("MOCK_TOKENS", "5"), ("MOCK_TOKEN_DELAY_MS", "20")]);
    let sidecar = Sidecar::start(&format!("{FAIR}{}", external_instances(&[&mock], 1)));
    let port = sidecar.port;
    let service = {
        let t = Instant::now();
        assert_eq!(chat(port, "warmup").0, 200);
        t.elapsed()
    };
    let flood: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || chat(port, "flooder").0))
        .collect();
    // Let the flood queue up behind the one in service.
    std::thread::sleep(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(chat(port, "bystander").0, 200);
    let waited = t.elapsed();
    // At most the request in service, then its own.
    assert!(
        waited < service * 3 + Duration::from_millis(100),
        "the bystander took {waited:?} behind a flood (one service takes {service:?})"
    );
    for h in flood {
        assert_eq!(h.join().unwrap(), 200);
    }
}

#[test]
fn queue_full_and_wait_expired_answer_503_with_retry_after() {
    let mock = Mock::start(&[("MOCK_TOKENS", "40"), ("MOCK_TOKEN_DELAY_MS", "50")]);
    let sidecar = Sidecar::start(&format!(
        "admission:\n  max_queued: 1\n  max_wait: 400ms\n{}",
        external_instances(&[&mock], 1)
    ));
    // Holds the only slot for about 2 s.
    let mut holder = start_stream(sidecar.port, "a", "hold");
    first_chunk(&mut holder);
    // Takes the only queue place, and expires there.
    let port = sidecar.port;
    let queued = std::thread::spawn(move || {
        let t = Instant::now();
        let r = chat(port, "b");
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    // The queue is full: refused at once, in Ollama's own words.
    let t = Instant::now();
    let (status, body, retry) = chat(port, "c");
    assert_eq!(status, 503);
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "refusal took {:?}",
        t.elapsed()
    );
    assert_eq!(
        body["error"],
        "server busy, please try again.  maximum pending requests exceeded"
    );
    assert!(retry.is_some(), "Retry-After on queue full");

    let ((status, body, retry), waited) = queued.join().unwrap();
    assert_eq!(status, 503);
    assert!(
        waited >= Duration::from_millis(380) && waited < Duration::from_millis(1500),
        "expired after {waited:?}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("admission.max_wait"),
        "{body}"
    );
    assert!(retry.is_some(), "Retry-After on wait expired");

    // OpenAI routes refuse in the OpenAI shape.
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model":"llama3.2","messages":[]}))
        .send()
        .unwrap();
    // Either queued-then-expired or refused: both are 503 in the OpenAI shape.
    assert_eq!(r.status(), 503);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    drop(holder);
}

#[test]
fn a_queued_client_that_leaves_is_never_forwarded() {
    let mock = Mock::start(&[("MOCK_TOKENS", "20"), ("MOCK_TOKEN_DELAY_MS", "25")]);
    let sidecar = Sidecar::start(&format!("{FAIR}{}", external_instances(&[&mock], 1)));
    let mut holder = start_stream(sidecar.port, "a", "holder");
    first_chunk(&mut holder);
    // Queued behind the holder, then gone.
    let leaver = start_stream(sidecar.port, "b", "LEAVER-MARKER");
    std::thread::sleep(Duration::from_millis(100));
    drop(leaver);
    read_to_done(&mut holder);
    // A later request is served: the slot was not leaked by the leaver.
    assert_eq!(chat(sidecar.port, "c").0, 200);
    let log = mock_requests(&mock);
    assert!(
        log.iter().all(|r| r["body_sha256"].is_string()),
        "request log has bodies"
    );
    let chats = mock_stats(&mock)["requests"]["/api/chat"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        chats, 2,
        "only the holder and the later request reached the mock"
    );
}

#[test]
fn a_streaming_client_that_leaves_frees_its_slot_at_once() {
    let mock = Mock::start(&[("MOCK_TOKENS", "200"), ("MOCK_TOKEN_DELAY_MS", "20")]);
    let sidecar = Sidecar::start(&format!("{FAIR}{}", external_instances(&[&mock], 1)));
    let mut streamer = start_stream(sidecar.port, "a", "long");
    first_chunk(&mut streamer);
    let mut waiter = start_stream(sidecar.port, "b", "next");
    std::thread::sleep(Duration::from_millis(100));
    let left = Instant::now();
    drop(streamer);
    let served = first_chunk(&mut waiter);
    // The next request's first chunk: the slot came back, and the mock answered it.
    assert!(
        served.duration_since(left) < Duration::from_millis(100),
        "the slot came back {:?} after the client left",
        served.duration_since(left)
    );
    assert!(
        wait_until(Duration::from_secs(2), || mock_stats(&mock)["disconnects"]
            .as_u64()
            .unwrap_or(0)
            >= 1),
        "the mock did not see the upstream connection close"
    );
}

#[test]
fn requests_go_where_their_model_is_loaded() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    // qwen is loaded on b only.
    let r = client()
        .post(b.url("/api/generate"))
        .json(&json!({"model":"qwen2.5:0.5b"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let sidecar = Sidecar::start(&format!(
        "health:\n  models_interval: 200ms\n{}",
        external_instances(&[&a, &b], 4)
    ));
    std::thread::sleep(Duration::from_millis(600));
    for _ in 0..6 {
        let r = client()
            .post(sidecar.url("/api/generate"))
            .json(&json!({"model":"qwen2.5:0.5b","prompt":"hi","stream":false}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let on_a = mock_stats(&a)["requests"]["/api/generate"]
        .as_u64()
        .unwrap_or(0);
    let on_b = mock_stats(&b)["requests"]["/api/generate"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(on_a, 0, "no qwen request went to the instance without it");
    assert_eq!(
        on_b, 7,
        "all qwen requests went to the instance that has it (plus the preload)"
    );
}

#[test]
fn an_oversized_body_is_refused_with_413() {
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "limits:\n  max_body: 1KiB\n{}",
        external_instances(&[&mock], 1)
    ));
    let big = json!({"model":"llama3.2","prompt":"x".repeat(4096)});
    let r = client()
        .post(sidecar.url("/api/generate"))
        .json(&big)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("limits.max_body"));
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&big)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    assert_eq!(
        mock_stats(&mock)["requests"]["/api/generate"]
            .as_u64()
            .unwrap_or(0),
        0
    );
}

#[test]
fn a_higher_priority_request_overtakes_the_queue() {
    // One slot; each request takes about 400 ms (4 tokens x 100 ms), long enough that the
    // high-priority request is sent while the same low one is still in service.
    let mock = Mock::start(&[("MOCK_TOKENS", "4"), ("MOCK_TOKEN_DELAY_MS", "100")]);
    let sidecar = Sidecar::start(&format!(
        "admission:\n  priority_header: X-Priority\n{}",
        external_instances(&[&mock], 1)
    ));
    let port = sidecar.port;
    // Returns when the request finished.
    let send = move |priority: i32| {
        let r = client()
            .post(format!("http://127.0.0.1:{port}/api/chat"))
            .header("X-Priority", priority.to_string())
            .json(&json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        Instant::now()
    };
    // Six low-priority requests from the same client queue up behind the one in service ...
    let low: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || send(0)))
        .collect();
    // (waiting for the queue to say so, not for a fixed time: a loaded machine starts the
    // threads late) ...
    assert!(
        wait_until(Duration::from_secs(10), || sidecar.status()["queue"]
            ["queued"]
            == 5),
        "the low-priority requests did not queue: {}",
        sidecar.status()["queue"]
    );
    // ... and a high-priority one goes next.
    let high = send(10);
    let lows: Vec<Instant> = low.into_iter().map(|h| h.join().unwrap()).collect();
    let before = lows.iter().filter(|t| **t < high).count();
    assert!(
        before <= 2,
        "{before} of 6 low-priority requests finished before the high-priority one"
    );
}

#[test]
fn model_management_beyond_its_limit_waits_then_gets_503() {
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "admission:\n  management_concurrency: 1\n  max_wait: 300ms\n{}",
        external_instances(&[&mock], 1)
    ));
    // An upload that has sent half its body holds the only management slot.
    let mut upload = TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
    std::io::Write::write_all(
        &mut upload,
        b"POST /api/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let r = client()
        .post(sidecar.url("/api/copy"))
        .json(&json!({"source":"llama3.2","destination":"copy"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "it waited: {:?}",
        t.elapsed()
    );
    assert!(r.json::<Value>().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("management_concurrency"));
    // Metadata never waits for that slot.
    assert_eq!(
        client()
            .get(sidecar.url("/api/tags"))
            .send()
            .unwrap()
            .status(),
        200
    );
    drop(upload);
}
