//! The shared state every service reads, built once at startup from the validated configuration.

use crate::admission::Admission;
use crate::config::Config;
use crate::upstream::Registry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub struct App {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub lifecycle: Arc<Lifecycle>,
    /// The inference queue and slots.
    pub admission: Arc<Admission>,
    /// Caps retries to a share of requests.
    pub retry_budget: crate::proxy::retry::RetryBudget,
    /// Model-management requests running at once (pull, push, create, copy, delete, blobs).
    pub management: Arc<tokio::sync::Semaphore>,
    pub started: Instant,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let registry = Arc::new(Registry::new(&config));
        let admission = Admission::new(config.admission.clone(), registry.all().to_vec());
        admission.set_model_rules(config.models.clone());
        let management = Arc::new(tokio::sync::Semaphore::new(
            config.admission.management_concurrency,
        ));
        Arc::new(App {
            retry_budget: crate::proxy::retry::RetryBudget::new(&config.retries),
            admission,
            management,
            config,
            registry,
            lifecycle: Arc::new(Lifecycle::default()),
            started: Instant::now(),
        })
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
