//! Configuration reload: its three triggers (SIGHUP, a change of the file with `--watch`, and
//! `POST /reload` on the admin listener) and the one procedure they share.
//!
//! The file is read again with the overrides of startup (`--listen`, `OLLAMA_SIDECAR_LISTEN`,
//! ...) and validated by the same code as at startup. An invalid file, or a change that needs a
//! restart ([`needs_restart`]), changes nothing: the reload is all or none of it. Otherwise the
//! next generation of the shared state ([`App::next`]) is published: requests that arrive from
//! now on use it, requests in flight finish under the generation they took when they arrived.

use crate::app::App;
use crate::config::{self, Config};
use crate::metrics;
use crate::policy::Policy;
use crate::supervisor::Supervisor;
use async_trait::async_trait;
use http::StatusCode;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde_json::{json, Value};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The admin listener's path that reloads (POST, behind the admin token).
pub const PATH: &str = "/reload";

/// How often `--watch` reads the file. A change is taken once the file has read the same on two
/// polls in a row (an editor that writes in steps is not caught half-way).
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// How a reload ended.
#[derive(Debug)]
pub enum Outcome {
    /// The new configuration runs: its generation and the sections that changed.
    Applied {
        generation: u64,
        changed: Vec<&'static str>,
    },
    /// The file did not validate (the message is the one startup would print).
    Invalid(String),
    /// The file is valid but changes what only a restart can.
    Refused(String),
}

impl Outcome {
    /// The `result` label of `config_reloads_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "ok",
            Outcome::Invalid(_) => "invalid",
            Outcome::Refused(_) => "refused",
        }
    }
}

/// `/reload`'s answer: 200 with the generation now running, or 422 with why nothing changed.
pub fn answer(outcome: Outcome) -> (StatusCode, Value) {
    let result = outcome.label();
    match outcome {
        Outcome::Applied {
            generation,
            changed,
        } => (
            StatusCode::OK,
            json!({"result": result, "generation": generation, "changed": changed}),
        ),
        Outcome::Invalid(error) | Outcome::Refused(error) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"result": result, "error": error}),
        ),
    }
}

/// The running configuration in `/status`.
pub fn status(app: &App) -> Value {
    json!({
        "generation": app.generation,
        "loaded_at_unix": unix_seconds(app.loaded_at),
        "source": app.config.source,
        "watch": app.config.watch,
    })
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One reload at a time: two triggers at once would otherwise build two generations from the
/// same predecessor.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads, validates and applies the configuration file again; `trigger` names the cause in the
/// log (`SIGHUP`, `watch`, `http`).
pub async fn reload(app: &Arc<App>, trigger: &'static str) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().await;
    let current = app.current();
    let outcome = match read_again(&current.config).await {
        Err(error) => Outcome::Invalid(error),
        Ok(next) => match needs_restart(&current.config, &next) {
            Some(refused) => Outcome::Refused(refused),
            None => match InstancePlan::new(&current.config, &next).preflight() {
                Err(error) => Outcome::Invalid(error),
                Ok(plan) => apply(&current, next, plan),
            },
        },
    };
    metrics::global().config_reload(outcome.label());
    match &outcome {
        // The same one line as startup's, with the reload's cause.
        Outcome::Invalid(error) => tracing::error!(
            trigger,
            "reload: invalid configuration: {error}; nothing changed"
        ),
        Outcome::Refused(error) => {
            tracing::error!(trigger, "reload refused: {error}; nothing changed")
        }
        Outcome::Applied {
            generation,
            changed,
        } => tracing::info!(
            trigger,
            generation,
            changed = %changed.join(","),
            "configuration reloaded"
        ),
    }
    outcome
}

/// The file read and validated as at startup (same overrides), off the async workers: secrets
/// may be files, and validation reads them.
async fn read_again(current: &Config) -> Result<Config, String> {
    let path = PathBuf::from(&current.source);
    let overrides = current.overrides.clone();
    let watch = current.watch;
    let loaded = tokio::task::spawn_blocking(move || config::load(&path, &overrides)).await;
    match loaded {
        Ok(Ok(mut next)) => {
            next.watch = watch;
            Ok(next)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("cannot read the configuration: {e}")),
    }
}

/// What a running sidecar cannot change, as the message refusing it; `None`: all of it can.
/// The listeners and worker threads are bound and spawned once; the Redis connection of
/// `shared_state` and the log's format live as long as the process; each instance keeps the
/// passive-health settings it was created with, and the drain timeout is read once by the
/// shutdown watch that started with the process.
pub fn needs_restart(current: &Config, next: &Config) -> Option<String> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    // The pin keeper runs with the rules it started with: with `pinned:` rules on either side,
    // a change of `models` waits for a restart; without them, the rules are swapped (`apply`).
    let pinned = |c: &Config| c.models.rules.iter().any(|r| r.pinned);
    let checks: [(&str, bool); 8] = [
        ("listen", current.listen != next.listen),
        ("threads", current.threads != next.threads),
        ("admin.listen", current.admin_listen != next.admin_listen),
        (
            "shared_state",
            differs(&current.access.shared_state, &next.access.shared_state),
        ),
        ("log.format", current.log.format != next.log.format),
        (
            "health.passive",
            differs(&current.health.passive, &next.health.passive),
        ),
        (
            "shutdown.drain_timeout",
            current.drain_timeout != next.drain_timeout,
        ),
        (
            "models (with pinned rules)",
            (pinned(current) || pinned(next)) && current.models != next.models,
        ),
    ];
    let keys: Vec<&str> = checks
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect();
    (!keys.is_empty()).then(|| format!("{} changed: that needs a restart", keys.join(", ")))
}

/// The sections that differ, for the log and `/reload`'s answer.
fn changed_sections(current: &Config, next: &Config) -> Vec<&'static str> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let keys = |c: &Config| {
        c.access
            .keys
            .iter()
            .map(|k| {
                (
                    k.name.clone(),
                    k.sha256,
                    k.priority,
                    k.max_concurrent,
                    k.requests_per_minute,
                    k.tokens_per_minute,
                    k.models.clone(),
                    k.routes.clone(),
                    k.admin,
                )
            })
            .collect::<Vec<_>>()
    };
    let access = |c: &Config| {
        (
            c.access.allow_anonymous_metadata,
            format!("{:?}", c.access.policy),
            format!("{:?}", c.access.cors),
            c.access.admin_token,
        )
    };
    [
        ("auth.keys", keys(current) != keys(next)),
        ("access", access(current) != access(next)),
        ("log", differs(&current.log, &next.log)),
        ("timeouts", differs(&current.timeouts, &next.timeouts)),
        ("admission", differs(&current.admission, &next.admission)),
        ("limits", differs(&current.limits, &next.limits)),
        ("retries", differs(&current.retries, &next.retries)),
        ("instances", differs(&current.instances, &next.instances)),
        ("health", differs(&current.health, &next.health)),
        ("models", current.models != next.models),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| name)
    .collect()
}

/// Builds and publishes the next generation for `next` (valid, nothing restart-only changed),
/// then moves the instance set to it.
fn apply(current: &Arc<App>, next: Config, plan: InstancePlan) -> Outcome {
    let changed = changed_sections(&current.config, &next);
    if changed.is_empty() {
        // The same configuration (a second trigger for one edit): the generation stays.
        return Outcome::Applied {
            generation: current.generation,
            changed,
        };
    }
    let next = current.next(next);
    let policy = Policy::global(current).next(&next.config.access);
    // Just built: the cell is empty.
    let _ = next.policy.set(Arc::new(policy));
    next.admission.set_config(next.config.admission.clone());
    if changed.contains(&"models") {
        next.admission.set_model_rules(next.config.models.clone());
    }
    next.registry.set_health(next.config.health.clone());
    if next.config.log.level != current.config.log.level {
        apply_log_level(&next.config.log.level);
    }
    let next = current.publish(next);
    plan.carry_out(&next);
    metrics::global().config_loaded(next.generation, next.loaded_at);
    Outcome::Applied {
        generation: next.generation,
        changed,
    }
}

/// Sets the log filter to a new `log.level` (`RUST_LOG`, when set, still wins).
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installed once by `main` with the log subscriber.
static LOG_LEVEL: std::sync::OnceLock<LogLevelSetter> = std::sync::OnceLock::new();

/// Registers how a reload changes the log filter (called by `main` as it installs logging).
pub fn set_log_level(setter: LogLevelSetter) {
    let _ = LOG_LEVEL.set(setter);
}

fn apply_log_level(level: &str) {
    match LOG_LEVEL.get().map(|set| set(level)) {
        Some(Ok(())) => tracing::info!(level, "log level changed"),
        Some(Err(e)) => tracing::error!(level, "cannot change the log level: {e}"),
        None => {}
    }
}

/// How the instance set moves to a new configuration, by name: an added instance starts (or,
/// external, joins once its first health check passes); a removed one takes no new request,
/// drains, and (supervised) is stopped; a changed one (any of its keys: for a supervised one
/// each is a setting of its process) is removed and then added again the same way.
struct InstancePlan {
    added: Vec<config::InstanceConfig>,
    removed: Vec<String>,
    replaced: Vec<config::InstanceConfig>,
}

impl InstancePlan {
    fn new(current: &Config, next: &Config) -> InstancePlan {
        let find = |list: &[config::InstanceConfig], name: &str| {
            list.iter()
                .find(|i| i.name == name)
                .map(|i| format!("{i:?}"))
        };
        let mut plan = InstancePlan {
            added: Vec::new(),
            removed: Vec::new(),
            replaced: Vec::new(),
        };
        for inst in &next.instances {
            match find(&current.instances, &inst.name) {
                None => plan.added.push(inst.clone()),
                Some(old) if old != format!("{inst:?}") => plan.replaced.push(inst.clone()),
                Some(_) => {}
            }
        }
        for inst in &current.instances {
            if find(&next.instances, &inst.name).is_none() {
                plan.removed.push(inst.name.clone());
            }
        }
        plan
    }

    /// The startup checks of each added supervised instance (its command, its port free...),
    /// before anything changes.
    fn preflight(self) -> Result<InstancePlan, String> {
        let search = crate::supervisor::preflight::SearchPath::current();
        for (i, inst) in self.added.iter().enumerate() {
            if let Some(spec) = &inst.supervised {
                crate::supervisor::preflight::check_instance(i, &inst.name, spec, &search)?;
            }
        }
        Ok(self)
    }

    /// Starts the additions now, and the removals (then the re-additions of the replaced) in
    /// the background: they wait for requests in flight.
    fn carry_out(self, app: &Arc<App>) {
        for inst in &self.added {
            add_instance(app, inst);
        }
        let leaving: Vec<(
            Arc<crate::upstream::Instance>,
            Option<config::InstanceConfig>,
        )> = self
            .removed
            .iter()
            .chain(self.replaced.iter().map(|i| &i.name))
            .filter_map(|name| app.registry.get(name))
            .map(|old| {
                let again = self.replaced.iter().find(|i| i.name == old.name).cloned();
                (old, again)
            })
            .collect();
        for (old, again) in leaving {
            app.registry.retire(&old);
            // Waiters are dispatched again without it.
            app.admission.poke();
            let app = app.clone();
            tokio::spawn(async move {
                drain(&app, &old).await;
                if old.supervised {
                    if let Some(supervisor) = SUPERVISOR.get() {
                        supervisor.retire_instance(&old).await;
                    }
                }
                metrics::global().forget_instance_models(&old.name);
                tracing::info!(instance = %old.name, "instance removed by reload");
                if let Some(again) = again {
                    add_instance(&app.current(), &again);
                }
            });
        }
    }
}

/// Lists a new instance, takes it into admission and, supervised, starts its process.
fn add_instance(app: &Arc<App>, config: &config::InstanceConfig) {
    let instance = app.registry.add(config, &app.config.health.passive);
    app.admission.add_instance(instance.clone());
    tracing::info!(instance = %instance.name, "instance added by reload");
    if let (Some(spec), Some(supervisor)) = (&config.supervised, SUPERVISOR.get()) {
        if let Err(e) = supervisor.add_instance(instance.clone(), spec.clone(), app.clone()) {
            tracing::error!(instance = %instance.name, "cannot start the added instance: {e}");
        }
    }
}

/// How often a removed instance is looked at while it drains.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Waits until `instance` holds no admission slot and no request is in flight there, or
/// `shutdown.drain_timeout` passes (then what still runs is cut by the stop).
async fn drain(app: &App, instance: &crate::upstream::Instance) {
    let deadline = tokio::time::Instant::now() + app.config.drain_timeout;
    loop {
        let held = app
            .admission
            .snapshot()
            .slots
            .iter()
            .find(|s| s.index == instance.index)
            .map_or(0, |s| s.busy);
        if held == 0 && instance.in_flight() == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(instance = %instance.name, held, in_flight = instance.in_flight(),
                "removed instance still busy after shutdown.drain_timeout; stopping it");
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// The supervisor, for instances a reload adds or removes (set once, by [`ReloadService::new`]).
static SUPERVISOR: std::sync::OnceLock<Arc<Supervisor>> = std::sync::OnceLock::new();

/// The reload triggers other than `/reload`: SIGHUP, and with `--watch` a change of the file.
/// A Pingora background service.
pub struct ReloadService(Arc<App>);

impl ReloadService {
    pub fn new(app: Arc<App>, supervisor: Arc<Supervisor>) -> ReloadService {
        let _ = SUPERVISOR.set(supervisor);
        ReloadService(app)
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let app = &self.0;
        metrics::global().config_loaded(app.generation, app.loaded_at);
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload only by /reload: {e}");
                None
            }
        };
        let mut watch = app
            .config
            .watch
            .then(|| FileWatch::new(Path::new(&app.config.source)));
        tracing::info!(
            watch = watch.is_some(),
            "reload triggers ready: SIGHUP, POST {PATH} on the admin listener{}",
            if watch.is_some() {
                ", a change of the file"
            } else {
                ""
            }
        );
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup => {
                    reload(app, "SIGHUP").await;
                }
                _ = tick.tick(), if watch.is_some() => {
                    if watch.as_mut().is_some_and(FileWatch::changed) {
                        reload(app, "watch").await;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// `--watch`: the file's content as last taken, and a newer content seen once.
struct FileWatch {
    path: PathBuf,
    taken: Option<u64>,
    pending: Option<u64>,
}

impl FileWatch {
    fn new(path: &Path) -> FileWatch {
        let path = path.to_path_buf();
        let taken = content_hash(&path);
        FileWatch {
            path,
            taken,
            pending: None,
        }
    }

    /// True once a new content has read the same twice in a row. Reading the whole file (a few
    /// KiB, once a second) sees every way of replacing it: in place, by rename, through a
    /// Kubernetes ConfigMap's symlink swap, on a network file system; a file that cannot be
    /// read is waited out.
    fn changed(&mut self) -> bool {
        let now = content_hash(&self.path);
        if now.is_none() || now == self.taken {
            self.pending = None;
            return false;
        }
        if self.pending != now {
            self.pending = now;
            return false;
        }
        self.taken = now;
        self.pending = None;
        true
    }
}

fn content_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Overrides};

    fn parsed(text: &str) -> Config {
        parse(text, "test.yaml", &Overrides::default()).unwrap()
    }

    const BASE: &str = "instances:\n  - name: a\n    url: http://127.0.0.1:11500\n";

    #[test]
    fn restart_only_changes_are_named() {
        let a = parsed(BASE);
        let b = parsed(&format!("listen: 127.0.0.1:1999\n{BASE}"));
        let refused = needs_restart(&a, &b).unwrap();
        assert!(refused.starts_with("listen changed"), "{refused}");
        assert!(needs_restart(&a, &parsed(BASE)).is_none());
    }

    #[test]
    fn model_rules_reload_unless_a_rule_is_pinned() {
        let a = parsed(BASE);
        let limited = parsed(&format!(
            "{BASE}models:\n  - match: \"m*\"\n    max_concurrent: 2\n"
        ));
        assert!(needs_restart(&a, &limited).is_none());
        assert_eq!(changed_sections(&a, &limited), vec!["models"]);
        let pinned = parsed(&format!("{BASE}models:\n  - match: m\n    pinned: true\n"));
        let refused = needs_restart(&limited, &pinned).unwrap();
        assert!(
            refused.starts_with("models (with pinned rules) changed"),
            "{refused}"
        );
        assert!(needs_restart(&pinned, &pinned).is_none());
    }

    #[test]
    fn a_new_key_is_a_change_of_keys_alone() {
        let a = parsed(BASE);
        let b = parsed(&format!(
            "{BASE}auth:\n  keys:\n    - name: k\n      sha256: {}\n",
            "ab".repeat(32)
        ));
        assert!(needs_restart(&a, &b).is_none());
        assert_eq!(changed_sections(&a, &b), vec!["auth.keys"]);
    }

    #[test]
    fn the_watch_takes_a_content_once_it_reads_the_same_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "a").unwrap();
        let mut watch = FileWatch::new(&path);
        assert!(!watch.changed());
        std::fs::write(&path, "b").unwrap();
        assert!(!watch.changed(), "first sight of the new content");
        assert!(watch.changed(), "the same content again");
        assert!(!watch.changed(), "taken once");
        std::fs::remove_file(&path).unwrap();
        assert!(!watch.changed(), "a missing file is waited out");
    }
}
