//! The supervisor, as a user sees it: through the real `ollama-sidecar` binary supervising real
//! `mock-ollama` processes. Every wait is bounded by a count and a time; every process spawned
//! here is killed by a guard, whatever happens.

mod common;

use common::*;
use std::net::TcpListener;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// One supervised instance in the test configuration.
struct Inst {
    name: &'static str,
    command: String,
    /// A port of the test's choosing; else a fresh one on every start attempt
    /// (`Sidecar::port_of(name)` says which).
    port: Option<u16>,
    /// Extra YAML lines for the instance (indented by the caller's convention: 4 spaces).
    extra: String,
}

impl Inst {
    fn new(name: &'static str) -> Inst {
        Inst {
            name,
            command: MOCK.to_string(),
            port: None,
            extra: String::new(),
        }
    }

    fn with(mut self, yaml: &str) -> Inst {
        self.extra.push_str(yaml);
        self
    }
}

fn config_yaml(ports: &mut Ports, instances: &[Inst]) -> String {
    let mut y = format!(
        "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\nshutdown:\n  drain_timeout: 1s\ninstances:\n",
        ports.proxy, ports.admin
    );
    for i in instances {
        let port = i.port.unwrap_or_else(|| ports.port(i.name));
        y.push_str(&format!(
            "  - name: {}\n    command: {}\n    port: {}\n    stop_grace: 3s\n{}",
            i.name, i.command, port, i.extra
        ));
    }
    y
}

/// The sidecar supervising `instances`, listening (the instances may not be ready yet).
fn start(instances: Vec<Inst>) -> Sidecar {
    SidecarCmd::config(move |ports| config_yaml(ports, &instances))
        .env("NO_COLOR", "1")
        .start()
}

/// `/proc/<pid>/stat`: (state, ppid), or `None` when the process does not exist.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Alive: exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .unwrap()
}

/// Polls `url` until it answers `want`, up to `bound`; returns every status seen (or `None`
/// when the bound passed first).
async fn wait_status(url: &str, want: u16, bound: Duration) -> Option<Vec<u16>> {
    let c = client();
    let deadline = Instant::now() + bound;
    let mut seen = Vec::new();
    for _ in 0..(bound.as_millis() / 50 + 1) {
        if let Ok(r) = c.get(url).send().await {
            let s = r.status().as_u16();
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            if s == want {
                return Some(seen);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The mock's own pid, asked on its port directly.
async fn mock_pid(port: u16) -> Option<u32> {
    let r = client()
        .get(format!("http://127.0.0.1:{port}/mock/stats"))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v.get("pid")?.as_u64().map(|p| p as u32)
}

/// Waits up to `bound` for `cond`, checking every 20 ms.
async fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    for _ in 0..(bound.as_millis() / 20 + 1) {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

const READY_BOUND: Duration = Duration::from_secs(20);

#[tokio::test]
async fn proxy_answers_once_the_instance_is_ready() {
    let inst = Inst::new("a").with(&format!(
        "    env:\n      MOCK_START_DELAY_MS: \"1500\"\n    log_file: {}\n",
        "LOGDIR/a.log"
    ));
    // The log file goes in a directory preflight must create.
    let logdir = tempfile::tempdir().unwrap();
    let inst = Inst {
        extra: inst.extra.replace(
            "LOGDIR",
            &logdir.path().join("nested").display().to_string(),
        ),
        ..inst
    };
    let mut sc = start(vec![inst]);
    let port = sc.port_of("a");
    let started = sc.started;
    let seen = wait_status(&sc.url("/api/version"), 200, READY_BOUND)
        .await
        .unwrap_or_else(|| panic!("not ready within {READY_BOUND:?}"));
    assert_eq!(
        seen.first(),
        Some(&503),
        "the proxy must refuse until the instance is ready (statuses seen: {seen:?})"
    );
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // The instance is the sidecar's own child, in its own process group.
    let pid = mock_pid(port).await.expect("mock pid");
    sc.pids.push(pid);
    assert_eq!(proc_stat(pid).map(|s| s.1), Some(sc.pid()));
    // Its output reaches the log file.
    let log = logdir.path().join("nested/a.log");
    assert!(
        eventually(Duration::from_secs(5), || std::fs::metadata(&log)
            .map(|m| m.len() > 0)
            .unwrap_or(false))
        .await,
        "nothing written to {}",
        log.display()
    );
}

#[tokio::test]
async fn kill_9_of_an_instance_is_restarted() {
    let inst = Inst::new("a").with("    restart:\n      initial_backoff: 300ms\n");
    let mut sc = start(vec![inst]);
    let port = sc.port_of("a");
    wait_status(&sc.url("/api/version"), 200, READY_BOUND)
        .await
        .expect("ready");
    let old = mock_pid(port).await.expect("mock pid");
    sc.pids.push(old);
    unsafe { libc::kill(old as i32, libc::SIGKILL) };

    // Back within the backoff (300 ms ± 20 %) plus a start, with room for a busy machine.
    let killed = Instant::now();
    let c = client();
    let mut new = None;
    for _ in 0..200 {
        if killed.elapsed() > Duration::from_secs(10) {
            break;
        }
        let ok = matches!(c.get(sc.url("/api/version")).send().await, Ok(r) if r.status() == 200);
        if ok {
            if let Some(p) = mock_pid(port).await.filter(|&p| p != old) {
                new = Some(p);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = new.unwrap_or_else(|| panic!("not serving again within 10 s of kill -9"));
    sc.pids.push(new);
    assert_ne!(new, old);
    assert!(!process_alive(old));
    // The dead one was reaped by the sidecar: no zombie left behind.
    assert!(
        eventually(Duration::from_secs(2), || proc_stat(old).is_none()).await,
        "pid {old} left as a zombie"
    );
    assert!(sc.log_text().contains("signal 9 (SIGKILL)"));
}

#[tokio::test]
async fn a_crash_looping_instance_does_not_stop_the_healthy_one() {
    let healthy = Inst::new("good");
    // Exits 50 ms after start, before it listens: it never becomes ready. (One that answered in
    // between would be ready for a moment, and a request sent to it then would fail with it.)
    let crashing = Inst::new("bad").with(
        "    env:\n      MOCK_EXIT_AFTER_MS: \"50\"\n      MOCK_START_DELAY_MS: \"5000\"\n    restart:\n      initial_backoff: 100ms\n      max_backoff: 400ms\n      crashloop_after: 3\n",
    );
    let mut sc = start(vec![healthy, crashing]);
    wait_status(&sc.url("/api/version"), 200, READY_BOUND)
        .await
        .expect("ready");
    let c = client();
    let until = Instant::now() + Duration::from_secs(3);
    let mut n = 0;
    while Instant::now() < until && n < 500 {
        let r = c.get(sc.url("/api/version")).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "request {n} failed while `bad` crash-loops"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n > 10);
    let log = sc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("instance=bad") && l.contains("crashloop")),
        "`bad` never reached crashloop"
    );
    // A crash-looping instance does not hold up shutdown, and leaves nothing behind.
    sc.signal(libc::SIGTERM);
    let status = sc
        .wait_exit(Duration::from_secs(10))
        .expect("no exit within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_all_gone(&sc);
}

/// The pids the sidecar logged as spawned.
fn spawned_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("instance spawned"))
        .filter_map(|l| {
            let rest = &l[l.find(" pid=")? + 5..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Every instance process the (exited) sidecar spawned is gone, not even a zombie.
fn assert_all_gone(sc: &Sidecar) {
    let pids = spawned_pids(&sc.log_text());
    assert!(!pids.is_empty());
    for pid in pids {
        assert_eq!(proc_stat(pid), None, "instance pid {pid} still exists");
    }
}

#[tokio::test]
async fn an_instance_that_never_answers_is_killed_at_start_timeout() {
    let inst = Inst::new("slow").with(
        "    start_timeout: 1s\n    env:\n      MOCK_START_DELAY_MS: \"30000\"\n    restart:\n      initial_backoff: 100ms\n",
    );
    let mut sc = start(vec![inst]);
    let found = eventually(Duration::from_secs(15), || {
        sc.log_text()
            .contains("killed by the sidecar: no answer within start_timeout (1s)")
    })
    .await;
    assert!(found, "no start timeout logged");
    let r = client().get(sc.url("/api/version")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    sc.signal(libc::SIGTERM);
    let status = sc
        .wait_exit(Duration::from_secs(10))
        .expect("no exit within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_all_gone(&sc);
}

#[tokio::test]
async fn a_hung_instance_fails_liveness_and_is_replaced() {
    let inst = Inst::new("a")
        .with("    restart:\n      liveness_failures: 1\n      initial_backoff: 100ms\n");
    let mut sc = start(vec![inst]);
    let port = sc.port_of("a");
    wait_status(&sc.url("/api/version"), 200, READY_BOUND)
        .await
        .expect("ready");
    let old = mock_pid(port).await.expect("mock pid");
    sc.pids.push(old);
    // Frozen: it still holds its port, but answers nothing.
    unsafe { libc::kill(old as i32, libc::SIGSTOP) };
    // Liveness every 2 s with a 2 s timeout, then SIGTERM, 3 s grace (a stopped process cannot
    // act on SIGTERM), SIGKILL, 100 ms backoff, start.
    let mut new = None;
    let started = Instant::now();
    for _ in 0..400 {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        if let Some(p) = mock_pid(port).await.filter(|&p| p != old) {
            new = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = new.expect("the hung instance was not replaced within 20 s");
    sc.pids.push(new);
    assert_eq!(proc_stat(old), None, "the hung instance was not reaped");
    let log = sc.log_text();
    assert!(log.contains("killed by the sidecar after 1 failed liveness checks"));
    assert!(log.contains("to=\"unhealthy\""));
    wait_status(&sc.url("/api/version"), 200, READY_BOUND)
        .await
        .expect("serving again");
}

#[tokio::test]
async fn sigterm_stops_the_instances_and_exits_zero() {
    let a = Inst::new("a");
    let b = Inst::new("b");
    let mut sc = start(vec![a, b]);
    let ports = [sc.port_of("a"), sc.port_of("b")];
    for port in ports {
        wait_status(
            &format!("http://127.0.0.1:{port}/api/version"),
            200,
            READY_BOUND,
        )
        .await
        .expect("instance up");
    }
    let mut pids = Vec::new();
    for port in ports {
        let pid = mock_pid(port).await.expect("mock pid");
        sc.pids.push(pid);
        pids.push(pid);
    }
    sc.signal(libc::SIGTERM);
    let status = sc
        .wait_exit(Duration::from_secs(10))
        .expect("no exit within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    // Reaped by the sidecar before it exited: not even a zombie is left.
    for pid in pids {
        assert_eq!(proc_stat(pid), None, "instance pid {pid} still exists");
    }
    assert_all_gone(&sc);
}

#[tokio::test]
async fn sigkill_of_the_sidecar_takes_the_instances_down() {
    let inst = Inst::new("a");
    let mut sc = start(vec![inst]);
    let port = sc.port_of("a");
    wait_status(&sc.url("/api/version"), 200, READY_BOUND)
        .await
        .expect("ready");
    let pid = mock_pid(port).await.expect("mock pid");
    sc.pids.push(pid);
    sc.signal(libc::SIGKILL);
    sc.wait_exit(Duration::from_secs(5)).expect("sidecar exit");
    assert!(
        eventually(Duration::from_secs(2), || !process_alive(pid)).await,
        "instance {pid} outlived the sidecar"
    );
}

/// Runs the sidecar expecting a startup failure; returns (exit status, stderr).
fn startup_failure(instances: &[Inst]) -> (ExitStatus, String) {
    let config = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(config.path(), config_yaml(&mut Ports::fresh(), instances)).unwrap();
    let mut cmd = sidecar_command();
    cmd.arg("--config").arg(config.path());
    let out = run_within(cmd, Duration::from_secs(10));
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_command_is_one_clear_line() {
    let yaml_cmd = "ollama-sidecar-test-no-such-binary";
    let inst = Inst {
        command: yaml_cmd.to_string(),
        ..Inst::new("gpu0")
    };
    let (status, stderr) = startup_failure(&[inst]);
    assert!(!status.success());
    let line = format!(
        "instance `gpu0`: command `{yaml_cmd}` not found on PATH or beside ollama-sidecar; install Ollama or set instances[0].command"
    );
    assert!(
        stderr.lines().any(|l| l.ends_with(&line)),
        "expected a line ending with {line:?} in:\n{stderr}"
    );
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let inst = Inst {
        port: Some(port),
        ..Inst::new("gpu0")
    };
    let (status, stderr) = startup_failure(&[inst]);
    drop(busy);
    assert!(!status.success());
    let line = format!(
        "instance `gpu0`: port {port} is already in use by another process; the sidecar never kills processes it did not start"
    );
    assert!(
        stderr.lines().any(|l| l.ends_with(&line)),
        "expected a line ending with {line:?} in:\n{stderr}"
    );
}

#[test]
fn an_unwritable_log_file_is_a_startup_error() {
    let inst = Inst::new("gpu0").with("    log_file: /proc/ollama-sidecar-test/gpu0.log\n");
    let (status, stderr) = startup_failure(&[inst]);
    assert!(!status.success());
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("instance `gpu0`: cannot write instances[0].log_file")),
        "{stderr}"
    );
}
