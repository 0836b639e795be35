//! Binary upgrade through the real binary: a second sidecar started with `--upgrade` takes the
//! listening sockets over while a few hundred requests (streams included) are in flight, the
//! old one is sent SIGQUIT, finishes its requests and exits 0; every client gets its complete
//! answer; the supervised instance is restarted by the new process (docs/adr/0003) and nothing
//! is left running after the new one's SIGTERM.

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKENS: usize = 40;
const STREAM_BODY: &str = r#"{"model":"llama3.2","prompt":"tell me a story"}"#;
const CHAT_BODY: &str =
    r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;

/// A response's JSON lines without what differs between two identical requests (timestamps,
/// durations), re-serialised: equal lists mean the same chunks, in the same order.
fn normalized(body: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut v: Value =
                serde_json::from_str(line).map_err(|e| format!("bad line {line:?}: {e}"))?;
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| k != "created_at" && !k.ends_with("duration"));
            }
            Ok(v.to_string())
        })
        .collect()
}

/// The mock's own answer to `body` on `path`, normalized: what every client must receive.
fn reference(mock_port: u16, path: &str, body: &str) -> Vec<String> {
    let bytes = client()
        .post(format!("http://127.0.0.1:{mock_port}{path}"))
        .body(body.to_string())
        .send()
        .and_then(|r| r.bytes())
        .expect("reference answer from the mock");
    normalized(&bytes).expect("the mock's answer")
}

#[derive(Default)]
struct Load {
    in_flight: AtomicUsize,
    completed: AtomicUsize,
    completed_after_quit: AtomicUsize,
    errors: Mutex<Vec<String>>,
    /// Latencies (ms) of requests sent before SIGQUIT, and of those sent after it.
    before_ms: Mutex<Vec<u64>>,
    after_ms: Mutex<Vec<u64>>,
}

/// One client: requests (streams on even workers) back to back, each checked complete against
/// the mock's own answer, until `stop`.
async fn client_loop(
    worker: usize,
    port: u16,
    load: Arc<Load>,
    expected: Arc<(Vec<String>, Vec<String>)>,
    stop: Arc<AtomicBool>,
    quit_at: Arc<Mutex<Option<Instant>>>,
) {
    // Each worker has its own keep-alive connection, as separate clients would.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let stream = worker.is_multiple_of(2);
    let (path, body, want) = if stream {
        ("/api/generate", STREAM_BODY, &expected.0)
    } else {
        ("/api/chat", CHAT_BODY, &expected.1)
    };
    while !stop.load(Ordering::Acquire) {
        let sent = Instant::now();
        load.in_flight.fetch_add(1, Ordering::AcqRel);
        let outcome = async {
            let resp = http
                .post(format!("http://127.0.0.1:{port}{path}"))
                .body(body)
                .send()
                .await
                .map_err(|e| format!("send: {e:?}"))?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| format!("body: {e:?}"))?;
            if status != 200 {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
            }
            let got = normalized(&bytes)?;
            if &got != want {
                return Err(format!(
                    "incomplete or altered answer ({} of {} lines): {got:?}",
                    got.len(),
                    want.len()
                ));
            }
            Ok(())
        }
        .await;
        load.in_flight.fetch_sub(1, Ordering::AcqRel);
        let quit = *quit_at.lock().unwrap();
        let after_quit = quit.is_some_and(|q| sent >= q);
        match outcome {
            Ok(()) => {
                load.completed.fetch_add(1, Ordering::AcqRel);
                if after_quit {
                    load.completed_after_quit.fetch_add(1, Ordering::AcqRel);
                }
                let ms = sent.elapsed().as_millis() as u64;
                let list = if after_quit {
                    &load.after_ms
                } else {
                    &load.before_ms
                };
                list.lock().unwrap().push(ms);
            }
            Err(e) => load.errors.lock().unwrap().push(format!("{path}: {e}")),
        }
    }
}

fn percentile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p) as usize]
}

#[test]
fn upgrade_under_load_drops_nothing_and_restarts_the_instance_in_the_new_process() {
    const WORKERS: usize = 300;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("upgrade.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    let old = SidecarCmd::config(move |p| {
        let mock_port = p.port("mock");
        format!(
            "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\nshutdown:\n  drain_timeout: 20s\n\
             instances:\n  - name: sup\n    command: {MOCK}\n    port: {mock_port}\n    num_parallel: 64\n    stop_grace: 2s\n    env:\n      MOCK_TOKENS: \"{TOKENS}\"\n      MOCK_TOKEN_DELAY_MS: \"25\"\n      MOCK_NO_REQUEST_LOG: \"1\"\n",
            p.proxy, p.admin
        )
    })
    .args(&["--upgrade-sock", &sock_arg])
    .start();
    let mock_port = old.port_of("mock");
    let host_entry = format!("OLLAMA_HOST=127.0.0.1:{mock_port}");
    assert!(
        wait_until(Duration::from_secs(15), || client()
            .post(old.url("/api/chat"))
            .body(CHAT_BODY)
            .send()
            .is_ok_and(|r| r.status() == 200)),
        "the old sidecar never served: {}",
        old.log_text()
    );
    let old_mock = mock_pid_on(mock_port);
    assert_eq!(parent_pid(old_mock), Some(old.pid()));
    let expected = Arc::new((
        reference(mock_port, "/api/generate", STREAM_BODY),
        reference(mock_port, "/api/chat", CHAT_BODY),
    ));
    assert_eq!(expected.0.len(), TOKENS + 1, "{:?}", expected.0);

    // The load: WORKERS clients, half of them streaming (1 s per stream).
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let quit_at = Arc::new(Mutex::new(None::<Instant>));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            runtime.spawn(client_loop(
                w,
                old.port,
                load.clone(),
                expected.clone(),
                stop.clone(),
                quit_at.clone(),
            ))
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || load
            .completed
            .load(Ordering::Acquire)
            >= 400),
        "the load did not get going: {:?}",
        load.errors.lock().unwrap().first()
    );

    // The new binary waits for the sockets; then the old one is told to hand them over.
    let mut new = old.spawn_successor(&["--upgrade", "--upgrade-sock", &sock_arg], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "the new process never waited on {sock:?}: {}",
        new.log_text()
    );
    let in_flight_at_quit = load.in_flight.load(Ordering::Acquire);
    *quit_at.lock().unwrap() = Some(Instant::now());
    let quit = Instant::now();
    old.signal(libc::SIGQUIT);
    assert!(
        wait_until(Duration::from_secs(10), || listens_on(new.pid(), old.port)
            && listens_on(new.pid(), old.admin_port)),
        "the new process did not take the sockets over: {}",
        new.log_text()
    );
    let mut old = old;
    let status = old.wait_exit(Duration::from_secs(40));
    let old_exit = quit.elapsed();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the old process exits 0 after its drain: {}",
        old.log_text()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{old_mock}")).exists(),
        "the old process stopped its instance {old_mock}"
    );
    // The new process starts its own instance on the freed port, and serves through it.
    let mut new_mock = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            new_mock = processes_with_env(MOCK, &host_entry)
                .into_iter()
                .find(|&p| parent_pid(p) == Some(new.pid()));
            new_mock.is_some()
        }),
        "the new process did not start its instance: {}",
        new.log_text()
    );
    let new_mock = new_mock.unwrap_or_default();
    new.pids.push(new_mock);
    let before = load.completed_after_quit.load(Ordering::Acquire);
    assert!(
        wait_until(Duration::from_secs(20), || load
            .completed_after_quit
            .load(Ordering::Acquire)
            >= before + 300),
        "the new process did not serve the load: {}",
        new.log_text()
    );
    stop.store(true, Ordering::Release);
    for w in workers {
        runtime.block_on(w).expect("worker");
    }
    drop(runtime);

    let errors = load.errors.lock().unwrap().clone();
    let completed = load.completed.load(Ordering::Acquire);
    let after = load.completed_after_quit.load(Ordering::Acquire);
    let mut before_ms = load.before_ms.lock().unwrap().clone();
    let mut after_ms = load.after_ms.lock().unwrap().clone();
    eprintln!(
        "upgrade figures: {WORKERS} clients, {in_flight_at_quit} requests in flight at SIGQUIT, \
         {completed} answered complete ({after} sent after SIGQUIT), {} errors; old process exited \
         {} ms after SIGQUIT; latency ms before SIGQUIT p50 {} p99 {} max {}, after p50 {} p99 {} max {}",
        errors.len(),
        old_exit.as_millis(),
        percentile(&mut before_ms, 0.5),
        percentile(&mut before_ms, 0.99),
        percentile(&mut before_ms, 1.0),
        percentile(&mut after_ms, 0.5),
        percentile(&mut after_ms, 0.99),
        percentile(&mut after_ms, 1.0),
    );
    assert!(
        errors.is_empty(),
        "{} failed requests, e.g. {:?}\nold log:\n{}\nnew log:\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        old.log_text(),
        new.log_text()
    );
    assert!(in_flight_at_quit >= 200, "{in_flight_at_quit} in flight");

    // SIGTERM to the new process: it exits 0, and no mock of this test is left anywhere.
    new.signal(libc::SIGTERM);
    assert_eq!(
        new.wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        new.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || processes_with_env(
            MOCK,
            &host_entry
        )
        .is_empty()),
        "orphans: {:?}",
        processes_with_env(MOCK, &host_entry)
    );
}

#[test]
fn sigquit_without_a_new_process_keeps_the_old_one_serving() {
    let mock = Mock::start(&[]);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("upgrade.sock");
    let mut sidecar = SidecarCmd::new(&external_instances(&[&mock], 4))
        .args(&["--upgrade-sock", sock.to_str().unwrap()])
        .start();
    sidecar.signal(libc::SIGQUIT);
    // The old process waits 5 s for a new one, then gives up and keeps serving.
    assert!(
        wait_until(Duration::from_secs(15), || sidecar
            .log_text()
            .contains("upgrade failed; this process keeps serving")),
        "{}",
        sidecar.log_text()
    );
    assert!(sidecar.wait_exit(Duration::from_millis(200)).is_none());
    let r = client()
        .post(sidecar.url("/api/chat"))
        .body(CHAT_BODY)
        .send()
        .expect("still serving");
    assert_eq!(r.status(), 200);
    assert!(listens_on(sidecar.pid(), sidecar.port));
}

/// Kills a process found by pid on drop (the successor a SIGUSR2 starts is no child of ours).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn sigusr2_starts_the_new_binary_itself_and_hands_over_to_it() {
    let mock = Mock::start(&[]);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("upgrade.sock");
    let mut old = SidecarCmd::new(&external_instances(&[&mock], 4))
        .args(&["--upgrade-sock", sock.to_str().unwrap()])
        .start();
    let config = old.config.path().to_str().unwrap().to_string();
    let old_pid = old.pid();
    old.signal(libc::SIGUSR2);
    assert_eq!(
        old.wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        old.log_text()
    );
    let successors: Vec<u32> = processes_with_arg(SIDECAR, &config)
        .into_iter()
        .filter(|&p| p != old_pid)
        .collect();
    let _guard = KillOnDrop(successors.clone());
    assert_eq!(successors.len(), 1, "{}", old.log_text());
    let new = successors[0];
    assert!(listens_on(new, old.port) && listens_on(new, old.admin_port));
    let r = client()
        .post(old.url("/api/chat"))
        .body(CHAT_BODY)
        .send()
        .expect("the new process serves");
    assert_eq!(r.status(), 200);
    unsafe {
        libc::kill(new as i32, libc::SIGTERM);
    }
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    let ended = || {
        std::fs::read_to_string(format!("/proc/{new}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    assert!(
        wait_until(Duration::from_secs(10), ended),
        "the new process stops on SIGTERM"
    );
}

#[test]
fn sigterm_after_the_hand_over_cuts_the_old_process_drain_short() {
    let mock = Mock::start(&[("MOCK_TOKENS", "400"), ("MOCK_TOKEN_DELAY_MS", "50")]);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("upgrade.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    let mut old = SidecarCmd::new(&format!(
        "shutdown:\n  drain_timeout: 60s\n{}",
        external_instances(&[&mock], 4)
    ))
    .args(&["--upgrade-sock", &sock_arg])
    .start();
    // A 20 s stream keeps the old process draining.
    let mut stream = post_raw(old.port, "/api/generate", STREAM_BODY, "");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stream, &mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let new = old.spawn_successor(&["--upgrade", "--upgrade-sock", &sock_arg], &[]);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    old.signal(libc::SIGQUIT);
    assert!(
        wait_until(Duration::from_secs(15), || old
            .log_text()
            .contains("draining before the exit")),
        "{}",
        old.log_text()
    );
    let term = Instant::now();
    old.signal(libc::SIGTERM);
    assert_eq!(
        old.wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        old.log_text()
    );
    assert!(
        term.elapsed() < Duration::from_secs(5),
        "{:?}",
        term.elapsed()
    );
    assert!(listens_on(new.pid(), old.port), "{}", new.log_text());
}
