//! What finished requests leave behind for the status page, in bounded memory: the last
//! [`MAX_REFUSALS`] refusals with their reasons, running totals the history sampler turns into
//! rates, and each key's requests and tokens over the last minute.
//!
//! Fed once per client request by the code that writes the access-log line ([`Recent::record`]), so it
//! sees exactly what the log sees, whether or not `log.access` is on.

use crate::metrics::RequestRecord;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

/// Refusals kept (the oldest goes first).
pub const MAX_REFUSALS: usize = 100;
/// A key's usage is counted over this many one-second buckets.
pub const USAGE_WINDOW_SECONDS: usize = 60;

/// One request the sidecar refused (or failed on its own behalf: no instance ready, an instance
/// unreachable).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub request_id: String,
    pub client: String,
    pub key: Option<String>,
    pub method: String,
    pub route: &'static str,
    pub model: Option<String>,
    pub status: u16,
    /// The label of the sidecar's own answer (`Reject::label`: the metrics' `rejection` label
    /// for a refusal, or a failure's label such as `no_instance`).
    pub reason: &'static str,
    /// That answer's message, as the client read it.
    pub error: Option<String>,
}

/// Running totals since start (the sampler differences them).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub completion_tokens: u64,
    pub ttft_seconds_sum: f64,
    pub ttft_count: u64,
}

/// A key's use over the last [`USAGE_WINDOW_SECONDS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub requests: u64,
    pub tokens: u64,
}

/// Per-second buckets, indexed by whole seconds since start modulo the window.
#[derive(Default)]
struct Window {
    /// (second, requests, tokens)
    buckets: Vec<(u64, u64, u64)>,
}

impl Window {
    fn add(&mut self, second: u64, tokens: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![(u64::MAX, 0, 0); USAGE_WINDOW_SECONDS];
        }
        let slot = (second % USAGE_WINDOW_SECONDS as u64) as usize;
        if let Some(b) = self.buckets.get_mut(slot) {
            if b.0 != second {
                *b = (second, 0, 0);
            }
            b.1 += 1;
            b.2 += tokens;
        }
    }

    fn sum(&self, now_second: u64) -> KeyUsage {
        let oldest = now_second.saturating_sub(USAGE_WINDOW_SECONDS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 >= oldest && b.0 <= now_second)
            .fold(KeyUsage::default(), |u, b| KeyUsage {
                requests: u.requests + b.1,
                tokens: u.tokens + b.2,
            })
    }
}

#[derive(Default)]
struct Inner {
    refusals: VecDeque<Refusal>,
    totals: Totals,
    /// Key names come from the configuration: bounded.
    keys: BTreeMap<String, Window>,
}

pub struct Recent {
    started: Instant,
    inner: Mutex<Inner>,
}

static RECENT: LazyLock<Recent> = LazyLock::new(Recent::new);

/// The process's record (like the metrics registry: one per process).
pub fn global() -> &'static Recent {
    &RECENT
}

/// The request facts that do not come from the metrics' record, as the access log has them.
pub struct Seen<'a> {
    pub request_id: &'a str,
    pub client: &'a str,
    pub key: Option<&'a str>,
    pub method: &'a str,
    /// The label of the sidecar's own answer (`Reject::label`): a refusal, or a failure such as
    /// no instance ready; `None` for what an instance answered.
    pub reason: Option<&'static str>,
    /// That answer's message.
    pub message: Option<String>,
}

impl Default for Recent {
    fn default() -> Self {
        Recent::new()
    }
}

impl Recent {
    pub fn new() -> Recent {
        Recent {
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Counts one finished request; keeps it when it was refused.
    pub fn record(&self, seen: &Seen<'_>, r: &RequestRecord<'_>) {
        let tokens = r.tap.completion_tokens.unwrap_or(0);
        let used = tokens + r.tap.prompt_tokens.unwrap_or(0);
        let reason = seen.reason;
        let second = self.second();
        let mut inner = self.lock();
        let totals = &mut inner.totals;
        totals.requests += 1;
        totals.completion_tokens += tokens;
        if let Some(t) = r.tap.first_token {
            totals.ttft_seconds_sum += t.as_secs_f64();
            totals.ttft_count += 1;
        }
        if let Some(key) = seen.key {
            if !inner.keys.contains_key(key) {
                inner.keys.insert(key.to_string(), Window::default());
            }
            if let Some(w) = inner.keys.get_mut(key) {
                w.add(second, used);
            }
        }
        let Some(reason) = reason else {
            return;
        };
        if inner.refusals.len() >= MAX_REFUSALS {
            inner.refusals.pop_front();
        }
        inner.refusals.push_back(Refusal {
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            request_id: seen.request_id.to_string(),
            client: seen.client.to_string(),
            key: seen.key.map(str::to_string),
            method: seen.method.to_string(),
            route: r.route,
            model: r.model.map(str::to_string),
            status: r.status,
            reason,
            error: seen.message.clone(),
        });
    }

    /// The kept refusals, newest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.lock().refusals.iter().rev().cloned().collect()
    }

    pub fn totals(&self) -> Totals {
        self.lock().totals
    }

    /// A key's requests and tokens (prompt + completion) over the last minute.
    pub fn key_usage(&self, key: &str) -> KeyUsage {
        let now = self.second();
        self.lock()
            .keys
            .get(key)
            .map(|w| w.sum(now))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Outcome;
    use crate::proxy::tap::TapSummary;
    use std::time::Duration;

    fn record<'a>(tap: &'a TapSummary, status: u16, outcome: Outcome) -> RequestRecord<'a> {
        RequestRecord {
            class: "inference",
            route: "chat",
            model: Some("llama3.2"),
            status,
            duration: Duration::from_millis(5),
            queue_wait: None,
            first_byte: None,
            tap,
            outcome,
            rejection: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    fn seen<'a>(id: &'a str, reason: Option<&'static str>) -> Seen<'a> {
        Seen {
            request_id: id,
            client: "10.0.0.1",
            key: Some("alice"),
            method: "POST",
            reason,
            message: reason.map(|r| format!("refused: {r}")),
        }
    }

    #[test]
    fn keeps_the_last_refusals_newest_first() {
        let recent = Recent::new();
        let tap = TapSummary::default();
        let ids: Vec<String> = (0..MAX_REFUSALS + 5).map(|i| format!("r{i}")).collect();
        for id in &ids {
            recent.record(
                &seen(id, Some("rate_limited_requests")),
                &record(&tap, 429, Outcome::Refused),
            );
        }
        recent.record(&seen("served", None), &record(&tap, 200, Outcome::Served));
        let kept = recent.refusals();
        assert_eq!(kept.len(), MAX_REFUSALS);
        assert_eq!(kept[0].request_id, format!("r{}", MAX_REFUSALS + 4));
        assert_eq!(kept[MAX_REFUSALS - 1].request_id, "r5");
        assert_eq!(kept[0].reason, "rate_limited_requests");
        assert_eq!(kept[0].key.as_deref(), Some("alice"));
        assert_eq!(recent.totals().requests, MAX_REFUSALS as u64 + 6);
    }

    #[test]
    fn a_failure_of_the_sidecars_own_is_kept_with_its_label() {
        let recent = Recent::new();
        let tap = TapSummary::default();
        recent.record(
            &seen("x", Some("unreachable")),
            &record(&tap, 502, Outcome::Failed),
        );
        let kept = recent.refusals();
        assert_eq!(kept[0].reason, "unreachable");
        assert_eq!(kept[0].error.as_deref(), Some("refused: unreachable"));
    }

    #[test]
    fn key_usage_counts_the_last_minute() {
        let recent = Recent::new();
        let tap = TapSummary {
            prompt_tokens: Some(3),
            completion_tokens: Some(7),
            first_token: Some(Duration::from_millis(40)),
            ..TapSummary::default()
        };
        for _ in 0..4 {
            recent.record(&seen("ok", None), &record(&tap, 200, Outcome::Served));
        }
        assert_eq!(
            recent.key_usage("alice"),
            KeyUsage {
                requests: 4,
                tokens: 40
            }
        );
        assert_eq!(recent.key_usage("bob"), KeyUsage::default());
        let t = recent.totals();
        assert_eq!((t.completion_tokens, t.ttft_count), (28, 4));
        // A bucket a minute old no longer counts.
        let mut w = Window::default();
        w.add(10, 5);
        assert_eq!(w.sum(69).requests, 1);
        assert_eq!(w.sum(70).requests, 0);
    }
}
