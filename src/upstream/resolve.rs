//! Resolving an instance's host name, never on the request path: the instance watch resolves it
//! before each active health check and soon after a connect failure; requests read only the
//! last answer (`Instance::addr`).
//!
//! A lookup is the system resolver's (`getaddrinfo`: `/etc/hosts`, then DNS, per
//! `/etc/nsswitch.conf`) on Tokio's blocking pool. One runs at a time per instance; a round waits
//! for it at most `limit`, and a slower one is picked up by a later round while the last
//! addresses stay in use. A lookup that fails counts as a failed health check (so `health.fall`
//! of them take the instance out of rotation; a name that never resolved has no address and takes
//! no traffic at all), is counted in `instance_resolve_failures_total` and logged once when the
//! failures start and once when the name resolves again.

use super::Instance;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

type Lookup = JoinHandle<std::io::Result<Vec<SocketAddr>>>;

/// The resolver of one instance's name.
pub struct Resolver {
    instance: Arc<Instance>,
    pending: Option<Lookup>,
    last_answer: Option<Instant>,
}

impl Resolver {
    pub fn new(instance: Arc<Instance>) -> Resolver {
        Resolver {
            instance,
            pending: None,
            last_answer: None,
        }
    }

    /// Whether a lookup answered less than `gap` ago.
    pub fn answered_within(&self, gap: Duration) -> bool {
        self.last_answer.is_some_and(|t| t.elapsed() < gap)
    }

    /// Resolves the name (an IP literal needs nothing) and records the answer on the instance.
    /// `Err` says why there is nothing to check: the lookup failed, or no address is known yet
    /// and the lookup has not answered within `limit`.
    pub async fn refresh(&mut self, limit: Duration) -> Result<(), String> {
        let instance = &self.instance;
        if !instance.is_named() {
            return Ok(());
        }
        let (host, port) = (instance.upstream.host.clone(), instance.upstream.port);
        let lookup = self.pending.get_or_insert_with(|| {
            tokio::spawn(async move {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map(|addrs| addrs.collect())
            })
        });
        let answer = match tokio::time::timeout(limit, lookup).await {
            Ok(joined) => {
                self.pending = None;
                self.last_answer = Some(Instant::now());
                match joined {
                    Ok(Ok(list)) if !list.is_empty() => Ok(list),
                    Ok(Ok(_)) => Err("no addresses".to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("lookup task: {e}")),
                }
            }
            Err(_) if instance.addr().is_some() => return Ok(()),
            Err(_) => {
                return Err(format!(
                    "cannot resolve {}: no answer within {}",
                    instance.upstream.host,
                    humantime::format_duration(limit)
                ))
            }
        };
        match answer {
            Ok(list) => {
                if instance.set_resolve_error(None).is_some() {
                    tracing::info!(instance = %instance.name, name = %instance.upstream.host,
                        addresses = ?list, "instance name resolves again");
                }
                match instance.set_addresses(list) {
                    Some((None, Some(to))) => {
                        tracing::info!(instance = %instance.name, name = %instance.upstream.host,
                            address = %to, "instance name resolved")
                    }
                    Some((Some(from), Some(to))) => {
                        tracing::info!(instance = %instance.name, name = %instance.upstream.host,
                            %from, %to, "instance address changed")
                    }
                    _ => {}
                }
                Ok(())
            }
            Err(e) => {
                let reason = format!("cannot resolve {}: {e}", instance.upstream.host);
                crate::metrics::global().resolve_failure(&instance.name);
                if instance.set_resolve_error(Some(reason.clone())).is_none() {
                    tracing::warn!(instance = %instance.name, %reason,
                        "instance name does not resolve; its health checks fail until it does");
                }
                Err(reason)
            }
        }
    }
}
