//! Active health checks of external instances with pingora-load-balancing's `HttpHealthCheck`:
//! `GET /api/version` (cheap, never inference), `fall` failures in a row take an instance out of
//! rotation, `rise` successes bring it back. Supervised instances are checked by the
//! supervisor's liveness probe, which also restarts them.

use super::{Instance, InstanceState, Registry};
use crate::config::HealthFile;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;
use std::sync::Arc;

/// One instance's checker and its run of results.
struct Checker {
    instance: Arc<Instance>,
    check: HttpHealthCheck,
    /// Positive: successes in a row; negative: failures in a row.
    streak: i64,
}

impl Checker {
    fn new(instance: Arc<Instance>, config: &HealthFile) -> Option<Checker> {
        let mut check = HttpHealthCheck::new(&instance.host_header, instance.upstream.tls);
        let mut req = pingora_http::RequestHeader::build("GET", b"/api/version", None).ok()?;
        req.insert_header(http::header::HOST, &instance.host_header)
            .ok()?;
        req.insert_header(http::header::USER_AGENT, "ollama-sidecar-health")
            .ok()?;
        check.req = req;
        check.peer_template.options.connection_timeout = Some(config.timeout);
        check.peer_template.options.read_timeout = Some(config.timeout);
        check.consecutive_success = config.rise;
        check.consecutive_failure = config.fall;
        if instance.upstream.tls {
            check.peer_template.sni = instance.upstream.host.clone();
        }
        Some(Checker {
            instance,
            check,
            streak: 0,
        })
    }

    /// Runs one check and applies the thresholds; returns whether the state changed.
    async fn run_once(&mut self) -> bool {
        let ok = match self.instance.addr() {
            Some(addr) => match Backend::new(&addr.to_string()) {
                Ok(backend) => self.check.check(&backend).await.is_ok(),
                Err(_) => false,
            },
            None => false,
        };
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
        match state {
            InstanceState::Ready if self.streak <= -threshold(false) => {
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

fn checkers(registry: &Registry, config: &HealthFile) -> Vec<Checker> {
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
pub async fn initial_check(registry: &Registry, config: &HealthFile) {
    let mut checkers = checkers(registry, config);
    check_all(&mut checkers).await;
    for c in &checkers {
        if c.instance.state() != InstanceState::Ready {
            tracing::warn!(instance = %c.instance.name, url = %c.instance.upstream,
                "instance did not answer GET /api/version at startup; out of rotation until it does");
            c.instance.set_state(InstanceState::Unhealthy);
        }
    }
}

/// Checks every external instance every `interval`, forever.
pub async fn check_external_instances(registry: Arc<Registry>, config: HealthFile) {
    let mut checkers = checkers(&registry, &config);
    if checkers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if check_all(&mut checkers).await {
            registry.notify_changed();
        }
    }
}
