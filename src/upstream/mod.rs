//! The upstream side: the registry of Ollama instances and how one is chosen.

pub mod client;
pub mod health;
pub mod instance;
pub mod models;
pub mod parallel;
pub mod pinned;
pub mod resolve;
pub mod select;
pub mod target;

pub use instance::{model_key, Gate, InFlightGuard, Instance, InstanceState, ProcessInfo};

use crate::config::Config;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Notify;

/// All configured instances, in configuration order. Built at startup; a reload adds and
/// retires instances ([`Registry::add`], [`Registry::retire`]).
pub struct Registry {
    instances: arc_swap::ArcSwap<Vec<Arc<Instance>>>,
    /// Instances ever created: the next one's `index` (indexes are never reused).
    created: std::sync::atomic::AtomicUsize,
    /// The active checks' and model polls' settings (a reload swaps them).
    health: arc_swap::ArcSwap<crate::config::HealthConfig>,
    /// Woken whenever an instance's state or load changes, so waiters can look again.
    changed: Notify,
    /// Woken by a connect failure, so the instance watch resolves that instance's name again.
    resolve_wanted: Notify,
    /// Woken after a model-management request, so the model lists are read again at once.
    models_stale: Notify,
}

impl Registry {
    pub fn new(config: &Config) -> Registry {
        let instances: Vec<Arc<Instance>> = config
            .instances
            .iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Instance::new(i, c, &config.health.passive)))
            .collect();
        Registry {
            created: instances.len().into(),
            health: arc_swap::ArcSwap::from_pointee(config.health.clone()),
            instances: arc_swap::ArcSwap::from_pointee(instances),
            changed: Notify::new(),
            resolve_wanted: Notify::new(),
            models_stale: Notify::new(),
        }
    }

    /// The configured instances now (a retired one is no longer listed).
    pub fn all(&self) -> Arc<Vec<Arc<Instance>>> {
        self.instances.load_full()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Instance>> {
        self.instances
            .load()
            .iter()
            .find(|i| i.name == name)
            .cloned()
    }

    pub fn any_ready(&self) -> bool {
        self.instances.load().iter().any(|i| i.is_ready())
    }

    /// Wakes everything waiting for an instance to change.
    pub fn notify_changed(&self) {
        self.changed.notify_waiters();
        // Also leave a permit, so a watcher between two waits does not miss the change.
        self.changed.notify_one();
    }

    /// Records what a request outside admission (the ordinary proxy path) saw of an instance
    /// (`ok`: no instance fault). It counts toward an ejection but never decides a half-open
    /// trial: only the admitted trial request does ([`report_admitted`](Self::report_admitted)).
    pub fn report(self: &Arc<Self>, instance: &Arc<Instance>, ok: bool) {
        let verdict = if ok {
            Verdict::Answered
        } else {
            Verdict::Fault
        };
        self.report_admitted(instance, verdict, false);
    }

    /// Records how an instance answered a request; `trial`: the request was the half-open
    /// trial (granted while the instance was half-open), whose verdict ends or renews the
    /// ejection. An ejection or a recovery changes where traffic goes, so dispatch runs again
    /// then, and again when the cool-down ends.
    pub fn report_admitted(
        self: &Arc<Self>,
        instance: &Arc<Instance>,
        verdict: Verdict,
        trial: bool,
    ) {
        match verdict {
            Verdict::Answered | Verdict::RequestError => {
                if verdict == Verdict::RequestError {
                    instance.record_request_error();
                }
                if instance.record_success(trial) {
                    tracing::info!(instance = %instance.name, "instance passed its trial request: back in rotation");
                    self.notify_changed();
                }
            }
            Verdict::Fault => {
                if let Some(cooldown) = instance.record_failure(trial) {
                    tracing::warn!(instance = %instance.name, cooldown = %humantime::format_duration(cooldown),
                        "instance ejected after failures in real traffic");
                    self.notify_changed();
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let registry = self.clone();
                        rt.spawn(async move {
                            tokio::time::sleep(cooldown).await;
                            registry.notify_changed();
                        });
                    }
                }
            }
        }
    }

    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// A connection to `addr` of `instance` failed: the next request tries its next address,
    /// and the instance watch resolves its name again. Returns whether there is a next address.
    pub fn connect_failed(&self, instance: &Instance, addr: SocketAddr) -> bool {
        let next = instance.connect_failed(addr);
        if let Some(next) = next {
            tracing::info!(instance = %instance.name, failed = %addr, %next,
                "connection failed: moving to the name's next address");
        }
        if instance.is_named() {
            self.resolve_wanted.notify_one();
        }
        next.is_some()
    }

    pub fn resolve_wanted(&self) -> &Notify {
        &self.resolve_wanted
    }

    /// A pull, create, copy or delete went through: read every instance's model lists again now
    /// instead of at the next poll.
    pub fn models_changed(&self) {
        self.models_stale.notify_one();
    }

    pub fn models_stale(&self) -> &Notify {
        &self.models_stale
    }
}

/// What one request says about its instance, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The instance answered (any status that is not an instance fault).
    Answered,
    /// The instance answered a 5xx of the request's own (Ollama's 500 for a model that needs
    /// more memory than is free, server/routes.go `handleScheduleError`): counted, never an
    /// ejection.
    RequestError,
    /// Connect refused or reset, a timeout, or 502/503/504 from the instance.
    Fault,
}

impl Verdict {
    /// The verdict of a complete answer with this status.
    pub fn of_status(status: u16) -> Verdict {
        match status {
            502..=504 => Verdict::Fault,
            500..=599 => Verdict::RequestError,
            _ => Verdict::Answered,
        }
    }
}

// ---- Reload (src/reload.rs): the instance set changes. ----
impl Registry {
    /// A new instance for `config`, listed from now on (its index is new).
    pub fn add(
        &self,
        config: &crate::config::InstanceConfig,
        passive: &crate::config::PassiveConfig,
    ) -> Arc<Instance> {
        let index = self
            .created
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let instance = Arc::new(Instance::new(index, config, passive));
        self.instances.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(instance.clone());
            list
        });
        self.notify_changed();
        instance
    }

    /// Takes `instance` out: no new request goes there, and it is no longer listed.
    pub fn retire(&self, instance: &Arc<Instance>) {
        instance.retire();
        self.instances.rcu(|list| {
            list.iter()
                .filter(|i| !Arc::ptr_eq(i, instance))
                .cloned()
                .collect::<Vec<_>>()
        });
        self.notify_changed();
    }

    /// The health settings now.
    pub fn health(&self) -> Arc<crate::config::HealthConfig> {
        self.health.load_full()
    }

    /// New active-check and model-poll settings, taken at their next round.
    pub fn set_health(&self, health: crate::config::HealthConfig) {
        self.health.store(Arc::new(health));
    }

    /// Instances ever created (retired ones included): one past the largest index.
    pub fn created(&self) -> usize {
        self.created.load(std::sync::atomic::Ordering::Acquire)
    }
}
