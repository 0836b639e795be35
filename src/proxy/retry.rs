//! Retry policy for requests that failed before the client saw a byte: which failures qualify,
//! the backoff, and a budget so a sick fleet is not hammered by retries.

use crate::config::RetriesFile;
use pingora_error::{Error, ErrorType};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a request was retried (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    ConnectError,
    ConnectTimeout,
    Reset,
    ResponseTimeout,
    Status502,
    Status503,
    Status504,
}

impl RetryReason {
    pub const ALL: [RetryReason; 7] = [
        RetryReason::ConnectError,
        RetryReason::ConnectTimeout,
        RetryReason::Reset,
        RetryReason::ResponseTimeout,
        RetryReason::Status502,
        RetryReason::Status503,
        RetryReason::Status504,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ConnectError => "connect_error",
            RetryReason::ConnectTimeout => "connect_timeout",
            RetryReason::Reset => "reset",
            RetryReason::ResponseTimeout => "response_timeout",
            RetryReason::Status502 => "status_502",
            RetryReason::Status503 => "status_503",
            RetryReason::Status504 => "status_504",
        }
    }

    /// An upstream status worth another instance's try.
    pub fn from_status(status: u16) -> Option<RetryReason> {
        match status {
            502 => Some(RetryReason::Status502),
            503 => Some(RetryReason::Status503),
            504 => Some(RetryReason::Status504),
            _ => None,
        }
    }

    /// A proxying error that happened before any response byte.
    pub fn from_error(e: &Error) -> Option<RetryReason> {
        match e.etype() {
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                Some(RetryReason::ConnectError)
            }
            ErrorType::ConnectTimedout => Some(RetryReason::ConnectTimeout),
            ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::H1Error
            | ErrorType::InvalidHTTPHeader => Some(RetryReason::Reset),
            ErrorType::ReadTimedout => Some(RetryReason::ResponseTimeout),
            _ => None,
        }
    }
}

/// The delay before retry `attempt` (1 = the first retry): exponential from `backoff`, capped at
/// `max_backoff`, with jitter in [d/2, d].
pub fn backoff(config: &RetriesFile, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(16);
    let d = config
        .backoff
        .saturating_mul(1u32 << exp)
        .min(config.max_backoff);
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// How long to wait before the next attempt: nothing when another ready instance can take it,
/// else the backoff; at least the failed instance's `Retry-After`.
pub fn delay(
    config: &RetriesFile,
    attempt: u32,
    others_ready: bool,
    retry_after: Option<Duration>,
) -> Duration {
    let backoff = if others_ready {
        Duration::ZERO
    } else {
        backoff(config, attempt)
    };
    backoff.max(retry_after.unwrap_or_default())
}

/// Longest `Retry-After` the sidecar waits out before retrying; longer ones are passed on.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Parses `Retry-After` in seconds (the form Ollama-compatible servers send).
pub fn retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Retries allowed: at most `ratio` of requests over the sliding `window`, and always `min`.
pub struct RetryBudget {
    ratio: f64,
    min: u32,
    bucket: Duration,
    buckets: Mutex<VecDeque<Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    start: Instant,
    requests: u32,
    retries: u32,
}

const BUCKETS: u32 = 10;

impl RetryBudget {
    pub fn new(config: &RetriesFile) -> RetryBudget {
        RetryBudget {
            ratio: config.budget_ratio,
            min: config.budget_min,
            bucket: (config.budget_window / BUCKETS).max(Duration::from_millis(1)),
            buckets: Mutex::new(VecDeque::with_capacity(BUCKETS as usize + 1)),
        }
    }

    fn with_current<T>(&self, f: impl FnOnce(&mut VecDeque<Bucket>) -> T) -> T {
        let now = Instant::now();
        let mut b = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let window = self.bucket * BUCKETS;
        while b
            .front()
            .is_some_and(|x| now.duration_since(x.start) >= window)
        {
            b.pop_front();
        }
        if b.back()
            .is_none_or(|x| now.duration_since(x.start) >= self.bucket)
        {
            b.push_back(Bucket {
                start: now,
                requests: 0,
                retries: 0,
            });
        }
        f(&mut b)
    }

    /// Counts a request that may later want a retry.
    pub fn record_request(&self) {
        self.with_current(|b| {
            if let Some(last) = b.back_mut() {
                last.requests = last.requests.saturating_add(1);
            }
        });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_spend(&self) -> bool {
        self.with_current(|b| {
            let (requests, retries) = b.iter().fold((0u64, 0u64), |(q, r), x| {
                (q + x.requests as u64, r + x.retries as u64)
            });
            let allowed = ((requests as f64) * self.ratio).floor() as u64;
            if retries < allowed.max(self.min as u64) {
                if let Some(last) = b.back_mut() {
                    last.retries = last.retries.saturating_add(1);
                }
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RetriesFile {
        RetriesFile {
            budget_ratio: 0.2,
            budget_min: 2,
            budget_window: Duration::from_secs(10),
            ..RetriesFile::default()
        }
    }

    #[test]
    fn budget_allows_min_then_ratio() {
        let b = RetryBudget::new(&config());
        assert!(b.try_spend());
        assert!(b.try_spend());
        assert!(
            !b.try_spend(),
            "the minimum is spent and there is no traffic"
        );
        for _ in 0..20 {
            b.record_request();
        }
        // 20% of 20 = 4 retries in the window, 2 spent.
        assert!(b.try_spend());
        assert!(b.try_spend());
        assert!(!b.try_spend());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let c = RetriesFile {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            ..RetriesFile::default()
        };
        for _ in 0..50 {
            let d1 = backoff(&c, 1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d2 = backoff(&c, 2);
            assert!(d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200));
            let d9 = backoff(&c, 9);
            assert!(d9 >= Duration::from_millis(150) && d9 <= Duration::from_millis(300));
        }
    }

    #[test]
    fn reasons() {
        assert_eq!(RetryReason::from_status(503), Some(RetryReason::Status503));
        assert_eq!(RetryReason::from_status(500), None);
        let e = Error::new(ErrorType::ConnectRefused);
        assert_eq!(RetryReason::from_error(&e), Some(RetryReason::ConnectError));
        let v = http::HeaderValue::from_static("3");
        assert_eq!(retry_after(Some(&v)), Some(Duration::from_secs(3)));
    }
}
