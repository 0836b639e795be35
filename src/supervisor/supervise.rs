//! One supervised instance's life, as a loop over runs:
//!
//! ```text
//! Stopped ─▶ Starting ──200 on /api/version──▶ Warming ──warm-up done──▶ Ready
//!              │   ▲                              │   (skipped without    │
//!  exit, spawn │   │ backoff elapsed         exit │    `warmup` models)   │ exit, or liveness_failures
//!  error, start│   │                              │                       │ failed checks in a row
//!  timeout     ▼   │                              ▼                       ▼ (Unhealthy, then killed)
//!            Backoff ◀────────────────────────────┴───────────────────────┘
//!            (Crashloop instead, after crashloop_after restarts without a stable run)
//!
//! stop(), in any state: SIGTERM to the group, stop_grace, SIGKILL to the group, reap ─▶ Stopped
//! ```

use super::backoff::Backoff;
use super::output::{self, LogSink};
use super::preflight::{self, SearchPath};
use super::probe;
use super::process;
use super::stats::{OwnedPid, OwnedPids};
use super::Stop;
use crate::app::App;
use crate::config::SupervisedSpec;
use crate::upstream::{Instance, InstanceState, ProcessInfo};
use std::future::Future;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::process::Child;
use tokio::task::JoinHandle;

/// Readiness: one probe's timeout, and the pause between probes.
pub const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const READY_POLL: Duration = Duration::from_millis(100);
/// Liveness while ready: the interval and one check's timeout.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the output readers may take to drain after the process exits.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// Everything one instance task needs.
pub struct InstanceTask {
    pub app: Arc<App>,
    pub instance: Arc<Instance>,
    pub spec: SupervisedSpec,
    pub owned: Arc<OwnedPids>,
    pub stop: Stop,
    pub search: SearchPath,
}

/// How a run ended.
enum Outcome {
    /// The process ended (or never started); restart it after the backoff.
    Ended {
        /// For `ProcessInfo.last_exit`.
        exit: String,
        /// How long it had been ready (`None`: never ready).
        ready_for: Option<Duration>,
    },
    /// `stop()` was called; the process is reaped (`exit`: how it ended).
    Stopped { exit: String },
}

/// What happened while waiting for something with a running process.
enum Event<T> {
    Done(T),
    Exited(std::io::Result<ExitStatus>),
    Stop,
}

/// A spawned process: its `Child`, its group, and its place in `OwnedPids`. Dropped without
/// being reaped (a panic, a task aborted by runtime shutdown), it SIGKILLs its whole group;
/// `kill_on_drop` makes tokio reap the leader.
struct Running {
    child: Child,
    pid: u32,
    reaped: bool,
    readers: Vec<JoinHandle<()>>,
    _owned: OwnedPid,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            process::signal_group(self.pid, libc::SIGKILL);
        }
    }
}

impl Running {
    /// Waits for `fut` while watching the process and the stop signal.
    async fn watch<F: Future>(&mut self, stop: &mut Stop, fut: F) -> Event<F::Output> {
        tokio::select! {
            biased;
            _ = stop.wait() => Event::Stop,
            status = self.child.wait() => Event::Exited(status),
            out = fut => Event::Done(out),
        }
    }

    /// The process exited by itself: kill what it left in its group.
    fn exited(&mut self, status: std::io::Result<ExitStatus>) -> String {
        self.reaped = true;
        process::kill_leftovers(self.pid);
        match status {
            Ok(s) => process::describe_exit(&s),
            Err(e) => format!("exit status unknown ({e})"),
        }
    }

    /// SIGTERM, grace, SIGKILL, reap.
    async fn terminate(&mut self, grace: Duration) -> String {
        let status = process::terminate(&mut self.child, self.pid, grace).await;
        self.reaped = status.is_some();
        match status {
            Some(s) => process::describe_exit(&s),
            None => "did not exit after SIGKILL".to_string(),
        }
    }
}

impl InstanceTask {
    fn set_state(&self, state: InstanceState) {
        if self.instance.set_state(state) != state {
            self.app.registry.notify_changed();
        }
    }

    fn update_process(&self, f: impl FnOnce(&mut ProcessInfo)) {
        if let Ok(mut p) = self.instance.process.lock() {
            f(&mut p);
        }
    }

    /// Runs the instance, restarting it with backoff, until `stop()`.
    pub async fn run(mut self) {
        let name = self.instance.name.clone();
        let sink = match &self.spec.log_file {
            Some(path) => output::open_sink(path, &name).await,
            None => None,
        };
        let mut backoff = Backoff::new(&self.spec.restart);
        let mut first = true;
        while !self.stop.is_set() {
            if !first {
                self.update_process(|p| p.restarts += 1);
            }
            first = false;
            let (exit, ready_for) = match self.run_once(&sink).await {
                Outcome::Stopped { exit } => {
                    self.update_process(|p| p.last_exit = Some(exit));
                    break;
                }
                Outcome::Ended { exit, ready_for } => (exit, ready_for),
            };
            self.update_process(|p| p.last_exit = Some(exit.clone()));
            backoff.record_exit(ready_for);
            let delay = backoff.delay(rand::random::<f64>());
            let crashloop = backoff.crashlooping();
            // Admission refuses at once a request that could not wait this long.
            let cause = if crashloop {
                "crash loop: next restart"
            } else {
                "restart backoff"
            };
            self.instance
                .set_ready_not_before(Some((std::time::Instant::now() + delay, cause)));
            self.set_state(if crashloop {
                InstanceState::Crashloop
            } else {
                InstanceState::Backoff
            });
            tracing::warn!(
                instance = %name,
                exit = %exit,
                restarts_in_a_row = backoff.failures(),
                crashloop,
                restart_in = %humantime::format_duration(round_ms(delay)),
                "instance ended; restarting"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.wait() => break,
            }
        }
        self.set_state(InstanceState::Stopped);
    }

    /// One run: spawn, wait for readiness, warm up, serve with liveness checks, until the process
    /// ends, is killed, or `stop()`.
    async fn run_once(&mut self, sink: &Option<LogSink>) -> Outcome {
        self.set_state(InstanceState::Starting);
        let ended = |exit: String| Outcome::Ended {
            exit,
            ready_for: None,
        };
        let program = match preflight::resolve_command(&self.spec.command, &self.search) {
            Ok(p) => p,
            Err(e) => return ended(format!("not started: {e}")),
        };
        if !preflight::port_is_free(self.spec.port) {
            return ended(format!(
                "not started: port {} is in use by another process",
                self.spec.port
            ));
        }
        let mut child = match process::command(&program, &self.spec).spawn() {
            Ok(c) => c,
            Err(e) => return ended(format!("not started: `{}`: {e}", program.display())),
        };
        let Some(pid) = child.id() else {
            // Already reaped: cannot happen for a child nobody waited for.
            return ended("exited at once".to_string());
        };
        let owned = self.owned.hold(pid);
        let name: Arc<str> = Arc::from(self.instance.name.as_str());
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(output::capture(out, name.clone(), "stdout", sink.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(output::capture(err, name.clone(), "stderr", sink.clone()));
        }
        let mut running = Running {
            child,
            pid,
            reaped: false,
            readers,
            _owned: owned,
        };
        self.update_process(|p| {
            p.pid = Some(pid);
            p.started_at = Some(SystemTime::now());
        });
        tracing::info!(instance = %name, pid, command = %program.display(), port = self.spec.port, "instance spawned");

        let outcome = self.serve(&mut running).await;

        // The process is gone (reaped, or given up on after SIGKILL). Let the output readers
        // flush the last lines, then forget the pid.
        // (A descendant that left the process group may hold the pipes open: the readers then
        // live on until it dies, and are not waited for.)
        let drain_until = tokio::time::Instant::now() + OUTPUT_DRAIN;
        for r in running.readers.drain(..) {
            let _ = tokio::time::timeout_at(drain_until, r).await;
        }
        drop(running);
        self.update_process(|p| {
            p.pid = None;
            p.cpu_percent = 0.0;
            p.memory_bytes = 0;
        });
        outcome
    }

    /// The phases of one run: each returns `Err` with the run's outcome when the run ends there.
    async fn serve(&mut self, running: &mut Running) -> Outcome {
        if let Err(outcome) = self.start(running).await {
            return outcome;
        }
        if let Err(outcome) = self.warm(running).await {
            return outcome;
        }
        self.stay_ready(running).await
    }

    /// Starting: poll /api/version until 200 or start_timeout.
    async fn start(&mut self, running: &mut Running) -> Result<(), Outcome> {
        let port = self.spec.port;
        let grace = self.spec.stop_grace;
        let deadline = Instant::now() + self.spec.start_timeout;
        loop {
            match running
                .watch(&mut self.stop, probe::version_ok(port, READY_PROBE_TIMEOUT))
                .await
            {
                Event::Done(true) => return Ok(()),
                Event::Done(false) => {}
                Event::Exited(s) => return Err(ended(running.exited(s), None)),
                Event::Stop => return Err(self.stopped(running.terminate(grace).await)),
            }
            if Instant::now() >= deadline {
                tracing::warn!(instance = %self.instance.name, start_timeout = %humantime::format_duration(self.spec.start_timeout), "instance did not answer /api/version in time; killing it");
                let exit = running.terminate(grace).await;
                return Err(ended(
                    format!(
                        "{exit}; killed by the sidecar: no answer within start_timeout ({})",
                        humantime::format_duration(self.spec.start_timeout)
                    ),
                    None,
                ));
            }
            match running
                .watch(&mut self.stop, tokio::time::sleep(READY_POLL))
                .await
            {
                Event::Done(()) => {}
                Event::Exited(s) => return Err(ended(running.exited(s), None)),
                Event::Stop => return Err(self.stopped(running.terminate(grace).await)),
            }
        }
    }

    /// Warming: load each warm-up model; a failure is a warning, not a failed start.
    async fn warm(&mut self, running: &mut Running) -> Result<(), Outcome> {
        if self.spec.warmup.is_empty() {
            return Ok(());
        }
        let port = self.spec.port;
        let grace = self.spec.stop_grace;
        let name = self.instance.name.clone();
        self.set_state(InstanceState::Warming);
        // A cold load takes as long as a first response may: reuse that bound.
        let timeout = self.app.config.timeouts.response_header;
        for model in self.spec.warmup.clone() {
            let mut body = serde_json::json!({ "model": model });
            if let Some(k) = &self.spec.keep_alive {
                body["keep_alive"] = serde_json::Value::String(k.clone());
            }
            let started = Instant::now();
            match running
                .watch(
                    &mut self.stop,
                    probe::post_json(port, "/api/generate", &body, timeout),
                )
                .await
            {
                Event::Done(Ok(a)) if a.status == 200 && !has_error(&a.body) => {
                    tracing::info!(instance = %name, model = %model, took = %humantime::format_duration(round_ms(started.elapsed())), "warm-up model loaded");
                }
                Event::Done(Ok(a)) => {
                    tracing::warn!(instance = %name, model = %model, status = a.status, body = %String::from_utf8_lossy(&a.body[..a.body.len().min(512)]).trim(), "warm-up failed; the instance is ready without it");
                }
                Event::Done(Err(e)) => {
                    tracing::warn!(instance = %name, model = %model, error = %e, "warm-up failed; the instance is ready without it");
                }
                Event::Exited(s) => return Err(ended(running.exited(s), None)),
                Event::Stop => return Err(self.stopped(running.terminate(grace).await)),
            }
        }
        Ok(())
    }

    /// Ready: liveness every LIVENESS_INTERVAL; liveness_failures in a row restart it.
    async fn stay_ready(&mut self, running: &mut Running) -> Outcome {
        let port = self.spec.port;
        let grace = self.spec.stop_grace;
        let name = self.instance.name.clone();
        self.set_state(InstanceState::Ready);
        let ready_at = Instant::now();
        let limit = self.spec.restart.liveness_failures.max(1);
        let mut failures = 0u32;
        loop {
            match running
                .watch(&mut self.stop, tokio::time::sleep(LIVENESS_INTERVAL))
                .await
            {
                Event::Done(()) => {}
                Event::Exited(s) => return ended(running.exited(s), Some(ready_at.elapsed())),
                Event::Stop => return self.stopped(running.terminate(grace).await),
            }
            match running
                .watch(&mut self.stop, probe::version_ok(port, LIVENESS_TIMEOUT))
                .await
            {
                Event::Done(true) => {
                    crate::metrics::global().health_check(&name, "success");
                    failures = 0;
                }
                Event::Done(false) => {
                    crate::metrics::global().health_check(&name, "failure");
                    failures += 1;
                    tracing::warn!(instance = %name, failures, limit, "liveness check failed");
                    if failures >= limit {
                        self.set_state(InstanceState::Unhealthy);
                        let ready_for = ready_at.elapsed();
                        let exit = running.terminate(grace).await;
                        return ended(
                            format!("{exit}; killed by the sidecar after {failures} failed liveness checks"),
                            Some(ready_for),
                        );
                    }
                }
                Event::Exited(s) => return ended(running.exited(s), Some(ready_at.elapsed())),
                Event::Stop => return self.stopped(running.terminate(grace).await),
            }
        }
    }

    /// `stop()` ended the run.
    fn stopped(&self, exit: String) -> Outcome {
        tracing::info!(instance = %self.instance.name, exit = %exit, "instance process stopped");
        Outcome::Stopped { exit }
    }
}

/// The process ended (or was killed) and restarts after the backoff.
fn ended(exit: String, ready_for: Option<Duration>) -> Outcome {
    Outcome::Ended { exit, ready_for }
}

/// Ollama reports a failed load as `{"error": "..."}` (sometimes with status 200 in a stream).
fn has_error(body: &[u8]) -> bool {
    body.split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .any(|v| v.get("error").is_some())
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().min(u64::MAX as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_warmup_bodies() {
        assert!(has_error(b"{\"error\":\"model not found\"}"));
        assert!(has_error(b"{\"done\":false}\n{\"error\":\"x\"}\n"));
        assert!(!has_error(
            b"{\"model\":\"m\",\"done\":true,\"done_reason\":\"load\"}"
        ));
    }
}
