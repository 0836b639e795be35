//! Instances named by host names (issue 13): `http://localhost:PORT`, names that do not resolve,
//! and names that move to another address, through the real binary and the system resolver.
//!
//! The tests that control what a name resolves to run the sidecar in a private mount namespace
//! (`unshare --mount`, root only) whose `/etc/hosts` is a file the test owns and whose
//! `/etc/resolv.conf` names 127.0.0.1 as the only nameserver (nothing listens there, so a name
//! absent from the file fails at once and no query leaves the machine). Without root they say so
//! on stderr and return.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// GET `url`: the status and the body as JSON (`Null` when it is not JSON); status 0 and the
/// error when there was no answer (the admin port may open after the proxy port).
fn get_json(url: &str) -> (u16, Value) {
    match client().get(url).send() {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().unwrap_or(Value::Null))
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

fn admin(sidecar: &Sidecar, path: &str) -> (u16, Value) {
    get_json(&format!("http://127.0.0.1:{}{path}", sidecar.admin_port))
}

/// One instance of `/status`.
fn status_of(sidecar: &Sidecar, name: &str) -> Value {
    let (_, status) = admin(sidecar, "/status");
    status["instances"]
        .as_array()
        .and_then(|list| list.iter().find(|i| i["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// Waits (bounded) until `/readyz` says ready; returns its last answer.
fn wait_ready(sidecar: &Sidecar, limit: Duration) -> (u16, Value) {
    let mut last = (0, Value::Null);
    wait_until(limit, || {
        last = admin(sidecar, "/readyz");
        last.0 == 200
    });
    last
}

/// A streamed chat through the sidecar: its NDJSON chunks.
fn streamed_chat(sidecar: &Sidecar) -> Vec<Value> {
    let mut reader = post_raw(
        sidecar.port,
        "/api/chat",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        "",
    );
    let (chunks, ended) = read_json_lines(&mut reader, Duration::from_secs(20));
    assert!(ended, "the stream ended");
    chunks
}

fn assert_streamed_chat(sidecar: &Sidecar) {
    let chunks = streamed_chat(sidecar);
    assert!(chunks.len() > 2, "streamed in chunks: {chunks:?}");
    let last = chunks.last().expect("a chunk");
    assert_eq!(last["done"], true, "{chunks:?}");
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{chunks:?}"
    );
}

/// `(path, Host)` of the client requests (not `/mock/*`) a mock at `ip:port` has logged.
fn hosts_seen(ip: &str, port: u16) -> Vec<(String, String)> {
    let (_, log) = get_json(&format!("http://{ip}:{port}/mock/requests"));
    let list = match &log {
        Value::Array(a) => a.clone(),
        other => other["requests"].as_array().cloned().unwrap_or_default(),
    };
    list.iter()
        .filter_map(|r| {
            let path = r["path"].as_str()?.to_string();
            (!path.starts_with("/mock/"))
                .then(|| (path, logged_header(r, "host").unwrap_or_default()))
        })
        .collect()
}

/// A mock Ollama listening on `ip:port`, `ip` a loopback address (`127.0.0.2`, `[::1]`).
fn mock_at(ip: &str, port: u16) -> Mock {
    MockCmd::new().host(ip).start_on(port)
}

/// A mock Ollama on `ip` and a fresh port.
fn mock_on(ip: &str) -> Mock {
    MockCmd::new().host(ip).start()
}

/// The value of the sample `series` (name and labels exactly as written) in the text format.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn metrics_text(sidecar: &Sidecar) -> String {
    client()
        .get(format!("http://127.0.0.1:{}/metrics", sidecar.admin_port))
        .send()
        .and_then(|r| r.text())
        .expect("metrics")
}

/// A private `/etc/hosts` (and `/etc/resolv.conf`) for a sidecar in its own mount namespace.
struct Names {
    _dir: tempfile::TempDir,
    hosts: PathBuf,
    resolv: PathBuf,
}

impl Names {
    /// `None` (and a loud line on stderr) when this process may not create a mount namespace.
    fn new(test: &str) -> Option<Names> {
        let root = unsafe { libc::geteuid() } == 0;
        let unshare = Command::new("unshare")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !root || !unshare {
            eprintln!(
                "\n*** SKIPPED {test}: it needs root and `unshare` (util-linux) to give the sidecar \
                 its own /etc/hosts; CI runs it as root. ***\n"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let names = Names {
            hosts: dir.path().join("hosts"),
            resolv: dir.path().join("resolv.conf"),
            _dir: dir,
        };
        std::fs::write(
            &names.resolv,
            "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n",
        )
        .expect("write resolv.conf");
        names.map(&[]);
        Some(names)
    }

    /// Rewrites the hosts file in place (truncate and write: the same inode, which the bind
    /// mount keeps showing; a rename would not be seen).
    fn map(&self, entries: &[(&str, &str)]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(&self.hosts, text).expect("write hosts");
    }

    /// The sidecar, in a mount namespace where these files are `/etc/hosts` and
    /// `/etc/resolv.conf`.
    fn sidecar(&self, body: &str) -> Sidecar {
        let (hosts, resolv) = (self.hosts.clone(), self.resolv.clone());
        Sidecar::start_with_command(body, move |config: &Path| {
            let mut cmd = Command::new("unshare");
            cmd.args([
                "--mount",
                "--",
                "sh",
                "-c",
                r#"mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && exec "$3" --config "$4""#,
                "sh",
            ])
            .arg(&hosts)
            .arg(&resolv)
            .arg(SIDECAR)
            .arg(config)
            .env("RUST_LOG", "info");
            cmd
        })
    }
}

/// One instance `a` named `ollama-a.test`, which `/etc/hosts` maps to `entries`, a mock on
/// `mock_ip`, and the sidecar checking it every `interval`, ready.
struct OneNamed {
    names: Names,
    port: u16,
    mock: Mock,
    sidecar: Sidecar,
}

fn one_named(test: &str, entries: &[&str], mock_ip: &str, interval: &str) -> Option<OneNamed> {
    let names = Names::new(test)?;
    let entries: Vec<(&str, &str)> = entries.iter().map(|ip| (*ip, "ollama-a.test")).collect();
    names.map(&entries);
    let mock = mock_on(mock_ip);
    let port = mock.port;
    let sidecar = names.sidecar(&format!(
        "health:\n  interval: {interval}\ninstances:\n  - name: a\n    url: http://ollama-a.test:{port}\n"
    ));
    let (status, ready) = wait_ready(&sidecar, Duration::from_secs(10));
    assert_eq!(status, 200, "{ready}");
    Some(OneNamed {
        names,
        port,
        mock,
        sidecar,
    })
}

impl OneNamed {
    /// The instance restarts on `ip` (same port); `/etc/hosts` is left as it is.
    fn restart_at(&mut self, ip: &str) {
        self.mock.signal(libc::SIGKILL);
        self.mock.wait_exit(Duration::from_secs(5));
        self.mock = mock_at(ip, self.port);
    }

    /// The instance restarts on `ip` and its name now resolves there (a restarted container).
    fn move_to(&mut self, ip: &str) {
        self.restart_at(ip);
        self.names.map(&[(ip, "ollama-a.test")]);
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn localhost_url_serves_chat_tags_and_metadata() {
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "health:\n  interval: 500ms\ninstances:\n  - name: local\n    url: http://localhost:{}\n    num_parallel: 2\n",
        mock.port
    ));
    let (status, ready) = wait_ready(&sidecar, Duration::from_secs(10));
    assert_eq!(
        status, 200,
        "an instance named localhost becomes ready: {ready}"
    );

    assert_streamed_chat(&sidecar);
    let (status, tags) = get_json(&sidecar.url("/api/tags"));
    assert_eq!(status, 200, "{tags}");
    assert!(
        tags["models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == "llama3.2:latest")),
        "{tags}"
    );
    let (status, version) = get_json(&sidecar.url("/api/version"));
    assert_eq!(status, 200, "{version}");
    let show = client()
        .post(sidecar.url("/api/show"))
        .body(r#"{"model":"llama3.2"}"#)
        .send()
        .expect("show");
    assert_eq!(show.status().as_u16(), 200);

    // What the operator wrote goes upstream: `localhost` passes Ollama's host check.
    let written = format!("localhost:{}", mock.port);
    let seen = hosts_seen("127.0.0.1", mock.port);
    for path in ["/api/chat", "/api/tags", "/api/version", "/api/show"] {
        assert!(
            seen.iter().any(|(p, h)| p == path && *h == written),
            "{path} with Host {written}: {seen:?}"
        );
    }
    let inst = status_of(&sidecar, "local");
    assert_eq!(
        inst["address"],
        format!("127.0.0.1:{}", mock.port),
        "{inst}"
    );
    assert_eq!(inst["host_header"], written, "{inst}");
    assert_eq!(inst["health"], "healthy", "{inst}");
}

#[test]
fn ipv6_literal_url_serves() {
    let mock = mock_on("[::1]");
    let port = mock.port;
    let sidecar = Sidecar::start(&format!(
        "instances:\n  - name: v6\n    url: http://[::1]:{port}\n"
    ));
    let (status, ready) = wait_ready(&sidecar, Duration::from_secs(10));
    assert_eq!(status, 200, "{ready}");
    assert_streamed_chat(&sidecar);
    let seen = hosts_seen("[::1]", port);
    assert!(
        seen.iter()
            .any(|(p, h)| p == "/api/chat" && *h == format!("[::1]:{port}")),
        "{seen:?}"
    );
    assert_eq!(
        status_of(&sidecar, "v6")["address"],
        format!("[::1]:{port}")
    );
}

#[test]
fn a_name_that_does_not_resolve_is_reported_and_the_other_instance_serves() {
    let Some(names) =
        Names::new("a_name_that_does_not_resolve_is_reported_and_the_other_instance_serves")
    else {
        return;
    };
    names.map(&[("127.0.0.2", "ollama-a.test")]);
    let mock_a = mock_on("127.0.0.2");
    let (port_a, port_b) = (mock_a.port, free_port());
    let interval = Duration::from_millis(300);
    let sidecar = names.sidecar(&format!(
        "health:\n  interval: 300ms\n  rise: 1\ninstances:\n  - name: a\n    url: http://ollama-a.test:{port_a}\n  - name: b\n    url: http://ollama-b.internal:{port_b}\n"
    ));
    let (status, ready) = wait_ready(&sidecar, Duration::from_secs(10));
    assert_eq!(status, 200, "instance a serves: {ready}");
    assert_eq!(ready["instances"]["a"], "healthy", "{ready}");
    assert_eq!(ready["instances"]["b"], "unresolved", "{ready}");
    let detail = ready["detail"]["b"].as_str().unwrap_or_default();
    assert!(
        detail.contains("cannot resolve ollama-b.internal"),
        "/readyz says why: {ready}"
    );

    // a serves; its name resolves to loopback and is not one Ollama accepts there, so its
    // health checks and the proxied requests say `localhost`.
    assert_streamed_chat(&sidecar);
    let seen = hosts_seen("127.0.0.2", port_a);
    for path in ["/api/version", "/api/chat"] {
        assert!(
            seen.iter()
                .any(|(p, h)| p == path && *h == format!("localhost:{port_a}")),
            "{path}: {seen:?}"
        );
    }

    // Several checks later: still one log line, the reason in /status, the metric counting.
    std::thread::sleep(interval * 5);
    let b = status_of(&sidecar, "b");
    assert_eq!(b["ready"], false, "{b}");
    assert_eq!(b["address"], Value::Null, "{b}");
    assert!(
        b["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot resolve ollama-b.internal")),
        "{b}"
    );
    let failures = metric(
        &metrics_text(&sidecar),
        "ollama_sidecar_instance_resolve_failures_total{instance=\"b\"}",
    )
    .unwrap_or(0.0);
    assert!(failures >= 3.0, "a failed lookup per check: {failures}");
    assert_eq!(
        metric(
            &metrics_text(&sidecar),
            "ollama_sidecar_instance_resolve_failures_total{instance=\"a\"}"
        ),
        Some(0.0)
    );
    let log = sidecar.log_text();
    assert_eq!(
        count(&log, "instance name does not resolve"),
        1,
        "one line when the failures start:\n{log}"
    );

    // b joins as soon as its name resolves, without a restart.
    let _mock_b = mock_at("127.0.0.3", port_b);
    names.map(&[
        ("127.0.0.2", "ollama-a.test"),
        ("127.0.0.3", "ollama-b.internal"),
    ]);
    let joined = Instant::now();
    assert!(
        wait_until(interval * 2 + Duration::from_secs(1), || status_of(
            &sidecar, "b"
        )["health"]
            == "healthy"),
        "b joins within a check or two: {}",
        status_of(&sidecar, "b")
    );
    eprintln!("b joined {:?} after its name resolved", joined.elapsed());
    let b = status_of(&sidecar, "b");
    assert_eq!(b["address"], format!("127.0.0.3:{port_b}"), "{b}");
    assert_eq!(b["reason"], Value::Null, "{b}");
    let (_, ready) = admin(&sidecar, "/readyz");
    assert_eq!(ready["instances_ready"], 2, "{ready}");
    // Metadata requests rotate over both; `.internal` is accepted by Ollama on loopback, so
    // b gets the name as written.
    for _ in 0..4 {
        assert_eq!(get_json(&sidecar.url("/api/version")).0, 200);
    }
    let seen = hosts_seen("127.0.0.3", port_b);
    assert!(
        seen.iter()
            .any(|(p, h)| p == "/api/version" && *h == format!("ollama-b.internal:{port_b}")),
        "{seen:?}"
    );
    let log = sidecar.log_text();
    assert_eq!(count(&log, "instance name resolves again"), 1, "{log}");
    assert_eq!(count(&log, "instance name does not resolve"), 1, "{log}");
}

#[test]
fn a_moved_instance_is_followed_within_one_health_interval() {
    let test = "a_moved_instance_is_followed_within_one_health_interval";
    let Some(mut a) = one_named(test, &["127.0.0.2"], "127.0.0.2", "1s") else {
        return;
    };
    let (port, interval) = (a.port, Duration::from_secs(1));
    assert_streamed_chat(&a.sidecar);
    let pid = a.sidecar.proc.pid();

    // The container restarts on a new address: no traffic in between, only the health checks.
    a.move_to("127.0.0.3");
    let sidecar = &a.sidecar;
    let moved = Instant::now();
    let expected = format!("127.0.0.3:{port}");
    assert!(
        wait_until(interval + Duration::from_secs(1), || status_of(
            sidecar, "a"
        )["address"]
            == expected.as_str()),
        "followed within one health interval: {}",
        status_of(sidecar, "a")
    );
    eprintln!("followed the move in {:?}", moved.elapsed());
    assert_streamed_chat(sidecar);
    let seen = hosts_seen("127.0.0.3", port);
    assert!(
        seen.iter()
            .any(|(p, h)| p == "/api/chat" && *h == format!("localhost:{port}")),
        "{seen:?}"
    );
    assert_eq!(sidecar.proc.pid(), pid, "no restart");
    let log = sidecar.log_text();
    assert_eq!(count(&log, "instance address changed"), 1, "{log}");
}

#[test]
fn a_connect_failure_resolves_the_name_again_at_once() {
    // Checks so rare that only the connect failure can make the sidecar look again.
    let test = "a_connect_failure_resolves_the_name_again_at_once";
    let Some(mut a) = one_named(test, &["127.0.0.2"], "127.0.0.2", "1h") else {
        return;
    };
    let port = a.port;

    a.move_to("127.0.0.3");
    let sidecar = &a.sidecar;
    // The old address refuses: this request fails (it is the only instance)...
    let (status, _) = get_json(&sidecar.url("/api/version"));
    assert_eq!(status, 502);
    // ... and the name is resolved again at once.
    let expected = format!("127.0.0.3:{port}");
    assert!(
        wait_until(Duration::from_secs(2), || status_of(sidecar, "a")
            ["address"]
            == expected.as_str()),
        "{}",
        status_of(sidecar, "a")
    );
    assert_eq!(get_json(&sidecar.url("/api/version")).0, 200);
    assert_streamed_chat(sidecar);
}

#[test]
fn of_several_addresses_the_one_that_answers_is_used_then_the_next_after_a_connect_failure() {
    // No periodic check after the first: only real traffic can move the instance.
    let test =
        "of_several_addresses_the_one_that_answers_is_used_then_the_next_after_a_connect_failure";
    let Some(mut a) = one_named(test, &["127.0.0.2", "127.0.0.3"], "127.0.0.3", "1h") else {
        return;
    };
    let port = a.port;
    let status = status_of(&a.sidecar, "a");
    let (two, three) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    assert_eq!(
        status["addresses"],
        serde_json::json!([two, three]),
        "{status}"
    );
    assert_eq!(
        status["address"], three,
        "the address that answered: {status}"
    );

    // The instance moves to its other address: a request that finds the old one refusing is
    // retried on the next, and the client sees nothing of it.
    a.restart_at("127.0.0.2");
    let sidecar = &a.sidecar;
    let (status, tags) = get_json(&sidecar.url("/api/tags"));
    assert_eq!(status, 200, "{tags}");
    assert!(hosts_seen("127.0.0.2", port)
        .iter()
        .any(|(p, _)| p == "/api/tags"));
    assert_eq!(status_of(sidecar, "a")["address"], two);

    // The same on the inference path (the retry is the parent request's).
    a.restart_at("127.0.0.3");
    let sidecar = &a.sidecar;
    assert_streamed_chat(sidecar);
    assert!(hosts_seen("127.0.0.3", port)
        .iter()
        .any(|(p, h)| p == "/api/chat" && *h == format!("localhost:{port}")));
    assert_eq!(status_of(sidecar, "a")["address"], three);
}
