//! Supervision of `ollama serve` processes: one task per supervised instance (`supervise`) runs
//! the process through `Starting → Warming → Ready` and restarts it with backoff when it exits
//! or fails its liveness checks; one sampler task (`stats`) records CPU and memory of each
//! instance's process tree and reaps strays. `stop()` stops them all from any runtime.
//!
//! Modules: `preflight` (checks before start), `process` (spawn, signals, reap), `output`
//! (stdout/stderr capture), `probe` (HTTP readiness, liveness, warm-up), `backoff`, `stats`.

pub mod backoff;
pub mod output;
pub mod preflight;
pub mod probe;
pub mod process;
pub mod stats;
pub mod supervise;

use crate::app::App;
use crate::config::SupervisedSpec;
use crate::upstream::Instance;
use preflight::SearchPath;
use stats::{OwnedPids, Sampler, TreeStats};
use std::sync::Arc;
use std::time::Duration;
use supervise::InstanceTask;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The supervisor's shared control state. A `watch` channel (not a runtime-bound handle), so
/// `stop()` works from any runtime: Pingora calls it from its main runtime while the instance
/// tasks run on the background service's runtime.
#[derive(Debug, Default, Clone, Copy)]
struct Control {
    stopping: bool,
    /// `run()` has been called (it runs once).
    started: bool,
    /// `run()` itself and every instance task still running.
    live: usize,
}

/// The stop signal as a task sees it: the supervisor's `stop()`, or (for an instance task) its
/// instance retired by a reload ([`Supervisor::retire_instance`]).
pub struct Stop(watch::Receiver<Control>, Option<watch::Receiver<bool>>);

impl Stop {
    pub fn is_set(&self) -> bool {
        self.0.borrow().stopping || self.1.as_ref().is_some_and(|r| *r.borrow())
    }

    /// Resolves once `stop()` has been called or the instance retired (at once if it already
    /// was).
    pub async fn wait(&mut self) {
        // An error means the supervisor is gone: stop as well.
        let retired = async {
            match self.1.as_mut() {
                Some(r) => {
                    if r.wait_for(|retired| *retired).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.0.wait_for(|c| c.stopping) => {}
            _ = retired => {}
        }
    }
}

/// Counts a task as live until dropped (also when its runtime drops it unfinished).
struct Live(watch::Sender<Control>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.send_modify(|c| c.live = c.live.saturating_sub(1));
    }
}

pub struct Supervisor {
    app: Arc<App>,
    control: watch::Sender<Control>,
    owned: Arc<OwnedPids>,
    /// Each instance task's retire signal, by instance index (reload).
    retire: std::sync::Mutex<std::collections::HashMap<usize, watch::Sender<bool>>>,
}

/// How long the final stray sweep may take after every instance has stopped.
const FINAL_SWEEP: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Builds the supervisor for every supervised instance in the registry.
    pub fn new(app: &Arc<App>) -> Arc<Supervisor> {
        let (control, _) = watch::channel(Control::default());
        Arc::new(Supervisor {
            app: app.clone(),
            control,
            owned: Arc::new(OwnedPids::default()),
            retire: Default::default(),
        })
    }

    /// The supervised instances: (position in `instances`, spec, registry entry).
    fn supervised(&self) -> Vec<(usize, &SupervisedSpec, Arc<Instance>)> {
        self.app
            .config
            .instances
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let spec = c.supervised.as_ref()?;
                let inst = self.app.registry.get(&c.name)?.clone();
                Some((i, spec, inst))
            })
            .collect()
    }

    /// Checks before anything starts: each command resolves to an executable, each port is
    /// free, the environment holds no NUL byte, each log file can be appended to.
    pub fn preflight(&self) -> Result<(), String> {
        let search = SearchPath::current();
        for (i, spec, inst) in self.supervised() {
            preflight::check_instance(i, &inst.name, spec, &search)?;
        }
        Ok(())
    }

    /// Runs every supervised instance until `stop` is called, and returns once all are stopped.
    /// Must run on a runtime that lives until `stop()` has returned (see `process`).
    pub async fn run(self: Arc<Self>) {
        let mut begin = false;
        self.control.send_if_modified(|c| {
            if c.stopping || c.started {
                return false;
            }
            c.started = true;
            c.live += 1;
            begin = true;
            true
        });
        if !begin {
            return;
        }
        let live = Live(self.control.clone());
        let instances = self.supervised();
        let subreaper = !instances.is_empty() && become_subreaper();

        let mut tasks = JoinSet::new();
        let search = SearchPath::current();
        for (_, spec, instance) in &instances {
            self.control.send_modify(|c| c.live += 1);
            let guard = Live(self.control.clone());
            let task = InstanceTask {
                app: self.app.clone(),
                instance: instance.clone(),
                spec: (*spec).clone(),
                owned: self.owned.clone(),
                stop: Stop(self.control.subscribe(), Some(self.retire_signal(instance))),
                search: search.clone(),
            };
            tasks.spawn(async move {
                task.run().await;
                drop(guard);
            });
        }
        let roots: Vec<Arc<Instance>> = instances.iter().map(|(_, _, i)| i.clone()).collect();
        let sampler = tokio::spawn(sample_loop(
            roots,
            self.owned.clone(),
            Stop(self.control.subscribe(), None),
            subreaper,
        ));

        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "an instance task failed");
            }
        }
        let sampler = sampler.await.ok();
        if subreaper {
            final_sweep(sampler.unwrap_or_default(), &self.owned).await;
        }
        drop(live);
    }

    /// Stops every instance (SIGTERM to its process group, grace, SIGKILL, reap) and returns
    /// when all are gone. Callable from any runtime, any number of times.
    pub async fn stop(&self) {
        self.control.send_modify(|c| c.stopping = true);
        let mut rx = self.control.subscribe();
        let _ = rx.wait_for(|c| c.live == 0).await;
    }

    /// Whether `stop()` has been called.
    pub fn is_stopping(&self) -> bool {
        self.control.borrow().stopping
    }
}

// ---- Reload (src/reload.rs): one instance started or stopped while the others run. ----
impl Supervisor {
    /// A new retire signal for `instance`'s task.
    fn retire_signal(&self, instance: &Instance) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        if let Ok(mut retire) = self.retire.lock() {
            retire.insert(instance.index, tx);
        }
        rx
    }

    /// Starts supervising `instance` (added by a reload) under `spec`, like the instances of
    /// startup; nothing once `stop()` was called. Its preflight errors are returned.
    pub fn add_instance(
        &self,
        instance: Arc<Instance>,
        spec: SupervisedSpec,
        app: Arc<App>,
    ) -> Result<(), String> {
        let search = SearchPath::current();
        preflight::check_instance(instance.index, &instance.name, &spec, &search)?;
        let mut admitted = false;
        self.control.send_if_modified(|c| {
            if c.stopping {
                return false;
            }
            c.live += 1;
            admitted = true;
            true
        });
        if !admitted {
            return Ok(());
        }
        let guard = Live(self.control.clone());
        let task = InstanceTask {
            app,
            stop: Stop(
                self.control.subscribe(),
                Some(self.retire_signal(&instance)),
            ),
            instance,
            spec,
            owned: self.owned.clone(),
            search,
        };
        tokio::spawn(async move {
            task.run().await;
            drop(guard);
        });
        Ok(())
    }

    /// Stops `instance`'s process (SIGTERM to its group, grace, SIGKILL, reap) as `stop()` does
    /// for all; returns once its task has ended.
    pub async fn retire_instance(&self, instance: &Instance) {
        let signal = self
            .retire
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&instance.index));
        if let Some(signal) = signal {
            let _ = signal.send(true);
            // The task holds the receiver until it ends.
            signal.closed().await;
        }
    }
}

/// After every instance is reaped: kill and reap what their processes left behind, for up to
/// `FINAL_SWEEP`.
async fn final_sweep(mut sampler: Sampler, owned: &OwnedPids) {
    let deadline = tokio::time::Instant::now() + FINAL_SWEEP;
    loop {
        let owned = owned.snapshot();
        let r = tokio::task::spawn_blocking(move || {
            sampler.refresh();
            let left = sampler.sweep(&owned);
            (sampler, left)
        })
        .await;
        match r {
            Ok((s, left)) if left > 0 && tokio::time::Instant::now() < deadline => sampler = s,
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes the sidecar the reaper of its instances' orphaned descendants (Ollama's runners whose
/// `ollama serve` died), so they are found and killed by the stray sweep instead of living on
/// under init. Not inherited by children.
fn become_subreaper() -> bool {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot become a child subreaper; orphaned Ollama runners would be left to init");
        return false;
    }
    true
}

/// The one sampler task: every `SAMPLE_INTERVAL`, process-tree stats into each instance's
/// `ProcessInfo`, and (as a subreaper) the stray sweep. Returns its `Sampler` at stop.
async fn sample_loop(
    instances: Vec<Arc<Instance>>,
    owned: Arc<OwnedPids>,
    mut stop: Stop,
    subreaper: bool,
) -> Sampler {
    if instances.is_empty() {
        // Only external instances: no tree to sample and no child to sweep, so no reason to
        // read every process in /proc each interval.
        stop.wait().await;
        return Sampler::default();
    }
    let mut slot: Option<Sampler> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(stats::SAMPLE_INTERVAL) => {}
            _ = stop.wait() => break,
        }
        let pids: Vec<Option<u32>> = instances.iter().map(|i| i.process_info().pid).collect();
        let roots: Vec<u32> = pids.iter().flatten().copied().collect();
        let owned_now = owned.snapshot();
        let mut sampler = slot.take().unwrap_or_default();
        let r = tokio::task::spawn_blocking(move || {
            sampler.refresh();
            let trees = sampler.trees(&roots);
            if subreaper {
                sampler.sweep(&owned_now);
            }
            (sampler, trees)
        })
        .await;
        let Ok((sampler, trees)) = r else {
            continue;
        };
        slot = Some(sampler);
        let mut trees = trees.into_iter();
        for (instance, pid) in instances.iter().zip(pids) {
            let Some(pid) = pid else { continue };
            let tree = trees.next().flatten();
            record(instance, pid, tree);
        }
    }
    slot.unwrap_or_default()
}

/// Writes a sample, unless the process it describes has been replaced meanwhile.
fn record(instance: &Instance, pid: u32, tree: Option<TreeStats>) {
    let Some(t) = tree else { return };
    if let Ok(mut p) = instance.process.lock() {
        if p.pid == Some(pid) {
            tracing::trace!(instance = %instance.name, pid, processes = t.processes, cpu_percent = t.cpu_percent, cpu_seconds = t.cpu_seconds, memory_bytes = t.memory_bytes, "process tree sample");
            p.cpu_percent = t.cpu_percent;
            p.cpu_seconds = t.cpu_seconds;
            p.memory_bytes = t.memory_bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Overrides};
    use crate::upstream::InstanceState;

    fn app(command: &str, args: &str) -> Arc<App> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin:\n  listen: 127.0.0.1:2\ninstances:\n  - name: a\n    command: {command}\n    args: {args}\n    port: {port}\n    stop_grace: 1s\n  - name: ext\n    url: http://127.0.0.1:3\n"
        );
        App::new(parse(&yaml, "test", &Overrides::default()).unwrap())
    }

    /// Only external instances: nothing to sample, so the process table is never read.
    #[tokio::test]
    async fn the_sampler_reads_no_process_table_when_nothing_is_supervised() {
        let (control, receiver) = watch::channel(Control::default());
        let sampling = tokio::spawn(sample_loop(
            Vec::new(),
            Arc::new(OwnedPids::default()),
            Stop(receiver, None),
            false,
        ));
        // Past the first sample, which would have read every process on the host.
        tokio::time::sleep(stats::SAMPLE_INTERVAL + Duration::from_millis(500)).await;
        control.send_modify(|c| c.stopping = true);
        let sampler = tokio::time::timeout(Duration::from_secs(5), sampling)
            .await
            .expect("the sampler stops")
            .expect("the sampler task");
        assert_eq!(sampler.processes_read(), 0);
    }

    #[tokio::test]
    async fn stop_before_run_means_run_never_starts() {
        let app = app("/bin/sh", "['-c', 'exec sleep 30']");
        let sup = Supervisor::new(&app);
        sup.stop().await;
        tokio::time::timeout(Duration::from_secs(1), sup.clone().run())
            .await
            .unwrap();
        assert_eq!(app.registry.all()[0].state(), InstanceState::Stopped);
    }

    /// `run()` on one runtime, `stop()` from another, twice: as Pingora does it.
    #[tokio::test]
    async fn stop_from_another_runtime_reaps_and_ends_run() {
        let app = app("/bin/sh", "['-c', 'exec sleep 30']");
        let sup = Supervisor::new(&app);
        sup.preflight().unwrap();
        let runner = sup.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(runner.run());
        });
        let inst = app.registry.all()[0].clone();
        let mut pid = None;
        for _ in 0..100 {
            pid = inst.process_info().pid;
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = pid.expect("spawned");
        // `sleep` never answers /api/version: still starting.
        assert_eq!(inst.state(), InstanceState::Starting);
        tokio::time::timeout(Duration::from_secs(5), sup.stop())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), sup.stop())
            .await
            .unwrap();
        thread.join().unwrap();
        assert_eq!(inst.state(), InstanceState::Stopped);
        let info = inst.process_info();
        assert_eq!(info.pid, None);
        assert_eq!(info.last_exit.as_deref(), Some("signal 15 (SIGTERM)"));
        // Reaped: not even a zombie.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // The external instance is not the supervisor's business (health checks make it ready).
        assert_eq!(app.registry.all()[1].state(), InstanceState::Starting);
    }
}
