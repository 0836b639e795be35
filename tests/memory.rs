//! Memory comes back after load: glibc keeps freed heap in its arenas, so without the sidecar's
//! trim (`src/memory.rs`) the resident set stays at its peak after a burst of streams ends.

mod common;

use common::*;
use std::io::BufRead;
use std::time::Duration;

/// Enough open streams to grow the sidecar by well over 10 MiB (about 70 KiB each), few enough to
/// stay inside a 1,024 file-descriptor limit (each holds a client and an upstream socket).
const STREAMS: usize = 300;

#[test]
fn resident_memory_falls_back_after_a_burst_of_streams_ends() {
    // First chunk at once, the next a minute later: every stream stays open and idle.
    let mock = Mock::start(&[
        ("MOCK_TOKENS", "3"),
        ("MOCK_TOKEN_DELAY_MS", "60000"),
        ("OLLAMA_NUM_PARALLEL", "1000"),
    ]);
    let sidecar = Sidecar::start(&format!(
        "log:\n  level: warn\n{}",
        external_instances(&[&mock], STREAMS + 10)
    ));
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    // Warm up the allocator and connection pool, then take the baseline.
    for _ in 0..3 {
        let r = client().get(sidecar.url("/api/tags")).send().expect("tags");
        assert_eq!(r.status(), 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = sidecar.rss_kib();

    let mut streams = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let mut reader = post_raw(sidecar.port, "/api/chat", body, "");
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "stream {i}: {status:?}");
        streams.push(reader);
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = sidecar.rss_kib();
    let grown = during.saturating_sub(before);
    assert!(
        grown > 10 * 1024,
        "{STREAMS} open streams grew the sidecar by only {grown} KiB: the test measures nothing"
    );

    drop(streams);
    // Closed streams free their slots at once; the trim follows within two sample intervals.
    let limit = before + grown / 3;
    let mut after = during;
    let fell = wait_until(Duration::from_secs(10), || {
        after = sidecar.rss_kib();
        after <= limit
    });
    assert!(
        fell,
        "resident memory stayed at {after} KiB after the streams closed (baseline {before} KiB, \
         {during} KiB with {STREAMS} streams open; expected at most {limit} KiB)"
    );
}
