//! The status page's charts: one sample every [`SAMPLE_EVERY`] of the queue, the slots, the
//! request and token rates and the mean time to first token, kept for [`WINDOW`]
//! ([`MAX_SAMPLES`] points, a few kilobytes) by a background task that only reads state that
//! exists anyway (the admission snapshot and [`super::recent`]'s totals).

use super::recent::{self, Totals};
use crate::app::App;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// 15 minutes at one sample every 5 s.
pub const MAX_SAMPLES: usize = (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize;

/// One point of the charts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub queued: usize,
    pub running: usize,
    pub ready_instances: usize,
    /// Finished requests per second since the previous sample.
    pub requests_per_second: f64,
    /// Completion tokens per second since the previous sample.
    pub tokens_per_second: f64,
    /// Mean time to first token of the requests that finished since the previous sample.
    pub ttft_seconds: Option<f64>,
}

/// The bounded series.
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

static HISTORY: LazyLock<History> = LazyLock::new(History::default);

pub fn global() -> &'static History {
    &HISTORY
}

impl History {
    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() >= MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

/// The rates between two readings of the totals `elapsed` apart.
pub fn rates(before: Totals, now: Totals, elapsed: Duration) -> (f64, f64, Option<f64>) {
    let secs = elapsed.as_secs_f64().max(0.001);
    let requests = now.requests.saturating_sub(before.requests) as f64 / secs;
    let tokens = now
        .completion_tokens
        .saturating_sub(before.completion_tokens) as f64
        / secs;
    let n = now.ttft_count.saturating_sub(before.ttft_count);
    let ttft = (n > 0).then(|| (now.ttft_seconds_sum - before.ttft_seconds_sum) / n as f64);
    (requests, tokens, ttft)
}

/// Samples every [`SAMPLE_EVERY`], forever (the instance watch runs it).
pub async fn sample(app: Arc<App>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = recent::global().totals();
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now_totals = recent::global().totals();
        let elapsed = last.elapsed();
        last = tokio::time::Instant::now();
        let (rps, tps, ttft) = rates(before, now_totals, elapsed);
        before = now_totals;
        let snap = app.admission.snapshot();
        global().push(Sample {
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            queued: snap.queued,
            running: snap.held(),
            ready_instances: app.registry.all().iter().filter(|i| i.is_ready()).count(),
            requests_per_second: rps,
            tokens_per_second: tps,
            ttft_seconds: ttft,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64) -> Sample {
        Sample {
            at,
            queued: 0,
            running: 0,
            ready_instances: 1,
            requests_per_second: 0.0,
            tokens_per_second: 0.0,
            ttft_seconds: None,
        }
    }

    #[test]
    fn keeps_fifteen_minutes() {
        assert_eq!(MAX_SAMPLES, 180);
        let h = History::default();
        for i in 0..MAX_SAMPLES + 20 {
            h.push(sample(i as f64));
        }
        let s = h.samples();
        assert_eq!(s.len(), MAX_SAMPLES);
        assert_eq!(s[0].at, 20.0);
    }

    #[test]
    fn rates_between_two_readings() {
        let before = Totals {
            requests: 10,
            completion_tokens: 100,
            ttft_seconds_sum: 1.0,
            ttft_count: 4,
        };
        let now = Totals {
            requests: 20,
            completion_tokens: 600,
            ttft_seconds_sum: 2.0,
            ttft_count: 8,
        };
        let (r, t, ttft) = rates(before, now, Duration::from_secs(5));
        assert_eq!((r, t), (2.0, 100.0));
        assert_eq!(ttft, Some(0.25));
        assert_eq!(rates(now, now, Duration::from_secs(5)).2, None);
    }
}
