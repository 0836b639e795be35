//! Rate limits: token buckets (a minute's worth of capacity, refilled continuously) for each
//! key's requests and tokens, governor's keyed limiter per client address, and per-key
//! in-flight counters. The keys' buckets stay hand-written: tokens are charged after the
//! response, so a bucket must go into debt, which GCRA cannot express; there is one per
//! configured key, so nothing to sweep.

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A bucket of `capacity` units refilled at `capacity` per minute. The level may go below zero
/// when usage is charged after the fact (tokens): the debt is paid off by the refill.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_second: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    pub fn per_minute(capacity: u64, now: Instant) -> Bucket {
        let capacity = capacity.max(1) as f64;
        Bucket {
            capacity,
            per_second: capacity / 60.0,
            level: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_second).min(self.capacity);
        self.at = now;
    }

    /// How long until the level reaches `level`.
    fn time_to(&self, level: f64) -> Duration {
        let missing = (level - self.level).max(0.0);
        Duration::from_secs_f64((missing / self.per_second).min(86_400.0))
    }

    /// Takes `n` units, or says how long until they are there.
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= n {
            self.level -= n;
            Ok(())
        } else {
            Err(self.time_to(n))
        }
    }

    /// Ok while the level is above zero (some budget left), else how long until it is.
    pub fn check_positive(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level > 0.0 {
            Ok(())
        } else {
            // A little past zero, so the client that waits finds budget.
            Err(self.time_to(self.per_second.min(1.0)))
        }
    }

    /// Charges usage measured after the fact; the level may go negative.
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level -= n;
    }
}

/// Locks a mutex, recovering the data if a panic poisoned it (a bucket is always consistent).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Entries past which the per-client limiter first forgets the clients whose bucket is full
/// again; afterwards whenever it has doubled since the last sweep, so a sweep's cost is spread
/// over as many requests as it scans (amortised O(1)).
const CLIENTS_SWEEP_AT: usize = 10_000;

/// One bucket per client address: governor's keyed GCRA limiter, a minute's worth of capacity
/// refilled continuously (the same shape as [`Bucket`]).
pub struct ClientLimiter {
    per_minute: u64,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// The size at which the next sweep happens.
    sweep_at: AtomicUsize,
}

impl ClientLimiter {
    pub fn new(per_minute: u64) -> ClientLimiter {
        let burst = NonZeroU32::new(u32::try_from(per_minute).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        ClientLimiter {
            per_minute,
            limiter: RateLimiter::dashmap(Quota::per_minute(burst)),
            sweep_at: AtomicUsize::new(CLIENTS_SWEEP_AT),
        }
    }

    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    /// Takes one request from the client's bucket, or says how long until one fits.
    pub fn take(&self, client: IpAddr) -> Result<(), Duration> {
        self.forget_idle();
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Counts a request another limiter admitted (the shared one), so this one knows the
    /// client's recent traffic if it has to decide alone. (An empty bucket stays empty: GCRA
    /// keeps no debt.)
    pub fn charge(&self, client: IpAddr) {
        let _ = self.take(client);
    }

    fn forget_idle(&self) {
        if self.limiter.len() < self.sweep_at.load(Ordering::Relaxed) {
            return;
        }
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let kept = self.limiter.len();
        self.sweep_at
            .store((kept * 2).max(CLIENTS_SWEEP_AT), Ordering::Relaxed);
    }
}

/// What a limited request is refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The key's tokens bucket is at or below zero; there is budget again in this long.
    Tokens(Duration),
    /// The requests bucket is empty; a request fits in this long.
    Requests(Duration),
    /// `max_concurrent` requests are in flight.
    Concurrency,
}

/// Requests of one key in flight, bounded.
#[derive(Debug, Default)]
pub struct InFlightCounter(AtomicU32);

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<InFlightCounter>);

impl InFlightCounter {
    /// One more in flight, unless `max` already are.
    pub fn try_enter(self: &Arc<Self>, max: u32) -> Option<InFlight> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(self.clone()))
    }

    /// One more in flight whatever the count (another limiter, the shared one, admitted it).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn current(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reject::retry_after_secs;

    #[test]
    fn buckets_refill() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(2, t0);
        assert!(b.take(1.0, t0).is_ok());
        assert!(b.take(1.0, t0).is_ok());
        let wait = b.take(1.0, t0).unwrap_err();
        assert!((29..=30).contains(&wait.as_secs()), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 30);
        assert!(b.take(1.0, t0 + Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn charged_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(60, t0);
        assert!(b.check_positive(t0).is_ok());
        b.charge(120.0, t0);
        let wait = b.check_positive(t0).unwrap_err();
        assert!((60..=61).contains(&wait.as_secs()), "{wait:?}");
        assert!(b.check_positive(t0 + Duration::from_secs(62)).is_ok());
    }

    #[test]
    fn in_flight_caps() {
        let c = Arc::new(InFlightCounter::default());
        let a = c.try_enter(2).unwrap();
        let _b = c.try_enter(2).unwrap();
        assert!(c.try_enter(2).is_none());
        drop(a);
        assert!(c.try_enter(2).is_some());
        assert_eq!(c.current(), 1);
    }

    #[test]
    fn mirrored_counts_bind_the_local_fallback() {
        // What the shared limits admitted counts here too, past the local cap if need be.
        let c = Arc::new(InFlightCounter::default());
        let held: Vec<InFlight> = (0..3).map(|_| c.enter()).collect();
        assert_eq!(c.current(), 3);
        assert!(c.try_enter(3).is_none());
        drop(held);
        assert_eq!(c.current(), 0);
        let l = ClientLimiter::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        l.charge(a);
        l.charge(a);
        assert!(l.take(a).is_err());
    }

    #[test]
    fn idle_clients_are_forgotten_in_amortised_sweeps() {
        // A million a minute: a bucket is full again 60 µs after its one request.
        let l = ClientLimiter::new(1_000_000);
        let client = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..CLIENTS_SWEEP_AT as u32 {
            assert!(l.take(client(i)).is_ok());
        }
        assert_eq!(l.limiter.len(), CLIENTS_SWEEP_AT);
        std::thread::sleep(Duration::from_millis(5));
        // The next request finds the map at its bound and sweeps the idle clients.
        assert!(l.take(client(CLIENTS_SWEEP_AT as u32)).is_ok());
        assert!(l.limiter.len() <= 1, "{}", l.limiter.len());
    }

    #[test]
    fn clients_are_separate() {
        let l = ClientLimiter::new(1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.take(a).is_ok());
        assert!(l.take(a).is_err());
        assert!(l.take(b).is_ok());
    }
}
