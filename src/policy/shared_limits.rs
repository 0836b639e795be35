//! Limits counted in Redis, so that every sidecar pointing at the same Redis enforces one limit
//! together: the API keys' `requests_per_minute`, `tokens_per_minute` and `max_concurrent`, and
//! `policy.requests_per_minute_per_client`.
//!
//! Each decision is one Lua script, run atomically by Redis on Redis's own clock (`TIME`), so
//! sidecars need no synchronised clocks and the counts are exact: the buckets are the same
//! token buckets as the local ones (a minute's worth of capacity, refilled continuously).
//! Keys (`P` is `shared_state.prefix`):
//! - `P key:<name>:requests`, `P key:<name>:tokens`, `P client:<address>:requests`: a hash
//!   `{level, at}` (units left, when in ms), expiring once the bucket would be full again;
//! - `P key:<name>:in_flight`: a sorted set of leases (`<sidecar id>:<n>`, scored by their
//!   expiry in ms), expiring `lease_ttl` after its last acquisition or renewal. Each sidecar
//!   renews its leases every third of `lease_ttl`; the leases of a sidecar that dies expire.

use super::ratelimit::{lock, Limited};
use crate::config::SharedStateFile;
use crate::shared_state::{CallError, SharedState};
use redis::Script;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// The token bucket shared by the scripts: `now` (ms, from Redis), its level, saving it.
const BUCKET_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local lvl = tonumber(v[1])
  if lvl == nil then return cap end
  local at = tonumber(v[2]) or now
  return math.min(cap, lvl + math.max(0, now - at) * cap / 60000)
end
local function store(key, cap, lvl)
  redis.call('HSET', key, 'level', lvl, 'at', now)
  redis.call('PEXPIRE', key, math.ceil((cap - lvl) * 60000 / cap) + 1000)
end
local function wait_ms(cap, lvl, want)
  return math.ceil((want - lvl) * 60000 / cap)
end
"#;

/// One request's admission. KEYS: tokens bucket, requests bucket, in-flight set. ARGV: tokens
/// per minute, requests per minute, max concurrent (0: none), lease id, lease ttl (ms).
/// Checks in the local order (tokens above zero, take a request, take a slot); answers
/// `{0}` admitted, `{1, wait ms}` tokens, `{2, wait ms}` requests, `{3}` no slot.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{BUCKET_LUA}{}",
        r#"
local tcap = tonumber(ARGV[1])
if tcap > 0 then
  local lvl = level(KEYS[1], tcap)
  if lvl <= 0 then return {1, wait_ms(tcap, lvl, math.min(1, tcap / 60))} end
end
local rcap = tonumber(ARGV[2])
if rcap > 0 then
  local lvl = level(KEYS[2], rcap)
  if lvl < 1 then return {2, wait_ms(rcap, lvl, 1)} end
  store(KEYS[2], rcap, lvl - 1)
end
local max = tonumber(ARGV[3])
if max > 0 then
  local ttl = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= max then return {3, 0} end
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {0, 0}
"#
    ))
});

/// A request's end. KEYS: tokens bucket, in-flight set. ARGV: tokens per minute (0: none),
/// tokens used, lease id (empty: none). The level may go below zero: a debt the refill pays.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{BUCKET_LUA}{}",
        r#"
local tcap = tonumber(ARGV[1])
local used = tonumber(ARGV[2])
if tcap > 0 and used > 0 then store(KEYS[1], tcap, level(KEYS[1], tcap) - used) end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
return 0
"#
    ))
});

/// Leases still held move their expiry forward (never re-adding one already released or
/// expired). KEYS: in-flight set. ARGV: lease ttl (ms), then the lease ids.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return 0
"#,
    )
});

/// One key's limits, as the scripts take them (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyLimits {
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    /// Only for requests that count against `max_concurrent` (inference, management).
    pub max_concurrent: u32,
}

/// The Redis key names of one API key.
pub struct KeyNames {
    tokens: String,
    requests: String,
    in_flight: Arc<str>,
}

/// Limits counted in Redis, and the leases this sidecar holds.
pub struct SharedLimits {
    state: Arc<SharedState>,
    prefix: String,
    lease_ttl: Duration,
    /// Names this sidecar's leases: different for every process.
    sidecar_id: String,
    next_lease: AtomicU64,
    /// Leases held, by in-flight set: what the renewal refreshes.
    held: Mutex<HashMap<Arc<str>, Vec<String>>>,
}

/// A concurrency slot held in Redis; given back on drop (or by [`SharedLimits::finish`]).
pub struct Lease {
    limits: Arc<SharedLimits>,
    set: Arc<str>,
    id: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lease {}", self.id)
    }
}

impl SharedLimits {
    /// Connects (see [`SharedState::start`]) and starts renewing leases (every third of
    /// `lease_ttl`).
    pub fn start(config: &SharedStateFile) -> Result<Arc<SharedLimits>, String> {
        let state = SharedState::start(config)?;
        let limits = Arc::new(SharedLimits {
            state,
            prefix: config.prefix.clone(),
            lease_ttl: config.lease_ttl,
            sidecar_id: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            next_lease: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
        });
        let renewing = Arc::downgrade(&limits);
        let every = config.lease_ttl / 3;
        limits.state.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(limits) = renewing.upgrade() else {
                    return;
                };
                limits.renew().await;
            }
        });
        Ok(limits)
    }

    pub fn key_names(&self, name: &str) -> KeyNames {
        let p = &self.prefix;
        KeyNames {
            tokens: format!("{p}key:{name}:tokens"),
            requests: format!("{p}key:{name}:requests"),
            in_flight: Arc::from(format!("{p}key:{name}:in_flight")),
        }
    }

    /// A key's request: `Ok(lease)` when admitted (a lease when it takes a slot).
    pub async fn admit_key(
        self: &Arc<Self>,
        names: &KeyNames,
        limits: KeyLimits,
    ) -> Result<Result<Option<Lease>, Limited>, CallError> {
        let id = if limits.max_concurrent > 0 {
            let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
            format!("{}:{n}", self.sidecar_id)
        } else {
            String::new()
        };
        let mut call = ADMIT.prepare_invoke();
        call.key(&names.tokens)
            .key(&names.requests)
            .key(&*names.in_flight)
            .arg(limits.tokens_per_minute)
            .arg(limits.requests_per_minute)
            .arg(limits.max_concurrent)
            .arg(&id)
            .arg(self.lease_ttl.as_millis() as u64);
        let (code, wait_ms): (u8, u64) = self.state.invoke(&call).await?;
        let wait = Duration::from_millis(wait_ms);
        Ok(match code {
            0 if limits.max_concurrent > 0 => Ok(Some(self.hold(names.in_flight.clone(), id))),
            0 => Ok(None),
            1 => Err(Limited::Tokens(wait)),
            2 => Err(Limited::Requests(wait)),
            _ => Err(Limited::Concurrency),
        })
    }

    /// A request without a key, counted by client address: `Ok(Err(wait))` when over.
    pub async fn admit_client(
        &self,
        client: IpAddr,
        per_minute: u64,
    ) -> Result<Result<(), Duration>, CallError> {
        let bucket = format!("{}client:{client}:requests", self.prefix);
        let mut call = ADMIT.prepare_invoke();
        call.key(&bucket)
            .key(&bucket)
            .key(&bucket)
            .arg(0)
            .arg(per_minute)
            .arg(0)
            .arg("")
            .arg(0);
        let (code, wait_ms): (u8, u64) = self.state.invoke(&call).await?;
        Ok(match code {
            0 => Ok(()),
            _ => Err(Duration::from_millis(wait_ms)),
        })
    }

    fn hold(self: &Arc<Self>, set: Arc<str>, id: String) -> Lease {
        lock(&self.held)
            .entry(set.clone())
            .or_default()
            .push(id.clone());
        Lease {
            limits: self.clone(),
            set,
            id,
        }
    }

    fn forget(&self, set: &Arc<str>, id: &str) {
        let mut held = lock(&self.held);
        if let Some(ids) = held.get_mut(set) {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                held.remove(set);
            }
        }
    }

    /// A request's end, off the request path: charges its tokens (when the key has a tokens
    /// budget) and gives its slot back.
    pub fn finish(
        self: &Arc<Self>,
        names: &KeyNames,
        tokens_per_minute: u64,
        used: u64,
        lease: Option<Lease>,
    ) {
        let lease_id = lease.as_ref().map(|l| l.id.clone()).unwrap_or_default();
        if let Some(mut lease) = lease {
            // Released below, with the charge, in one call.
            self.forget(&lease.set, &lease.id);
            lease.id.clear();
        }
        if lease_id.is_empty() && (tokens_per_minute == 0 || used == 0) {
            return;
        }
        let (tokens, in_flight) = (names.tokens.clone(), names.in_flight.clone());
        let limits = self.clone();
        self.state.spawn(async move {
            let mut call = FINISH.prepare_invoke();
            call.key(&tokens)
                .key(&*in_flight)
                .arg(tokens_per_minute)
                .arg(used)
                .arg(&lease_id);
            if let Err(e) = limits.state.invoke::<()>(&call).await {
                // An unreleased slot expires with its lease.
                tracing::debug!(error = %e, "shared limits: could not record a request's end");
            }
        });
    }

    /// Moves the expiry of every lease still held forward.
    async fn renew(&self) {
        let held: Vec<(Arc<str>, Vec<String>)> = lock(&self.held)
            .iter()
            .map(|(set, ids)| (set.clone(), ids.clone()))
            .collect();
        for (set, ids) in held {
            let mut call = RENEW.prepare_invoke();
            call.key(&*set).arg(self.lease_ttl.as_millis() as u64);
            for id in &ids {
                call.arg(id);
            }
            if let Err(e) = self.state.invoke::<()>(&call).await {
                tracing::debug!(error = %e, "shared limits: could not renew leases");
            }
        }
    }

    /// Whether Redis is connected now (a request skips it while not).
    pub fn is_up(&self) -> bool {
        self.state.is_up()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        self.limits.forget(&self.set, &self.id);
        let (limits, set, id) = (self.limits.clone(), self.set.clone(), self.id.clone());
        self.limits.state.spawn(async move {
            let mut call = FINISH.prepare_invoke();
            call.key(&*set).key(&*set).arg(0).arg(0).arg(&id);
            let _ = limits.state.invoke::<()>(&call).await;
        });
    }
}
