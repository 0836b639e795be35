//! A soak of the admission path: 5,000 requests from 200 concurrent clients, some of which
//! disconnect at random moments (while queued, while waiting for the first byte, while
//! streaming). Afterwards nothing is held and every request is accounted for.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 200;
const PER_CLIENT: usize = 25;

/// One request on a fresh connection; `leave_after` drops the connection after that long.
/// Returns true when the whole stream arrived.
fn one_request(port: u16, client: usize, leave_after: Option<Duration>) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let body = format!(
        r#"{{"model":"llama3.2","messages":[{{"role":"user","content":"soak {client}"}}]}}"#
    );
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Client-Id: c{client}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    if let Some(after) = leave_after {
        std::thread::sleep(after);
        return false;
    }
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    for _ in 0..1000 {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.contains("\"done\":true") => return true,
            Ok(_) => {}
        }
    }
    false
}

fn status(sidecar: &Sidecar) -> Value {
    client()
        .get(format!("http://127.0.0.1:{}/status", sidecar.admin_port))
        .send()
        .and_then(|r| r.json())
        .expect("/status")
}

#[test]
fn five_thousand_requests_with_random_disconnects_leave_nothing_behind() {
    let env = [("MOCK_TOKENS", "4"), ("MOCK_TOKEN_DELAY_MS", "2")];
    let a = Mock::start(&env);
    let b = Mock::start(&env);
    let sidecar = Sidecar::start_with_env(
        &format!(
            "admission:\n  client_id_header: X-Client-Id\nlog:\n  level: warn\n{}",
            external_instances(&[&a, &b], 4)
        ),
        &[("RUST_LOG", "warn")],
    );
    let port = sidecar.port;
    let served = Arc::new(AtomicU64::new(0));
    let left = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (served, left) = (served.clone(), left.clone());
            std::thread::spawn(move || {
                for i in 0..PER_CLIENT {
                    // Deterministic "random" choice: about one in five leaves early, after
                    // 0 to 24 ms (queued, waiting, or mid-stream).
                    let roll = (c * 31 + i * 17) % 100;
                    let leave = (roll < 20).then(|| Duration::from_millis((roll as u64 * 7) % 25));
                    if leave.is_some() {
                        left.fetch_add(1, Ordering::Relaxed);
                    }
                    if one_request(port, c, leave) {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    let total = (CLIENTS * PER_CLIENT) as u64;
    let (served, left) = (served.load(Ordering::Relaxed), left.load(Ordering::Relaxed));
    assert_eq!(served + left, total, "every request that stayed was served");

    // Quiescent within a bound: nothing queued, no slot held, nothing in flight.
    let mut last = Value::Null;
    let quiet = wait_until(Duration::from_secs(5), || {
        last = status(&sidecar);
        last["queue"]["queued"] == 0 && last["queue"]["held_slots"] == 0 && last["in_flight"] == 0
    });
    assert!(quiet, "after the soak: {last:#}");
    let c = &last["queue"]["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    assert_eq!(
        n("admitted"),
        n("released"),
        "every slot given was given back: {c}"
    );
    let accounted = n("admitted") - n("undelivered")
        + n("cancelled")
        + n("refused_full")
        + n("refused_bytes")
        + n("expired")
        + n("closed");
    assert_eq!(
        accounted, total,
        "every request served, refused or cancelled: {c}"
    );
    assert!(
        n("admitted") - n("undelivered") >= served,
        "served requests had slots: {c}"
    );
    // The mocks saw no more than the sidecar admitted, and nothing is running there.
    let upstream = mock_stats(&a)["requests"]["/api/chat"]
        .as_u64()
        .unwrap_or(0)
        + mock_stats(&b)["requests"]["/api/chat"]
            .as_u64()
            .unwrap_or(0);
    assert!(
        upstream <= n("admitted"),
        "{upstream} upstream > admitted: {c}"
    );
    for m in [&a, &b] {
        assert_eq!(mock_stats(m)["inference_in_flight"], 0);
    }
    eprintln!(
        "soak: {total} requests ({served} served, {left} left early) in {elapsed:?}; counters {c}"
    );
}
