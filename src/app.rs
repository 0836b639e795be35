//! The shared state every service reads, built once at startup from the validated configuration.

use crate::admission::Admission;
use crate::config::Config;
use crate::upstream::Registry;
use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

/// One generation of the shared state: the configuration it was loaded with and the services
/// built from it. A reload makes a new generation ([`App::next`]) that shares the registry,
/// queue, drain and counters with the old one; each request takes the current generation once
/// ([`App::current`]) and keeps it to its end, so it finishes under the rules it started with.
pub struct App {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub lifecycle: Arc<Lifecycle>,
    /// The inference queue and slots.
    pub admission: Arc<Admission>,
    /// Caps retries to a share of requests (a new budget only when `retries` changed).
    pub retry_budget: Arc<crate::proxy::retry::RetryBudget>,
    /// Model-management requests running at once (pull, push, create, copy, delete, blobs).
    pub management: Arc<tokio::sync::Semaphore>,
    pub started: Instant,
    /// Which configuration this is: 1 at startup, one more per accepted reload.
    pub generation: u64,
    /// When this configuration was loaded.
    pub loaded_at: SystemTime,
    /// This generation's access policy and its counters (`policy::Policy::global`).
    pub policy: std::sync::OnceLock<Arc<crate::policy::Policy>>,
    /// The current generation, shared by all of them (a reference cycle that lives as long as
    /// the process, like the services holding it).
    live: Arc<Live>,
}

/// Where the current generation is published.
struct Live {
    current: ArcSwapOption<App>,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let registry = Arc::new(Registry::new(&config));
        let admission = Admission::new(config.admission.clone(), registry.all().to_vec());
        admission.set_model_rules(config.models.clone());
        let management = Arc::new(tokio::sync::Semaphore::new(
            config.admission.management_concurrency,
        ));
        let app = Arc::new(App {
            retry_budget: Arc::new(crate::proxy::retry::RetryBudget::new(&config.retries)),
            admission,
            management,
            config,
            registry,
            lifecycle: Arc::new(Lifecycle::default()),
            started: Instant::now(),
            generation: 1,
            policy: Default::default(),
            loaded_at: SystemTime::now(),
            live: Arc::new(Live {
                current: ArcSwapOption::empty(),
            }),
        });
        app.live.current.store(Some(app.clone()));
        app
    }

    /// The generation new requests use now.
    pub fn current(self: &Arc<Self>) -> Arc<App> {
        // Always set: the first generation publishes itself in `App::new`.
        self.live
            .current
            .load_full()
            .unwrap_or_else(|| self.clone())
    }

    /// The generation after this one, for `config` (already validated): the queue, registry,
    /// drain and management semaphore carry over (their limits follow `config`).
    pub fn next(&self, config: Config) -> App {
        let retry_budget =
            if format!("{:?}", config.retries) == format!("{:?}", self.config.retries) {
                self.retry_budget.clone()
            } else {
                Arc::new(crate::proxy::retry::RetryBudget::new(&config.retries))
            };
        resize(
            &self.management,
            self.config.admission.management_concurrency,
            config.admission.management_concurrency,
        );
        App {
            retry_budget,
            admission: self.admission.clone(),
            management: self.management.clone(),
            registry: self.registry.clone(),
            lifecycle: self.lifecycle.clone(),
            started: self.started,
            generation: self.generation + 1,
            policy: Default::default(),
            loaded_at: SystemTime::now(),
            live: self.live.clone(),
            config,
        }
    }

    /// Makes `next` the generation new requests see.
    pub fn publish(&self, next: App) -> Arc<App> {
        let next = Arc::new(next);
        self.live.current.store(Some(next.clone()));
        next
    }
}

/// Gives a semaphore `to` permits in all where it had `from`. Lowered below the requests
/// running, the rest is taken back as they finish (by a task that holds and forgets them).
fn resize(semaphore: &Arc<tokio::sync::Semaphore>, from: usize, to: usize) {
    if to > from {
        semaphore.add_permits(to - from);
    } else if from > to {
        let owed = (from - to) - semaphore.forget_permits(from - to);
        let Ok(owed) = u32::try_from(owed) else {
            return;
        };
        if owed > 0 {
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                if let Ok(permits) = semaphore.acquire_many_owned(owed).await {
                    permits.forget();
                }
            });
        }
    }
}

/// Whether the sidecar still admits requests, and how many are in flight (for the drain).
#[derive(Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    active: AtomicUsize,
    /// The most requests in flight since `take_peak` last ran (see `memory`).
    peak: AtomicUsize,
    idle: Notify,
}

impl Lifecycle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        let now = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        // A plain read first: the shared peak is written only when it grows.
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        ActiveGuard {
            lifecycle: self.clone(),
        }
    }

    /// The most requests in flight since the last call (at least the current count), and starts
    /// a new period.
    pub fn take_peak(&self) -> usize {
        let now = self.active();
        self.peak.swap(now, Ordering::Relaxed).max(now)
    }

    /// Waits until no request is in flight, or `timeout`; true when drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active() == 0;
            }
        }
    }
}

pub struct ActiveGuard {
    lifecycle: Arc<Lifecycle>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.lifecycle.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.lifecycle.idle.notify_waiters();
        }
    }
}
