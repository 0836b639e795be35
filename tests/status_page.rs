//! The status page in a real browser: the real sidecar with an admin token, an API key and two
//! mock instances, one of them killed, under load with requests waiting; headless Chromium
//! (Debian's `chromium` package) loads `GET /` from the admin listener and the test reads the
//! rendered DOM. It also takes the screenshot the README shows (written to
//! docs/img/status-page.png with `UPDATE_STATUS_PAGE_SCREENSHOT=1`).
//!
//! Without `/usr/bin/chromium` the test is skipped with a message, except in CI (`CI` set), where
//! it fails: `.ci/run` and `./dev.sh test` install the package.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
const ADMIN_TOKEN: &str = "status-page-admin-token-0123456789";
const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef0";

fn have_chromium() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{CHROMIUM} is missing in CI: .ci/run and ./dev.sh test install Debian's `chromium` package"
    );
    eprintln!("SKIPPED: {CHROMIUM} not installed (apt-get install -y chromium)");
    false
}

/// Runs headless Chromium on `url` with `args` (a fresh profile, no background networking: the
/// machine's network is closed), bounded to 90 s; returns its stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let mut proc = Proc { child };
    let exited = proc.wait_exit(Duration::from_secs(90));
    drop(proc);
    assert!(exited.is_some(), "chromium did not finish within 90 s");
    reader.join().unwrap_or_default()
}

/// The `<tr>` of the instances table that names `instance`.
fn instance_row<'a>(dom: &'a str, instance: &str) -> &'a str {
    let table = dom
        .split("<table id=\"instances\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_default();
    table
        .split("<tr>")
        .find(|row| row.contains(&format!("<strong>{instance}</strong>")))
        .unwrap_or_default()
}

fn table<'a>(dom: &'a str, id: &str) -> &'a str {
    dom.split(&format!("<table id=\"{id}\">"))
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_default()
}

/// A streamed chat that holds its slot for `MOCK_TOKENS` x `MOCK_TOKEN_DELAY_MS`, on its own
/// thread; it ends when the stream does or the sidecar goes.
fn chat_in_background(
    port: u16,
    key: &'static str,
    client_id: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let resp = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client")
            .post(format!("http://127.0.0.1:{port}/api/chat"))
            .bearer_auth(key)
            .header("X-Client-Id", client_id)
            .body(r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#)
            .send();
        if let Ok(r) = resp {
            let _ = r.text();
        }
    })
}

#[test]
fn status_page_shows_waiting_clients_and_a_dead_instance_with_its_cause() {
    if !have_chromium() {
        return;
    }
    // m0 streams slowly (30 s a request), so one request holds its only slot; m1 will be killed.
    // (A check timeout of 1 s: a busy mock on a loaded machine must not look dead.)
    let slow = Mock::start(&[("MOCK_TOKENS", "600"), ("MOCK_TOKEN_DELAY_MS", "50")]);
    let doomed = Mock::start(&[]);
    let config = format!(
        "  token_env: SP_ADMIN_TOKEN\n\
         admission:\n  client_id_header: X-Client-Id\n\
         health:\n  interval: 250ms\n  timeout: 1s\n  fall: 2\n  rise: 1\n\
         auth:\n  keys:\n\
         \x20   - name: alice\n      key_env: SP_ALICE\n      requests_per_minute: 100\n      max_concurrent: 4\n\
         \x20   - name: bob\n      key_env: SP_BOB\n      priority: 5\n\
         {}",
        external_instances(&[&slow, &doomed], 1)
    );
    let sc = Sidecar::start_with_env(
        &config,
        &[
            ("SP_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SP_ALICE", ALICE),
            ("SP_BOB", BOB),
        ],
    );
    let status = || -> serde_json::Value {
        client()
            .get(format!("http://127.0.0.1:{}/status", sc.admin_port))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .and_then(|r| r.json())
            .expect("status")
    };
    assert!(
        wait_until(Duration::from_secs(10), || status()["ready"] == true),
        "not ready: {}",
        sc.log_text()
    );

    // Kill m1: its health check fails with the cause.
    let doomed_port = doomed.port;
    drop(doomed);
    let m1_down = wait_until(Duration::from_secs(10), || {
        let s = status();
        s["instances"][1]["health"] == "unhealthy"
            && s["instances"][1]["last_check"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("connection refused"))
    });
    assert!(m1_down, "m1 not unhealthy with its cause: {}", status());

    // Load: alice holds m0's only slot, then alice and bob wait.
    let mut load = vec![chat_in_background(sc.port, ALICE, "laptop-1")];
    assert!(
        wait_until(Duration::from_secs(10), || status()["instances"][0]
            ["busy_slots"]
            == 1),
        "the first request holds no slot: {}",
        status()
    );
    load.push(chat_in_background(sc.port, ALICE, "laptop-2"));
    load.push(chat_in_background(sc.port, BOB, "ci-runner"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            status()["queue"]["waiting"]
                .as_array()
                .is_some_and(|w| w.len() == 2)
        }),
        "two requests should wait: {}",
        status()
    );
    // A refusal: no key.
    let refused = client()
        .post(sc.url("/api/chat"))
        .body(r#"{"model":"llama3.2","messages":[]}"#)
        .send()
        .expect("post");
    assert_eq!(refused.status(), 401);

    let url = format!("http://127.0.0.1:{}/#token={ADMIN_TOKEN}", sc.admin_port);
    let dom = chromium(&url, &["--virtual-time-budget=4000", "--dump-dom"]);
    assert!(dom.contains("ollama-sidecar"), "no page: {dom}");

    // The killed instance: unhealthy, with why.
    let m1 = instance_row(&dom, "m1");
    assert!(m1.contains("unhealthy"), "m1 row: {m1}\n\nDOM: {dom}");
    assert!(
        m1.contains("connection refused") && m1.contains(&format!("127.0.0.1:{doomed_port}")),
        "m1 row lacks its cause: {m1}"
    );
    let m0 = instance_row(&dom, "m0");
    assert!(
        m0.contains("healthy") && m0.contains("1 / 1"),
        "m0 row: {m0}"
    );

    // Who waits: bob (priority 5) first, then alice, each with its key and model.
    let waiting = table(&dom, "waiting");
    let rows: Vec<&str> = waiting.split("<tr>").skip(2).collect();
    assert_eq!(rows.len(), 2, "waiting table: {waiting}");
    assert!(
        rows[0].contains("<td>bob</td>") && rows[0].contains("llama3.2:latest"),
        "first waiter: {}",
        rows[0]
    );
    assert!(
        rows[1].contains("<td>alice</td>"),
        "second waiter: {}",
        rows[1]
    );

    // The refusal with its reason, and the keys against their limits.
    let refusals = table(&dom, "refusals");
    assert!(
        refusals.contains("unauthorized") && refusals.contains("401"),
        "refusals: {refusals}"
    );
    let keys = table(&dom, "keys");
    assert!(
        keys.contains("<td>alice</td>") && keys.contains("/ 100"),
        "keys: {keys}"
    );

    // The screenshot (for the README: after 35 s of this load, so the charts have a few points
    // and the first stream has finished with its tokens).
    let update = std::env::var_os("UPDATE_STATUS_PAGE_SCREENSHOT").is_some();
    if update {
        std::thread::sleep(Duration::from_secs(35));
    }
    let shot_dir = tempfile::tempdir().expect("dir");
    let shot = shot_dir.path().join("status-page.png");
    chromium(
        &url,
        &[
            "--virtual-time-budget=4000",
            "--window-size=1280,1000",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "not a screenshot"
    );
    if update {
        let dest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/img/status-page.png");
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("docs/img");
        std::fs::write(&dest, &png).expect("write screenshot");
    }

    drop(sc);
    for t in load {
        let _ = t.join();
    }
}
