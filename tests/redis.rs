//! Limits shared through Redis (`shared_state`): two real sidecars and a real `redis-server`
//! (Debian's package) on loopback ports. A key's requests, tokens and concurrency slots are
//! counted once for both sidecars; Redis killed, stopped and restarted under them; a sidecar
//! killed with SIGKILL while it holds slots. Every wait is bounded; every process started here is
//! killed by a guard.

mod common;

use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ALICE: &str = "alice-key-0123456789abcdef";

fn sha(secret: &str) -> String {
    format!("{:x}", Sha256::digest(secret.as_bytes()))
}

/// A sidecar with the key `alice` (plus `key_fields`), sharing its limits through `redis`.
fn start_shared(redis: &Redis, mock: &Mock, key_fields: &str, shared_fields: &str) -> Sidecar {
    Sidecar::start(&format!(
        "auth:\n  keys:\n    - name: alice\n      sha256: {}\n{key_fields}shared_state:\n  redis: {}\n{shared_fields}{}",
        sha(ALICE),
        redis.url(),
        external_instances(&[mock], 8)
    ))
}

/// `GET /api/tags` with alice's key: status, `Retry-After`, body.
fn tags(sc: &Sidecar) -> (u16, Option<String>, String) {
    let resp = client()
        .get(sc.url("/api/tags"))
        .header("authorization", format!("Bearer {ALICE}"))
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    (status, retry_after, resp.text().unwrap_or_default())
}

fn chat(sc: &Sidecar, stream: bool) -> reqwest::blocking::Response {
    client()
        .post(sc.url("/api/chat"))
        .header("authorization", format!("Bearer {ALICE}"))
        .body(
            json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":stream})
                .to_string(),
        )
        .send()
        .expect("chat")
}

#[test]
fn two_sidecars_hold_a_key_to_its_combined_limit() {
    const PER_MINUTE: u64 = 300;
    let redis = Redis::start();
    let mock = Mock::start(&[("MOCK_NO_REQUEST_LOG", "1")]);
    let key = format!("      requests_per_minute: {PER_MINUTE}\n");
    let sidecars = [
        start_shared(&redis, &mock, &key, ""),
        start_shared(&redis, &mock, &key, ""),
    ];
    // 2.5 minutes' worth of requests, from 8 clients spread over both sidecars, as fast as
    // they go: without shared limits each sidecar would admit a whole minute's worth.
    let sent = PER_MINUTE * 5 / 2;
    let next = AtomicU64::new(0);
    let admitted = [AtomicU64::new(0), AtomicU64::new(0)];
    let refused = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= sent || started.elapsed() > Duration::from_secs(60) {
                    return;
                }
                let which = (n % 2) as usize;
                let (status, retry_after, body) = tags(&sidecars[which]);
                match status {
                    200 => {
                        admitted[which].fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {
                        assert!(body.contains("requests per minute"), "{body}");
                        assert!(retry_after.is_some(), "429 without Retry-After");
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (a, b) = (
        admitted[0].load(Ordering::Relaxed),
        admitted[1].load(Ordering::Relaxed),
    );
    let total = a + b;
    // The bucket holds a minute's worth and refills continuously while the test runs.
    let allowed = PER_MINUTE as f64 * (1.0 + elapsed / 60.0);
    let error = (total as f64 - allowed) / allowed;
    println!(
        "shared limit: {total} admitted ({a} + {b}) of {sent} in {elapsed:.2} s; the limit allows {allowed:.1}: error {:+.1}%",
        error * 100.0
    );
    assert_eq!(total + refused.load(Ordering::Relaxed), sent);
    assert!(
        error.abs() <= 0.10,
        "{total} admitted, the combined limit allows {allowed:.1}"
    );
    assert!(
        a > PER_MINUTE / 4 && b > PER_MINUTE / 4,
        "both sidecars serve: {a} and {b}"
    );
    assert_eq!(
        redis.integer(&["EXISTS", "ollama-sidecar:key:alice:requests"]),
        1
    );
}

#[test]
fn tokens_and_slots_are_shared_and_per_address_limits_too() {
    let redis = Redis::start();
    // Each stream takes about 40 x 100 ms.
    let mock = Mock::start(&[
        ("MOCK_TOKEN_DELAY_MS", "100"),
        ("MOCK_TOKENS", "40"),
        ("OLLAMA_NUM_PARALLEL", "8"),
    ]);
    // (`allow_anonymous_metadata` closes the key's entry: requests without a key may read
    // metadata, counted by address.)
    let key =
        "      max_concurrent: 2\n      tokens_per_minute: 30\n  allow_anonymous_metadata: true\n";
    let policy = "policy:\n  requests_per_minute_per_client: 4\n";
    let a = start_shared(&redis, &mock, key, policy);
    let b = start_shared(&redis, &mock, key, policy);

    // Two streams on `a` take both slots: `b` refuses a third.
    let first = chat(&a, true);
    let second = chat(&a, true);
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = chat(&b, true);
    assert_eq!(third.status(), 429);
    let text = third.text().unwrap_or_default();
    assert!(text.contains("max_concurrent"), "{text}");
    assert_eq!(
        redis.integer(&["ZCARD", "ollama-sidecar:key:alice:in_flight"]),
        2
    );
    // Their 2 x (prompt + 40) tokens, charged when they end, spend the budget for `b` too.
    for stream in [first, second] {
        assert!(stream.text().expect("stream").contains("\"done\":true"));
    }
    assert!(
        wait_until(Duration::from_secs(15), || {
            let resp = chat(&b, true);
            resp.status() == 429
                && resp
                    .text()
                    .unwrap_or_default()
                    .contains("tokens per minute")
        }),
        "the tokens used through `a` do not count on `b`"
    );
    assert!(wait_until(Duration::from_secs(5), || redis
        .integer(&["EXISTS", "ollama-sidecar:key:alice:in_flight"])
        == 0));

    // Requests without a key are counted per address across both sidecars: 4 per minute.
    let mut ok = 0;
    for i in 0..8 {
        let sc = if i % 2 == 0 { &a } else { &b };
        let status = client()
            .get(sc.url("/api/version"))
            .send()
            .expect("anonymous")
            .status();
        match status.as_u16() {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 4, "the address's 4 requests per minute, across both");

    // The Redis connection's thread does not hold up a clean stop.
    let mut a = a;
    a.proc.signal(libc::SIGTERM);
    let status = a.proc.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn redis_killed_mid_run_then_restarted() {
    let mut redis = Redis::start();
    let port = redis.port;
    let mock = Mock::start(&[]);
    let key = "      requests_per_minute: 1000000\n";
    let open = start_shared(&redis, &mock, key, "");
    let closed = start_shared(&redis, &mock, key, "  on_error: closed\n");
    assert_eq!(tags(&open).0, 200);
    assert_eq!(tags(&closed).0, 200);

    // Traffic on both sidecars all along: before, during and after the outage.
    let stop = AtomicBool::new(false);
    let seen = Mutex::new(Vec::new());
    let redis = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for (name, sc) in [("open", &open), ("closed", &closed)] {
                        let started = Instant::now();
                        let status = tags(sc).0;
                        seen.lock().unwrap().push((name, status, started.elapsed()));
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        redis.proc.signal(libc::SIGKILL);
        assert!(redis.proc.wait_exit(Duration::from_secs(5)).is_some());
        for _ in 0..20 {
            let (status, _, body) = tags(&open);
            assert_eq!(status, 200, "fail open: local limits decide: {body}");
            let (status, retry_after, body) = tags(&closed);
            assert_eq!(status, 503, "fail closed: {body}");
            assert!(body.contains("shared_state.on_error"), "{body}");
            assert_eq!(retry_after.as_deref(), Some("1"));
        }
        assert!(open.log_text().contains("Redis stopped answering"));
        assert_eq!(
            metric_value(open.admin_port, "ollama_sidecar_shared_state_up"),
            0.0
        );

        // Back on the same port, empty: both sidecars reconnect on their own.
        let redis = Redis::start_on(port);
        assert!(
            wait_until(Duration::from_secs(10), || tags(&closed).0 == 200),
            "the closed sidecar did not recover"
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        redis
    });
    let seen = seen.into_inner().unwrap();
    let slowest = seen
        .iter()
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    let unexpected: Vec<_> = seen
        .iter()
        .filter(|(name, status, _)| {
            !matches!((*name, *status), ("open", 200) | ("closed", 200 | 503))
        })
        .collect();
    println!(
        "{} requests during the outage run, slowest {slowest:?}",
        seen.len()
    );
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?} for a dead Redis"
    );
    assert!(seen
        .iter()
        .any(|(name, status, _)| *name == "closed" && *status == 503));

    // Decisions are counted in Redis again, and the fallbacks were counted.
    assert_eq!(tags(&open).0, 200);
    assert_eq!(
        redis.integer(&["EXISTS", "ollama-sidecar:key:alice:requests"]),
        1
    );
    assert_eq!(
        metric_value(open.admin_port, "ollama_sidecar_shared_state_up"),
        1.0
    );
    for (sc, series) in [
        (
            &open,
            "ollama_sidecar_shared_state_fallbacks_total{on_error=\"open\"}",
        ),
        (
            &closed,
            "ollama_sidecar_shared_state_fallbacks_total{on_error=\"closed\"}",
        ),
        (
            &closed,
            "ollama_sidecar_rejections_total{reason=\"limits_unavailable\"}",
        ),
    ] {
        assert!(metric_value(sc.admin_port, series) >= 20.0, "{series}");
    }
}

#[test]
fn a_stopped_redis_costs_a_request_at_most_the_timeout() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let sc = start_shared(
        &redis,
        &mock,
        "      requests_per_minute: 1000\n",
        "  timeout: 50ms\n  on_error: closed\n",
    );
    assert_eq!(tags(&sc).0, 200);
    // SIGSTOP: the socket stays open and accepts bytes, nothing answers.
    redis.proc.signal(libc::SIGSTOP);
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let (status, _, body) = tags(&sc);
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 503, "{body}");
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?} for a stopped Redis"
    );
    assert!(
        metric_value(
            sc.admin_port,
            "ollama_sidecar_shared_state_errors_total{kind=\"timeout\"}"
        ) >= 1.0
    );
    redis.proc.signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(10), || tags(&sc).0 == 200),
        "no recovery after SIGCONT"
    );
}

#[test]
fn slots_of_a_sidecar_killed_with_sigkill_come_back_after_the_lease() {
    let redis = Redis::start();
    // A stream lasts about 100 x 100 ms: longer than the test needs it.
    let mock = Mock::start(&[
        ("MOCK_TOKEN_DELAY_MS", "100"),
        ("MOCK_TOKENS", "100"),
        ("OLLAMA_NUM_PARALLEL", "8"),
    ]);
    let key = "      max_concurrent: 2\n";
    let lease = "  lease_ttl: 2s\n";
    let mut a = start_shared(&redis, &mock, key, lease);
    let b = start_shared(&redis, &mock, key, lease);
    let held = [chat(&a, true), chat(&a, true)];
    assert!(held.iter().all(|r| r.status() == 200));

    // Renewed while `a` lives: still held after twice the lease.
    std::thread::sleep(Duration::from_millis(4500));
    let refused = chat(&b, true);
    assert_eq!(refused.status(), 429, "the leases expired while held");

    a.proc.signal(libc::SIGKILL);
    assert!(a.proc.wait_exit(Duration::from_secs(5)).is_some());
    let killed = Instant::now();
    assert_eq!(
        chat(&b, true).status(),
        429,
        "slots given back before the lease ran out"
    );
    assert!(
        wait_until(Duration::from_secs(5), || chat(&b, true).status() == 200),
        "the dead sidecar's slots were not given back"
    );
    let back = killed.elapsed();
    println!("slots came back {back:?} after SIGKILL (lease_ttl 2s)");
    assert!(back <= Duration::from_millis(3500), "{back:?}");
    drop(held);
}
