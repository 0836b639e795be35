//! Clients that stall, trickle, flood or pipeline, through the real binary and the mock: a client
//! that stops reading loses its stream and its slot (`limits.write_timeout`); request bodies held
//! before admission are bounded in all (`limits.max_pending_body_bytes`) and in time
//! (`limits.body_deadline`); requests sent back to back on one connection are all answered, in
//! order; a client's model name is kept bounded. Loops are bounded in count and time; sockets
//! and processes end with their test.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The `limits` keys these tests set (besides `max_body`).
fn limits(keys: &[(&str, &str)]) -> String {
    let mut s = String::from("limits:\n");
    for (k, v) in keys {
        s.push_str(&format!("  {k}: {v}\n"));
    }
    s
}

fn queue(sc: &Sidecar) -> Value {
    sc.status()["queue"].clone()
}

/// A client sends a streamed generate and then reads nothing: once the socket buffers are full,
/// its stream is cut after `limits.write_timeout`, the instance sees the request cancelled, the
/// slot is free, and the access log and metrics say `write_timeout`.
#[test]
fn a_client_that_stops_reading_loses_its_stream_and_slot() {
    // A long answer: far more than the sockets between the client and the mock can buffer.
    let mock = Mock::start(&[("MOCK_TOKENS", "400000")]);
    let sc = Sidecar::start(&format!(
        "log:\n  format: json\n{}{}",
        limits(&[("write_timeout", "1s")]),
        external_instances(&[&mock], 1)
    ));
    let body = r#"{"model":"llama3.2","prompt":"tell me everything","stream":true}"#;
    let mut s = TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
    s.write_all(&raw_request(
        "POST",
        b"/api/generate",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    ))
    .expect("send");
    let sent = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || queue(&sc)["held_slots"] == 1),
        "the request never took its slot: {}",
        queue(&sc)
    );
    // Never read. The slot must come free: the buffers fill within seconds, then 1 s passes.
    let freed = wait_until(Duration::from_secs(20), || {
        queue(&sc)["held_slots"] == 0 && mock_stats(&mock)["inference_in_flight"] == 0
    });
    let took = sent.elapsed();
    assert!(
        freed,
        "a client reading nothing still holds its slot after {took:?}: {} / mock {}",
        queue(&sc),
        mock_stats(&mock)
    );
    eprintln!("stalled reader: slot free {took:?} after the request");
    // The instance saw its request cancelled, not finished.
    assert_eq!(mock_stats(&mock)["disconnects"], 1, "{}", mock_stats(&mock));
    let lines = access_lines(&sc, |ls| ls.iter().any(|l| l["route"] == "/api/generate"));
    let line = lines
        .iter()
        .find(|l| l["route"] == "/api/generate")
        .unwrap_or_else(|| panic!("no access line; log:\n{}", sc.log_text()));
    assert_eq!(line["outcome"], "write_timeout", "{line}");
    let cut = metric_value(
        sc.admin_port,
        "ollama_sidecar_cancellations_total{phase=\"write_timeout\"}",
    );
    assert_eq!(cut, 1.0);
    drop(s);
    // The slot serves the next client.
    let resp = client()
        .post(sc.url("/api/generate"))
        .body(r#"{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":3}}"#)
        .send()
        .expect("next request");
    assert_eq!(resp.status(), 200);
}

/// Reads HTTP/1.1 responses with a `Content-Length` off `s` until `count` are whole, the
/// connection closes or `limit` passes; returns each response's head (lower-cased) and body.
fn read_responses(s: &mut TcpStream, count: usize, limit: Duration) -> Vec<(String, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let deadline = Instant::now() + limit;
    let mut data = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    while out.len() < count && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        // Take every whole response off the front.
        while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            if head.starts_with("http/1.1 1") {
                data.drain(..end + 4);
                continue;
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if data.len() < end + 4 + len {
                break;
            }
            let body = data[end + 4..end + 4 + len].to_vec();
            data.drain(..end + 4 + len);
            out.push((head, body));
        }
    }
    out
}

fn pipelined_pair(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut both = first.to_vec();
    both.extend_from_slice(second);
    both
}

/// Two requests written back to back before any answer: both are answered, in order, on the
/// inference path and on the proxy path, whether the second arrives with the first or while
/// the first is being served.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let mock = Mock::start(&[("MOCK_TOKEN_DELAY_MS", "20")]);
    let sc = Sidecar::start(&external_instances(&[&mock], 2));
    let generate = |id: &str| {
        raw_request(
            "POST",
            b"/api/generate",
            &[("Content-Type", "application/json"), ("X-Request-Id", id)],
            br#"{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":5}}"#,
        )
    };
    let get = |path: &[u8], id: &str| raw_request("GET", path, &[("X-Request-Id", id)], b"");
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "inference then metadata",
            generate("a1"),
            get(b"/api/version", "a2"),
        ),
        (
            "metadata then inference",
            get(b"/api/tags", "b1"),
            generate("b2"),
        ),
        ("inference then inference", generate("c1"), generate("c2")),
        (
            "metadata then metadata",
            get(b"/api/version", "d1"),
            get(b"/api/tags", "d2"),
        ),
    ];
    let mut failures = Vec::new();
    for (what, first, second) in &cases {
        for together in [true, false] {
            let mut s = TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
            s.set_nodelay(true).ok();
            if together {
                s.write_all(&pipelined_pair(first, second)).expect("send");
            } else {
                // The second request arrives while the first is being served.
                s.write_all(first).expect("send");
                std::thread::sleep(Duration::from_millis(30));
                s.write_all(second).expect("send");
            }
            let got = read_responses(&mut s, 2, Duration::from_secs(10));
            let ids: Vec<String> = got
                .iter()
                .map(|(head, _)| {
                    head.lines()
                        .find_map(|l| l.strip_prefix("x-request-id:"))
                        .unwrap_or("?")
                        .trim()
                        .to_string()
                })
                .collect();
            let statuses: Vec<&str> = got
                .iter()
                .map(|(head, _)| head.split(' ').nth(1).unwrap_or("?"))
                .collect();
            let want: Vec<String> = [first, second]
                .iter()
                .map(|r| {
                    let text = String::from_utf8_lossy(r).to_ascii_lowercase();
                    text.lines()
                        .find_map(|l| l.strip_prefix("x-request-id:"))
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .collect();
            if ids != want || statuses.iter().any(|s| *s != "200") {
                failures.push(format!(
                    "{what} (together: {together}): answered {ids:?} with {statuses:?}, want {want:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let q = queue(&sc);
    assert_eq!(q["held_slots"], 0, "{q}");
}

/// The attack of issue 16: six connections each send most of a large body and then trickle.
/// Bodies held before admission stay within `limits.max_pending_body_bytes` (the rest are
/// refused with 503 and `Retry-After`), and those still trickling get 408 at
/// `limits.body_deadline`: the sidecar's memory does not grow with the attackers.
#[test]
fn trickled_large_bodies_are_bounded_in_memory_and_time() {
    const MIB: usize = 1 << 20;
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&format!(
        "log:\n  format: json\n{}{}",
        limits(&[
            ("max_body", "24MiB"),
            ("max_pending_body_bytes", "24MiB"),
            ("body_read_timeout", "30s"),
            ("body_deadline", "4s"),
        ]),
        external_instances(&[&mock], 2)
    ));
    assert!(wait_until(Duration::from_secs(10), || port_open(
        sc.admin_port
    )));
    // Warm up, then measure the idle resident size.
    for _ in 0..3 {
        let _ = client().get(sc.url("/api/tags")).send().map(|r| r.bytes());
    }
    let idle = sc.rss_kib();
    let attackers: Vec<_> = (0..6)
        .map(|i| {
            let port = sc.port;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_write_timeout(Some(Duration::from_secs(10))).ok();
                let head = format!(
                    "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Id: attack-{i}\r\nContent-Length: {}\r\n\r\n",
                    24 * MIB
                );
                let started = Instant::now();
                let mut ok = s.write_all(head.as_bytes()).is_ok();
                let chunk = vec![b' '; MIB];
                for _ in 0..20 {
                    ok = ok && s.write_all(&chunk).is_ok();
                }
                // Then a byte every 500 ms, for at most 8 s.
                while ok && started.elapsed() < Duration::from_secs(8) {
                    std::thread::sleep(Duration::from_millis(500));
                    ok = s.write_all(b" ").is_ok();
                }
                let mut resp = Vec::new();
                s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let _ = s.read_to_end(&mut resp);
                (started.elapsed(), resp)
            })
        })
        .collect();
    // Sample the resident size while the attack runs.
    let mut peak = idle;
    let mut pending_peak = 0.0f64;
    let pending = "ollama_sidecar_pending_body_bytes";
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        peak = peak.max(sc.rss_kib());
        pending_peak = pending_peak.max(metric_value(sc.admin_port, pending));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The operator sees the bodies being read, never more than the budget.
    assert!(
        pending_peak > 0.0 && pending_peak <= (24 * MIB) as f64,
        "pending_body_bytes peaked at {pending_peak}"
    );
    let results: Vec<_> = attackers
        .into_iter()
        .map(|t| t.join().expect("attacker"))
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || sc.status()["queue"]
            ["pending_body_bytes"]
            == 0),
        "bodies still counted as pending: {}",
        sc.status()["queue"]
    );
    let grew_mib = (peak.saturating_sub(idle)) as f64 / 1024.0;
    eprintln!(
        "six 20 MiB tricklers: idle {} MiB, peak {} MiB (+{grew_mib:.1} MiB); answers: {:?}",
        idle / 1024,
        peak / 1024,
        results
            .iter()
            .map(|(t, r)| (
                t.as_millis(),
                String::from_utf8_lossy(&r[..r.len().min(12)]).into_owned()
            ))
            .collect::<Vec<_>>()
    );
    // 24 MiB of bodies at most, plus buffers: far below the 120 MiB the six would hold.
    assert!(
        grew_mib < 56.0,
        "memory grew by {grew_mib:.1} MiB under the attack"
    );
    // Every attacker was answered: refused for the budget, or cut at the deadline.
    let lines = access_lines(&sc, |ls| {
        ls.iter()
            .filter(|l| {
                l["request_id"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("attack-")
            })
            .count()
            >= 6
    });
    let attack: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["request_id"]
                .as_str()
                .unwrap_or("")
                .starts_with("attack-")
        })
        .collect();
    assert_eq!(attack.len(), 6, "log:\n{}", sc.log_text());
    let refused = attack
        .iter()
        .filter(|l| l["rejection"] == "pending_bodies_full" && l["status"] == 503)
        .count();
    let cut = attack
        .iter()
        .filter(|l| l["rejection"] == "body_deadline" && l["status"] == 408)
        .count();
    // The budget holds one 20 MiB body: the last one standing (if any: refusals race) trickles
    // until the deadline.
    assert!(refused >= 5, "{attack:?}");
    assert_eq!(refused + cut, 6, "{attack:?}");
    // A refusal the client got is in its route's shape, with Retry-After.
    for (_, resp) in &results {
        let text = String::from_utf8_lossy(resp).to_ascii_lowercase();
        if text.starts_with("http/1.1 503") {
            assert!(text.contains("retry-after: 1"), "{text}");
            assert!(text.contains("limits.max_pending_body_bytes"), "{text}");
        }
        if text.starts_with("http/1.1 408") {
            assert!(text.contains("limits.body_deadline"), "{text}");
        }
    }
    // A lone trickler, well within the budget and never silent for `body_read_timeout`, is cut
    // at the deadline.
    let mut s = TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\"",
    )
    .expect("head");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) && s.write_all(b" ").is_ok() {
        std::thread::sleep(Duration::from_millis(300));
        s.set_read_timeout(Some(Duration::from_millis(1))).ok();
        let mut byte = [0u8; 1];
        if s.peek(&mut byte).is_ok() {
            break;
        }
    }
    let took = started.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("limits.body_deadline"), "{text}");
    let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).expect("json");
    assert!(v["error"]["message"].is_string(), "OpenAI's shape: {v}");
    assert!(
        took >= Duration::from_millis(3800) && took < Duration::from_secs(6),
        "cut after {took:?}"
    );
    // Nothing reached admission or the instance, and a normal request is served.
    assert_eq!(queue(&sc)["counters"]["admitted"], 0);
    let resp = client()
        .post(sc.url("/api/chat"))
        .body(r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#)
        .send()
        .expect("chat");
    assert_eq!(resp.status(), 200);
}

/// A model name is the client's: one far longer than any model Ollama can have (its
/// `ParseName` refuses more than 128 bytes) is kept bounded in the access log, the status
/// page's recent refusals and the sidecar's memory, refused or forwarded.
#[test]
fn long_model_names_are_bounded_in_logs_and_state() {
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&format!(
        "log:\n  format: json\npolicy:\n  models: [\"llama3.2*\"]\n{}",
        external_instances(&[&mock], 2)
    ));
    let long = "q".repeat(512 << 10);
    let body = format!(r#"{{"model":"{long}","prompt":"hi","stream":false}}"#);
    let resp = client()
        .post(sc.url("/api/generate"))
        .header("x-request-id", "long-name")
        .body(body)
        .send()
        .expect("generate");
    assert_eq!(resp.status(), 403);
    let text = resp.text().unwrap_or_default();
    assert!(
        text.len() < 1024,
        "the refusal repeats the name: {} bytes",
        text.len()
    );
    let lines = access_lines(&sc, |ls| ls.iter().any(|l| l["request_id"] == "long-name"));
    let line = lines
        .iter()
        .find(|l| l["request_id"] == "long-name")
        .unwrap_or_else(|| panic!("no access line; log:\n{}", sc.log_text()));
    let logged = line["model"].as_str().unwrap_or_default();
    assert!(
        logged.starts_with("qqqq") && logged.len() <= 140,
        "the access log holds a model name of {} bytes",
        logged.len()
    );
    let status = sc.status();
    let refusal = status["recent_refusals"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["request_id"] == "long-name"))
        .cloned()
        .unwrap_or_else(|| panic!("no recent refusal: {status}"));
    assert!(
        refusal["model"].as_str().unwrap_or_default().len() <= 140,
        "the status page keeps a model name of {} bytes",
        refusal.to_string().len()
    );
    // The whole log stays small: the name was not written out anywhere at full length.
    assert!(
        sc.log_text().len() < 64 << 10,
        "{} bytes of log",
        sc.log_text().len()
    );
}
