//! The chaos soak, through the real binary: 200 clients on a mix of routes (streamed and not,
//! `/api` and `/v1`), some leaving early, some never reading, some trickling their bodies, while
//! the supervised instances are killed with SIGKILL every few seconds. Every request must end as
//! served, refused with a JSON error, or an in-band error line; none may hang. Afterwards nothing
//! is queued or held, the request counters add up to what the clients sent, memory is back near
//! idle, and SIGTERM leaves no process behind. The counts are printed (`--nocapture`).
//!
//! `SOAK_SECONDS` sets the load's length (default 30), `SOAK_CLIENTS` the clients (default 200).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each request's end, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Served,
    /// Refused or failed by the sidecar with a JSON error body, by status.
    Refused(u16),
    /// The stream began and ended with an error line in its framing.
    InBandError,
    /// The client left on purpose (early leaver, non-reader, abandoned trickle).
    Abandoned,
    /// Anything else: a defect.
    Broken(String),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    NativeStream,
    NativeWhole,
    OpenAiStream,
    OpenAiWhole,
    LeavesEarly,
    NeverReads,
    TrickledBody,
}

/// The mix: mostly ordinary clients, a fifth of them misbehaving.
fn kind_for(roll: u64) -> Kind {
    match roll % 100 {
        0..=34 => Kind::NativeStream,
        35..=49 => Kind::NativeWhole,
        50..=64 => Kind::OpenAiStream,
        65..=79 => Kind::OpenAiWhole,
        80..=87 => Kind::LeavesEarly,
        88..=93 => Kind::NeverReads,
        _ => Kind::TrickledBody,
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny xorshift: the mix differs per client without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn body_for(kind: Kind) -> (&'static str, String) {
    let chat = |stream: bool| {
        serde_json::json!({
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
            "options": {"num_predict": 20},
            "max_tokens": 20,
        })
        .to_string()
    };
    match kind {
        Kind::NativeStream | Kind::LeavesEarly => ("/api/chat", chat(true)),
        Kind::NativeWhole => (
            "/api/generate",
            serde_json::json!({"model": "llama3.2", "prompt": "hi", "stream": false,
                "options": {"num_predict": 20}})
            .to_string(),
        ),
        Kind::OpenAiStream => ("/v1/chat/completions", chat(true)),
        Kind::OpenAiWhole => ("/v1/chat/completions", chat(false)),
        // The longest answer the mock gives, so that not reading it matters.
        Kind::NeverReads => (
            "/api/generate",
            serde_json::json!({"model": "llama3.2", "prompt": "hi"}).to_string(),
        ),
        Kind::TrickledBody => ("/api/chat", chat(true)),
    }
}

fn connect(port: u16) -> Option<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(10))).ok()?;
    Some(s)
}

fn head(path: &str, len: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

/// Reads a whole `Connection: close` response: status and decoded body; what was read before a
/// read error is kept (a broken stream's in-band error line comes before the close).
fn read_response(mut s: TcpStream) -> Result<(u16, Vec<u8>), String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut error = None;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(format!("no response head ({error:?}, {} bytes)", raw.len()));
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let rest = &raw[split + 4..];
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_vec()
        },
    ))
}

/// The data of a chunked body, as far as it goes.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        rest = &rest[eol + 2..];
        if size == 0 {
            break;
        }
        let take = size.min(rest.len());
        body.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        rest = rest.strip_prefix(b"\r\n").unwrap_or(rest);
    }
    body
}

/// How a response the client read to its end came out.
fn judge(path: &str, stream: bool, status: u16, body: &[u8]) -> End {
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        return match json {
            Some(v) if v.get("error").is_some() => End::Refused(status),
            _ => End::Broken(format!("{status} without a JSON error: {text:.200}")),
        };
    }
    let in_band = text.contains("{\"error\"") || text.contains("data: {\"error\"");
    let complete = if !stream {
        serde_json::from_slice::<serde_json::Value>(body).is_ok()
    } else if path.starts_with("/v1/") {
        text.trim_end().ends_with("data: [DONE]")
    } else {
        text.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"done\":true"))
    };
    match (complete, in_band) {
        (true, false) => End::Served,
        (_, true) => End::InBandError,
        (false, false) => End::Broken(format!("incomplete 200: {:.200}", text)),
    }
}

fn one_request(port: u16, kind: Kind, rng: &mut Rng) -> End {
    let (path, body) = body_for(kind);
    let Some(mut s) = connect(port) else {
        return End::Broken("connect failed".into());
    };
    let stream = !matches!(kind, Kind::NativeWhole | Kind::OpenAiWhole);
    match kind {
        Kind::TrickledBody => {
            if s.write_all(head(path, body.len()).as_bytes()).is_err() {
                return End::Broken("head not sent".into());
            }
            // Ten bytes every 200 ms; half the trickles are abandoned part-way.
            let abandon = rng.next().is_multiple_of(2);
            for (i, piece) in body.as_bytes().chunks(10).enumerate() {
                if abandon && i == 5 {
                    return End::Abandoned;
                }
                if s.write_all(piece).is_err() {
                    // The sidecar gave up on the body (408): read its answer.
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        _ => {
            let mut req = head(path, body.len()).into_bytes();
            req.extend_from_slice(body.as_bytes());
            if s.write_all(&req).is_err() {
                return End::Broken("request not sent".into());
            }
        }
    }
    match kind {
        Kind::LeavesEarly => {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            End::Abandoned
        }
        Kind::NeverReads => {
            std::thread::sleep(Duration::from_millis(1000 + rng.next() % 3000));
            End::Abandoned
        }
        _ => match read_response(s) {
            Ok((status, body)) => judge(path, stream, status, &body),
            Err(e) => End::Broken(e),
        },
    }
}

/// The supervised instances' pids, as `/status` reports them.
fn supervised_pids(sc: &Sidecar) -> Vec<u32> {
    let status = sc.status();
    status["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| i["process"]["pid"].as_u64().or(i["pid"].as_u64()))
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.get(s.rfind(')')? + 2..).and_then(|r| r.chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

#[test]
fn two_hundred_clients_while_instances_are_killed() {
    let seconds = env_or("SOAK_SECONDS", 30);
    let clients = env_or("SOAK_CLIENTS", 200);
    let mut sc = SidecarCmd::config(|ports| {
        let mut y = format!(
            "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\nshutdown:\n  drain_timeout: 5s\nlimits:\n  body_read_timeout: 2s\n  write_timeout: 3s\nadmission:\n  max_wait: 20s\ninstances:\n",
            ports.proxy, ports.admin
        );
        for name in ["s0", "s1"] {
            y.push_str(&format!(
                "  - name: {name}\n    command: {MOCK}\n    port: {}\n    num_parallel: 4\n    stop_grace: 2s\n    env:\n      MOCK_TOKENS: \"400\"\n      MOCK_TOKEN_DELAY_MS: \"3\"\n",
                ports.port(name)
            ));
        }
        y
    })
    .env("NO_COLOR", "1")
    .start();
    assert!(
        wait_until(Duration::from_secs(20), || supervised_pids(&sc).len() == 2),
        "the supervised instances did not start: {}",
        sc.log_text()
    );
    // Idle memory, after one request warmed the paths up.
    let warm = one_request(sc.port, Kind::NativeWhole, &mut Rng(7));
    assert_eq!(warm, End::Served);
    let idle_kib = sc.rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let ends: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let broken: Arc<Mutex<Vec<String>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut threads = Vec::new();
    for c in 0..clients {
        let (stop, ends, broken, sent) = (stop.clone(), ends.clone(), broken.clone(), sent.clone());
        let port = sc.port;
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
            // A bounded count as well as the deadline.
            for _ in 0..10_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break;
                }
                let kind = kind_for(rng.next());
                sent.fetch_add(1, Ordering::Relaxed);
                let end = one_request(port, kind, &mut rng);
                let label = match &end {
                    End::Refused(status) => format!("refused {status}"),
                    End::Broken(why) => {
                        broken.lock().unwrap().push(format!("{kind:?}: {why}"));
                        "broken".to_string()
                    }
                    other => format!("{other:?}").to_lowercase(),
                };
                *ends.lock().unwrap().entry(label).or_default() += 1;
            }
        }));
    }
    // The killer: one supervised instance every 3 s.
    let mut kills = 0;
    let mut seen_pids = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(3).min(deadline - Instant::now()));
        let pids = supervised_pids(&sc);
        seen_pids.extend(pids.iter().copied());
        if let Some(&pid) = pids.get(kills % pids.len().max(1)) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            kills += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let joined = Instant::now();
    for t in threads {
        t.join().expect("client thread");
    }
    let drain = joined.elapsed();

    // Nothing queued or held once the clients are gone.
    let settled = wait_until(Duration::from_secs(20), || {
        let s = sc.status();
        s["in_flight"] == 0
            && s["queue"]["queued"] == 0
            && s["instances"]
                .as_array()
                .is_some_and(|l| l.iter().all(|i| i["busy_slots"].as_u64().unwrap_or(0) == 0))
    });
    let status = sc.status();
    // Every request the clients sent is counted once, whatever its end.
    let total_sent = sent.load(Ordering::Relaxed) + 1;
    let counted = wait_until(Duration::from_secs(10), || {
        metric_sum(sc.admin_port, "ollama_sidecar_requests_total") as u64 == total_sent
    });
    let requests_total = metric_sum(sc.admin_port, "ollama_sidecar_requests_total");
    // Memory back near idle (the allocator returns freed memory once load falls).
    let after_kib = {
        let mut rss = sc.rss_kib();
        wait_until(Duration::from_secs(15), || {
            rss = sc.rss_kib();
            rss <= idle_kib + 64 * 1024
        });
        rss
    };
    seen_pids.extend(supervised_pids(&sc));

    let ends = ends.lock().unwrap().clone();
    let broken = broken.lock().unwrap().clone();
    println!(
        "soak: {clients} clients, {seconds} s, {total_sent} requests, {kills} SIGKILLs; ends {ends:?}; clients joined in {drain:?}; requests_total {requests_total}; rss idle {idle_kib} KiB, after {after_kib} KiB"
    );
    assert!(
        broken.is_empty(),
        "{} broken: {:#?}",
        broken.len(),
        &broken[..broken.len().min(20)]
    );
    assert!(settled, "still held after the load: {status:#}");
    assert!(
        counted,
        "requests_total {requests_total} != {total_sent} sent"
    );
    assert!(
        after_kib <= idle_kib + 64 * 1024,
        "memory {after_kib} KiB after the load, {idle_kib} KiB idle"
    );
    assert!(kills >= seconds as usize / 3 - 1, "only {kills} kills");
    assert!(ends.get("served").copied().unwrap_or(0) > 0, "{ends:?}");

    // SIGTERM: the sidecar exits and no instance it ever ran is left.
    sc.signal(libc::SIGTERM);
    let exit = sc.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some_and(|e| e.success()), "exit {exit:?}");
    seen_pids.sort_unstable();
    seen_pids.dedup();
    let left: Vec<u32> = seen_pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
