//! Active health checks of external instances with pingora-load-balancing's `HttpHealthCheck`:
//! `GET /api/version` (cheap, never inference), `fall` failures in a row take an instance out of
//! rotation, `rise` successes bring it back. Supervised instances are checked by the
//! supervisor's liveness probe, which also restarts them.
//!
//! Each check first resolves an instance named by a host name again (`resolve.rs`), then asks
//! the address in use; when it does not answer, the name's other addresses in order, and the
//! first that answers carries the traffic from then on.

use super::resolve::Resolver;
use super::{Instance, InstanceState, Registry};
use crate::config::HealthConfig;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A connect failure in real traffic resolves the name again, at most this often.
const RESOLVE_AFTER_FAILURE_GAP: Duration = Duration::from_secs(1);

/// One instance's checker and its run of results.
struct Checker {
    instance: Arc<Instance>,
    check: HttpHealthCheck,
    resolver: Resolver,
    timeout: Duration,
    /// Time between checks: with `rise`, when a failing instance can be ready at the earliest.
    interval: Duration,
    /// Positive: successes in a row; negative: failures in a row.
    streak: i64,
}

impl Checker {
    fn new(instance: Arc<Instance>, config: &HealthConfig) -> Option<Checker> {
        let written = instance.upstream.host_header();
        let mut check = HttpHealthCheck::new(&written, instance.upstream.tls);
        let mut req = pingora_http::RequestHeader::build("GET", b"/api/version", None).ok()?;
        // The Host header is set per address when a check runs.
        req.insert_header(http::header::HOST, &written).ok()?;
        req.insert_header(http::header::USER_AGENT, "ollama-sidecar-health")
            .ok()?;
        check.req = req;
        check.peer_template.options.connection_timeout = Some(config.timeout);
        check.peer_template.options.read_timeout = Some(config.timeout);
        check.consecutive_success = config.rise;
        check.consecutive_failure = config.fall;
        if instance.upstream.tls {
            // The same SNI as the proxied requests' (`target::http_peer`): the name as written.
            check.peer_template.sni = instance.upstream.host.clone();
        }
        Some(Checker {
            resolver: Resolver::new(instance.clone()),
            instance,
            check,
            timeout: config.timeout,
            interval: config.interval,
            streak: 0,
        })
    }

    /// Resolves the name, then checks the address in use and, when it fails, the others in
    /// order; `Err` says why none answered.
    async fn probe(&mut self) -> Result<(), String> {
        self.resolver.refresh(self.timeout).await?;
        let mut failure = format!("{} has no address", self.instance.upstream.host);
        for addr in self.instance.addresses().in_trial_order() {
            match self.check_at(addr).await {
                Ok(()) => {
                    if self.instance.prefer_addr(addr) {
                        tracing::info!(instance = %self.instance.name, address = %addr,
                            "instance answers on another of its addresses: using it");
                    }
                    return Ok(());
                }
                Err(e) => failure = e,
            }
        }
        Err(failure)
    }

    async fn check_at(&mut self, addr: SocketAddr) -> Result<(), String> {
        let failed = |e: &dyn std::fmt::Display| format!("GET /api/version at {addr}: {e}");
        let backend = Backend::new(&addr.to_string()).map_err(|e| failed(&e))?;
        self.check
            .req
            .insert_header(http::header::HOST, self.instance.host_header_for(addr))
            .map_err(|e| failed(&e))?;
        let Err(e) = self.check.check(&backend).await else {
            return Ok(());
        };
        let mut cause = describe(&e, self.timeout);
        if let pingora_error::ErrorType::CustomCode(_, _) = e.etype() {
            // Pingora's check reads only the status: ask once more for what the body says.
            let host = self.instance.host_header_for(addr);
            if let Some(body) = body_excerpt(addr, host, self.timeout).await {
                cause = format!("{cause}: {body}");
            }
        }
        Err(failed(&cause))
    }

    /// Runs one check and applies the thresholds; returns whether the state changed.
    async fn run_once(&mut self) -> bool {
        let result = self.probe().await;
        let ok = result.is_ok();
        let before = self.instance.problem();
        match (&result, &before) {
            // Logged when failures start and when their cause changes, not every interval.
            (Err(e), Some(b)) if e == b => {
                tracing::debug!(instance = %self.instance.name, error = %e, "health check failed")
            }
            (Err(e), _) => {
                tracing::warn!(instance = %self.instance.name, error = %e, "health check failed")
            }
            (Ok(()), Some(b)) => {
                tracing::info!(instance = %self.instance.name, previous_error = %b, "health check passes again")
            }
            (Ok(()), None) => {}
        }
        self.instance.set_problem(result.err());
        crate::metrics::global()
            .health_check(&self.instance.name, if ok { "success" } else { "failure" });
        self.streak = match (ok, self.streak) {
            (true, s) if s > 0 => s + 1,
            (true, _) => 1,
            (false, s) if s < 0 => s - 1,
            (false, _) => -1,
        };
        let state = self.instance.state();
        let threshold = |success: bool| self.check.health_threshold(success) as i64;
        // The earliest it can be ready: after the passes it still needs, one per interval.
        let passes = if state == InstanceState::Starting {
            1
        } else {
            threshold(true).max(1)
        };
        self.instance.set_ready_not_before((!ok).then(|| {
            let wait = self
                .interval
                .saturating_mul(u32::try_from(passes).unwrap_or(u32::MAX));
            (std::time::Instant::now() + wait, "failing health checks")
        }));
        match state {
            InstanceState::Ready if self.streak <= -threshold(false) => {
                let error = self.instance.problem().unwrap_or_default();
                tracing::warn!(instance = %self.instance.name, %error, failures = -self.streak,
                    "instance out of rotation: its health checks fail");
                self.instance.set_state(InstanceState::Unhealthy);
                true
            }
            InstanceState::Unhealthy | InstanceState::Starting
                if self.streak >= threshold(true) || (state == InstanceState::Starting && ok) =>
            {
                self.instance.set_state(InstanceState::Ready);
                true
            }
            InstanceState::Starting if self.streak <= -threshold(false) => {
                self.instance.set_state(InstanceState::Unhealthy);
                true
            }
            _ => false,
        }
    }
}

/// A check's failure in the words an operator reads: `connection refused`, `no answer within
/// 1s`, `answered 503`... (Pingora's own text repeats the address and its contexts).
fn describe(e: &pingora_error::Error, timeout: Duration) -> String {
    use pingora_error::ErrorType as T;
    let within = humantime::format_duration(timeout);
    match e.etype() {
        T::CustomCode(_, status) => format!("answered {status}"),
        T::ConnectRefused => "connection refused".to_string(),
        T::ConnectTimedout => format!("connect timed out after {within}"),
        T::ReadTimedout | T::WriteTimedout => format!("no answer within {within}"),
        T::ConnectNoRoute => "no route to host".to_string(),
        _ => {
            let root = e.root_cause();
            if root.is::<pingora_error::Error>() {
                e.root_etype().as_str().to_string()
            } else {
                format!("{}: {root}", e.etype().as_str())
            }
        }
    }
}

/// Longest part of a failing check's body kept in its cause.
const BODY_EXCERPT: usize = 200;

/// The start of what `GET /api/version` answers at `addr`, on one line.
async fn body_excerpt(addr: SocketAddr, host: &str, timeout: Duration) -> Option<String> {
    let answer =
        super::client::request(addr, host, http::Method::GET, "/api/version", None, timeout)
            .await
            .ok()?;
    let text = String::from_utf8_lossy(&answer.body);
    let text: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(BODY_EXCERPT)
        .collect();
    (!text.is_empty()).then_some(text)
}

fn checkers(registry: &Registry, config: &HealthConfig) -> Vec<Checker> {
    registry
        .all()
        .iter()
        .filter(|i| !i.supervised)
        .filter_map(|i| Checker::new(i.clone(), config))
        .collect()
}

async fn check_all(checkers: &mut [Checker]) -> bool {
    futures_util::future::join_all(checkers.iter_mut().map(|c| c.run_once()))
        .await
        .into_iter()
        .any(|changed| changed)
}

/// Checks every external instance once, before the proxy starts taking requests, so traffic
/// never goes to one that is down at startup (and none waits for a first check that is due).
pub async fn initial_check(registry: &Registry, config: &HealthConfig) {
    let mut checkers = checkers(registry, config);
    check_all(&mut checkers).await;
    for c in &checkers {
        if c.instance.state() != InstanceState::Ready {
            let problem = c.instance.problem().unwrap_or_default();
            tracing::warn!(instance = %c.instance.name, url = %c.instance.upstream, %problem,
                "instance is not ready at startup; out of rotation until its health checks pass");
            c.instance.set_state(InstanceState::Unhealthy);
        }
    }
}

/// Checks every external instance every `interval`, forever; between checks, resolves a name
/// again when a connection to its instance failed.
pub async fn check_external_instances(registry: Arc<Registry>, config: HealthConfig) {
    let mut config = Arc::new(config);
    let mut listed = registry.all();
    let mut checkers = checkers(&registry, &config);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = registry.health();
                if format!("{now:?}") != format!("{config:?}") {
                    // A reload changed the settings: new checkers (their streaks start
                    // again; the instances keep their state) and a new period.
                    config = now;
                    checkers = self::checkers(&registry, &config);
                    listed = registry.all();
                    tick = tokio::time::interval(config.interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick.tick().await;
                }
                follow_reload(&registry, &config, &mut listed, &mut checkers);
                if check_all(&mut checkers).await {
                    registry.notify_changed();
                }
            }
            _ = registry.resolve_wanted().notified() => {
                for c in &mut checkers {
                    if c.resolver.answered_within(RESOLVE_AFTER_FAILURE_GAP)
                        || !c.instance.take_resolve_wanted()
                    {
                        continue;
                    }
                    // A failure here is the next check's to count.
                    let _ = c.resolver.refresh(c.timeout).await;
                }
            }
        }
    }
}

/// After a reload changed the instance set: a retired instance is checked no more, an added
/// external one gets a checker (it stays out of rotation until its first check passes).
fn follow_reload(
    registry: &Registry,
    config: &HealthConfig,
    listed: &mut Arc<Vec<Arc<crate::upstream::Instance>>>,
    checkers: &mut Vec<Checker>,
) {
    let now = registry.all();
    if Arc::ptr_eq(&now, listed) {
        return;
    }
    checkers.retain(|c| !c.instance.is_retired());
    for instance in now.iter().filter(|i| !i.supervised) {
        if !checkers.iter().any(|c| Arc::ptr_eq(&c.instance, instance)) {
            checkers.extend(Checker::new(instance.clone(), config));
        }
    }
    *listed = now;
}

#[cfg(test)]
mod tests {
    use super::describe;
    use pingora_error::{Error, ErrorType};
    use std::time::Duration;

    #[test]
    fn causes_in_words() {
        let t = Duration::from_secs(1);
        let cause = |etype| describe(&Error::new(etype), t);
        assert_eq!(cause(ErrorType::ConnectRefused), "connection refused");
        assert_eq!(
            cause(ErrorType::ConnectTimedout),
            "connect timed out after 1s"
        );
        assert_eq!(cause(ErrorType::ReadTimedout), "no answer within 1s");
        assert_eq!(
            cause(ErrorType::CustomCode("non 200 code", 503)),
            "answered 503"
        );
        assert_eq!(cause(ErrorType::ConnectNoRoute), "no route to host");
    }
}
