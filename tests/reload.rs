//! Configuration reload through the real binary: `POST /reload`, SIGHUP and `--watch` read the
//! file again; a valid file takes effect for new requests at once while requests in flight
//! finish as they started; an invalid one, or one that changes what needs a restart, changes
//! nothing and says why.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::Duration;

const ALICE: &str = "alice-secret-key-0123456789abcdef";
const BOB: &str = "bob-secret-key-0123456789abcdef00";

fn sha(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The instances, then keys for each of `keys`.
fn body_with_keys(mock: &Mock, keys: &[(&str, &str)]) -> String {
    let mut body = external_instances(&[mock], 4);
    body.push_str("auth:\n  keys:\n");
    for (name, key) in keys {
        body.push_str(&format!("    - name: {name}\n      sha256: {}\n", sha(key)));
    }
    body
}

fn generate(sidecar: &Sidecar, key: &str) -> u16 {
    client()
        .post(sidecar.url("/api/generate"))
        .bearer_auth(key)
        .json(&json!({"model": "llama3.2", "prompt": "hi", "stream": false}))
        .send()
        .expect("generate")
        .status()
        .as_u16()
}

fn reloads(sidecar: &Sidecar, result: &str) -> f64 {
    sidecar
        .metric(&format!(
            "ollama_sidecar_config_reloads_total{{result=\"{result}\"}}"
        ))
        .unwrap_or(-1.0)
}

/// Reads a streamed generate to its end: every line, as received.
fn read_stream(port: u16, key: &str) -> Vec<Value> {
    let mut reader = post_raw(
        port,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"count"}"#,
        &format!("Authorization: Bearer {key}\r\n"),
    );
    let mut lines = Vec::new();
    for_each_json_line(&mut reader, Duration::from_secs(30), |v, _| {
        let done = v["done"] == true;
        lines.push(v);
        !done
    });
    lines
}

#[test]
fn a_reload_adds_a_key_at_once_and_a_stream_started_before_it_runs_to_its_end() {
    let mock = Mock::start(&[("MOCK_TOKENS", "30"), ("MOCK_TOKEN_DELAY_MS", "60")]);
    let sidecar = Sidecar::start(&body_with_keys(&mock, &[("alice", ALICE)]));
    assert_eq!(generate(&sidecar, BOB), 401, "bob is not configured yet");
    assert_eq!(sidecar.config_generation(), 1);

    let port = sidecar.port;
    let stream = std::thread::spawn(move || read_stream(port, ALICE));
    // The stream is under way (its first lines took a slot) before the reload.
    assert!(wait_until(Duration::from_secs(10), || {
        sidecar.status()["in_flight"].as_u64() == Some(1)
    }));
    sidecar.rewrite_config(&body_with_keys(&mock, &[("alice", ALICE), ("bob", BOB)]));
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"], "ok");
    assert_eq!(answer["generation"], 2);
    assert_eq!(answer["changed"], json!(["auth.keys"]));
    assert_eq!(generate(&sidecar, BOB), 200, "the new key works at once");
    assert_eq!(generate(&sidecar, ALICE), 200, "the old key still works");

    let lines = stream.join().expect("stream reader");
    // Every token the mock sent, in order, then its final line: nothing lost or cut.
    let text: String = lines
        .iter()
        .filter_map(|v| v["response"].as_str())
        .collect();
    let last = lines.last().expect("lines");
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["eval_count"], 30, "{last}");
    assert_eq!(lines.len(), 31, "30 tokens and the final line");
    assert!(lines.iter().all(|v| v.get("error").is_none()), "{lines:?}");
    // The same text the mock gives for the prompt when asked directly.
    let direct: Value = client()
        .post(mock.url("/api/generate"))
        .json(&json!({"model": "llama3.2", "prompt": "count", "stream": false}))
        .send()
        .and_then(|r| r.json())
        .expect("the mock directly");
    assert_eq!(Some(text.as_str()), direct["response"].as_str());
    assert_eq!(sidecar.config_generation(), 2);
    assert_eq!(reloads(&sidecar, "ok"), 1.0);
    assert_eq!(
        sidecar.metric("ollama_sidecar_config_generation"),
        Some(2.0)
    );
    let loaded = sidecar
        .metric("ollama_sidecar_config_loaded_timestamp_seconds")
        .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - loaded).abs() < 60.0, "loaded at {loaded}, now {now}");
}

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef0123";

#[test]
fn an_invalid_file_changes_nothing_and_reload_says_why() {
    let mock = Mock::start(&[]);
    let body = format!(
        "  token_env: TEST_ADMIN_TOKEN\n{}",
        body_with_keys(&mock, &[("alice", ALICE)])
    );
    let sidecar = SidecarCmd::new(&body)
        .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .start();
    let admin = |path: &str| {
        client()
            .request(
                if path == "/reload" {
                    reqwest::Method::POST
                } else {
                    reqwest::Method::GET
                },
                sidecar.admin_url(path),
            )
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("admin request")
    };
    // Without the token, /reload is refused like /status.
    let (status, _) = sidecar.reload();
    assert_eq!(status, 401);

    // A key with a broken digest: the same message `check` and startup give, nothing applied.
    sidecar.rewrite_config(&format!(
        "{body}    - name: bob\n      sha256: not-a-digest\n"
    ));
    let r = admin("/reload");
    assert_eq!(r.status().as_u16(), 422);
    let answer: Value = r.json().unwrap();
    assert_eq!(answer["result"], "invalid", "{answer}");
    let error = answer["error"].as_str().unwrap();
    let path = sidecar.config.path().display().to_string();
    assert!(
        error.starts_with(&format!("{path}: auth.keys[1].sha256")),
        "{error}"
    );
    let startup = run_to_end({
        let mut check = Command::new(SIDECAR);
        check
            .arg("check")
            .arg("--config")
            .arg(sidecar.config.path());
        check.env("TEST_ADMIN_TOKEN", ADMIN_TOKEN);
        check
    });
    let startup = String::from_utf8_lossy(&startup.stderr);
    assert!(
        startup.contains(error),
        "check says {startup}, reload said {error}"
    );
    assert!(sidecar.log_text().contains(error), "the log has the error");
    assert_eq!(
        generate(&sidecar, ALICE),
        200,
        "the old configuration still runs"
    );

    // A valid file that moves the proxy's listener: refused whole, the new key included.
    let moved = format!(
        "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n{body}    - name: bob\n      sha256: {}\n",
        free_port(),
        sidecar.admin_port,
        sha(BOB)
    );
    sidecar.rewrite_config_text(&moved);
    let r = admin("/reload");
    assert_eq!(r.status().as_u16(), 422);
    let answer: Value = r.json().unwrap();
    assert_eq!(answer["result"], "refused", "{answer}");
    assert_eq!(
        answer["error"], "listen changed: that needs a restart",
        "{answer}"
    );
    assert_eq!(
        generate(&sidecar, BOB),
        401,
        "none of a refused reload applies"
    );

    let status: Value = admin("/status").json().unwrap();
    assert_eq!(status["config"]["generation"], 1);
    let metrics = admin("/metrics").text().unwrap();
    for line in [
        "ollama_sidecar_config_reloads_total{result=\"invalid\"} 1",
        "ollama_sidecar_config_reloads_total{result=\"refused\"} 1",
        "ollama_sidecar_config_reloads_total{result=\"ok\"} 0",
        "ollama_sidecar_config_generation 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[test]
fn sighup_reloads() {
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&body_with_keys(&mock, &[("alice", ALICE)]));
    // The handler is installed by a background service that starts with the server.
    assert!(wait_until(Duration::from_secs(10), || sidecar
        .log_text()
        .contains("reload triggers ready")));
    sidecar.rewrite_config(&body_with_keys(&mock, &[("alice", ALICE), ("bob", BOB)]));
    sidecar.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        sidecar.config_generation() == 2
    }));
    assert_eq!(generate(&sidecar, BOB), 200);
    assert!(sidecar.log_text().contains("trigger=\"SIGHUP\""));
}

#[test]
fn a_changed_file_is_reloaded_with_watch() {
    let mock = Mock::start(&[]);
    let sidecar = SidecarCmd::new(&body_with_keys(&mock, &[("alice", ALICE)]))
        .wrapped(|config| {
            let mut cmd = Command::new(SIDECAR);
            cmd.arg("--config").arg(config).arg("--watch");
            cmd
        })
        .start();
    assert!(wait_until(Duration::from_secs(10), || sidecar
        .log_text()
        .contains("reload triggers ready")));
    sidecar.rewrite_config(&body_with_keys(&mock, &[("alice", ALICE), ("bob", BOB)]));
    assert!(wait_until(Duration::from_secs(10), || {
        sidecar.config_generation() == 2
    }));
    assert_eq!(generate(&sidecar, BOB), 200);
    assert_eq!(sidecar.status()["config"]["watch"], true);
    // An invalid edit is tried once and counted; the running configuration stays.
    sidecar.rewrite_config("instances: [");
    assert!(wait_until(Duration::from_secs(10), || {
        reloads(&sidecar, "invalid") == 1.0
    }));
    assert_eq!(sidecar.config_generation(), 2);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(reloads(&sidecar, "invalid"), 1.0, "once per content");
}

/// A configuration of supervised mocks, each `(name, port)`, streaming 30 tokens slowly.
fn supervised(proxy: u16, admin: u16, instances: &[(&str, u16)]) -> String {
    let mut y = format!(
        "listen: 127.0.0.1:{proxy}\nadmin:\n  listen: 127.0.0.1:{admin}\nshutdown:\n  drain_timeout: 20s\ninstances:\n"
    );
    for (name, port) in instances {
        y.push_str(&format!(
            "  - name: {name}\n    command: {MOCK}\n    port: {port}\n    num_parallel: 1\n    stop_grace: 3s\n    env:\n      MOCK_TOKENS: \"30\"\n      MOCK_TOKEN_DELAY_MS: \"60\"\n"
        ));
    }
    y
}

fn instance<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["instances"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

fn ready(sidecar: &Sidecar, names: &[&str]) -> bool {
    let status = sidecar.status();
    names
        .iter()
        .all(|n| instance(&status, n).is_some_and(|i| i["ready"] == true))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|dead| !dead)
}

fn client_requests_on(port: u16) -> u64 {
    client()
        .get(format!("http://127.0.0.1:{port}/mock/stats"))
        .send()
        .and_then(|r| r.json::<Value>())
        .ok()
        .and_then(|v| v["client_requests"].as_u64())
        .unwrap_or(0)
}

/// Two streams at once, each read to its end: with one slot per instance, one goes to each.
fn two_streams_at_once(port: u16) {
    let streams: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || read_stream(port, "none")))
        .collect();
    for s in streams {
        let lines = s.join().expect("stream");
        assert_eq!(lines.last().map(|l| l["done"] == true), Some(true));
    }
}

#[test]
fn a_removed_instance_finishes_its_stream_then_its_process_is_stopped() {
    let mut sidecar = SidecarCmd::config(|p| {
        let (m1, m2) = (p.port("m1"), p.port("m2"));
        supervised(p.proxy, p.admin, &[("m1", m1), ("m2", m2)])
    })
    .start();
    assert!(wait_until(Duration::from_secs(20), || ready(
        &sidecar,
        &["m1", "m2"]
    )));
    let ports = [("m1", sidecar.port_of("m1")), ("m2", sidecar.port_of("m2"))];
    let pids: Vec<u32> = ports.iter().map(|(_, p)| mock_pid_on(*p)).collect();
    sidecar.pids.extend(&pids);

    let port = sidecar.port;
    let stream = std::thread::spawn(move || read_stream(port, "none"));
    // Which instance serves the stream: that one is removed.
    let mut serving = None;
    assert!(wait_until(Duration::from_secs(10), || {
        let status = sidecar.status();
        serving = ports
            .iter()
            .position(|(name, _)| instance(&status, name).is_some_and(|i| i["in_flight"] == 1));
        serving.is_some()
    }));
    let gone = serving.unwrap();
    let (kept_name, kept_port) = ports[1 - gone];
    let (gone_name, _) = ports[gone];
    sidecar.rewrite_config_text(&supervised(
        sidecar.port,
        sidecar.admin_port,
        &[(kept_name, kept_port)],
    ));
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], json!(["instances"]));
    // Checked while the stream surely runs: the request below takes as long as the stream, so
    // after it the stream may have ended and the process been stopped, rightly.
    assert!(!stream.is_finished(), "the stream ended before the reload");
    assert!(alive(pids[gone]), "stopped before its stream ended");
    // New requests go to the instance that stays, at once.
    let before = client_requests_on(kept_port);
    assert_eq!(generate(&sidecar, "none"), 200);
    assert_eq!(client_requests_on(kept_port), before + 1);

    let lines = stream.join().expect("stream reader");
    let last = lines.last().expect("lines");
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(lines.len(), 31, "the whole stream: {lines:?}");
    assert!(wait_until(Duration::from_secs(10), || !alive(pids[gone])));
    assert!(alive(pids[1 - gone]), "the other instance keeps running");
    let status = sidecar.status();
    assert!(instance(&status, gone_name).is_none(), "{status}");
    assert!(sidecar.log_text().contains("instance removed by reload"));
}

/// A sidecar supervising `m1`, ready, with a port `m2` reserved for a reload to use.
fn m1_ready_with_m2_spare() -> Sidecar {
    let sidecar = SidecarCmd::config(|p| {
        let m1 = p.port("m1");
        p.port("m2");
        supervised(p.proxy, p.admin, &[("m1", m1)])
    })
    .start();
    assert!(wait_until(Duration::from_secs(20), || ready(
        &sidecar,
        &["m1"]
    )));
    sidecar
}

#[test]
fn an_added_instance_starts_and_receives_requests() {
    let mut sidecar = m1_ready_with_m2_spare();
    let (m1, m2) = (sidecar.port_of("m1"), sidecar.port_of("m2"));
    sidecar.rewrite_config_text(&supervised(
        sidecar.port,
        sidecar.admin_port,
        &[("m1", m1), ("m2", m2)],
    ));
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    assert!(wait_until(Duration::from_secs(20), || ready(
        &sidecar,
        &["m1", "m2"]
    )));
    sidecar.pids.push(mock_pid_on(m2));
    // Two requests at once, one slot each: one of them goes to the new instance.
    two_streams_at_once(sidecar.port);
    assert_eq!(client_requests_on(m2), 1, "the added instance served one");
    assert_eq!(client_requests_on(m1), 1);
}

#[test]
fn a_reload_changes_the_log_level() {
    let mock = Mock::start(&[]);
    let body = |level: &str| {
        format!(
            "log:\n  level: {level}\n{}",
            external_instances(&[&mock], 4)
        )
    };
    // RUST_LOG would win over log.level (as at startup).
    let sidecar = SidecarCmd::new(&body("warn")).env("RUST_LOG", "").start();
    let served = |sidecar: &Sidecar| sidecar.log_text().matches("INFO access:").count();
    assert_eq!(generate(&sidecar, "none"), 200);
    assert_eq!(served(&sidecar), 0, "no access line at warn");
    sidecar.rewrite_config(&body("info"));
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], json!(["log"]));
    assert_eq!(generate(&sidecar, "none"), 200);
    assert!(wait_until(Duration::from_secs(5), || served(&sidecar) == 1));
}

#[test]
fn an_added_external_instance_joins_after_its_first_health_check() {
    let slow = [("MOCK_TOKENS", "30"), ("MOCK_TOKEN_DELAY_MS", "60")];
    let (m0, m1) = (Mock::start(&slow), Mock::start(&slow));
    let sidecar = Sidecar::start(&external_instances(&[&m0], 1));
    // Health checks every 200 ms from now on: `health` reloads too.
    sidecar.rewrite_config(&format!(
        "health:\n  interval: 200ms\n{}",
        external_instances(&[&m0, &m1], 1)
    ));
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], json!(["instances", "health"]));
    assert!(wait_until(Duration::from_secs(10), || ready(
        &sidecar,
        &["m0", "m1"]
    )));
    two_streams_at_once(sidecar.port);
    assert_eq!(client_requests(&m1), 1, "the added instance served one");
    assert_eq!(client_requests(&m0), 1);
}

#[test]
fn a_queued_request_moves_to_the_instance_that_replaces_its_own() {
    let mut sidecar = m1_ready_with_m2_spare();
    let (m1, m2) = (sidecar.port_of("m1"), sidecar.port_of("m2"));
    let old = mock_pid_on(m1);
    sidecar.pids.push(old);
    let port = sidecar.port;
    // The stream takes m1's one slot; the second request waits in the queue.
    let stream = std::thread::spawn(move || read_stream(port, "none"));
    assert!(wait_until(Duration::from_secs(10), || {
        sidecar.status()["in_flight"].as_u64() == Some(1)
    }));
    let queued = std::thread::spawn(move || read_stream(port, "none"));
    assert!(wait_until(Duration::from_secs(10), || {
        sidecar.status()["queue"]["queued"].as_u64() == Some(1)
    }));
    sidecar.rewrite_config_text(&supervised(sidecar.port, sidecar.admin_port, &[("m2", m2)]));
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    for (what, lines) in [("stream", stream), ("queued", queued)] {
        let lines = lines.join().expect(what);
        assert_eq!(lines.len(), 31, "{what}: {lines:?}");
    }
    sidecar.pids.push(mock_pid_on(m2));
    assert_eq!(client_requests_on(m2), 1, "the queued request went to m2");
    assert!(wait_until(Duration::from_secs(10), || !alive(old)));
}

#[test]
fn a_changed_supervised_instance_is_restarted_with_its_new_settings() {
    let mut sidecar = m1_ready_with_m2_spare();
    let m1 = sidecar.port_of("m1");
    let old = mock_pid_on(m1);
    sidecar.pids.push(old);
    // The same instance with another environment: its process must start again.
    let changed = supervised(sidecar.port, sidecar.admin_port, &[("m1", m1)])
        .replace("MOCK_TOKENS: \"30\"", "MOCK_TOKENS: \"5\"");
    sidecar.rewrite_config_text(&changed);
    let (status, answer) = sidecar.reload();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], json!(["instances"]));
    assert!(wait_until(Duration::from_secs(20), || !alive(old)
        && ready(&sidecar, &["m1"])));
    let new = mock_pid_on(m1);
    sidecar.pids.push(new);
    assert_ne!(new, old);
    let lines = read_stream(sidecar.port, "none");
    assert_eq!(lines.len(), 6, "5 tokens under the new settings: {lines:?}");
}
