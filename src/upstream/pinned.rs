//! Keeps `pinned: true` models loaded: each ready instance that a pinned model's rule allows and
//! that has the model installed is asked to load it for good, as Ollama's API allows: a generate
//! request with no prompt and `keep_alive: -1` (server/routes.go `GenerateHandler` answers an
//! empty prompt once the model is loaded; a negative keep-alive never expires, and
//! sched.go `findRunnerToUnload` evicts such a model last).
//!
//! The pin is sent again
//! - when the instance becomes ready (at start, after a supervised restart, when an external
//!   instance comes back): its models were lost;
//! - when the model is seen missing from the instance (something evicted it, or a request the
//!   sidecar could not read, a compressed body, set a shorter `keep_alive`).
//!
//! A client's own `keep_alive` cannot unpin the model: the proxy sends its requests with
//! `keep_alive: -1` (`proxy/keep_alive_policy.rs`).

use super::{client, Instance, Registry};
use crate::admission::pinned_models;
use crate::config::ModelRulesConfig;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How often pins are checked.
const CHECK: Duration = Duration::from_millis(200);
/// How long a pin may take (a cold load of a large model takes minutes).
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// After a failed pin, the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the keeper knows of one (instance, model).
#[derive(Default)]
struct Pin {
    /// Pinned since the instance last became ready.
    done: bool,
    not_before: Option<Instant>,
}

#[derive(Default)]
struct Keeper {
    pins: HashMap<(usize, String), Pin>,
    was_ready: Vec<bool>,
}

/// Runs forever, keeping every pinned model pinned; returns at once without pinned rules.
pub async fn keep_pinned(registry: Arc<Registry>, rules: ModelRulesConfig) {
    if !rules.rules.iter().any(|r| r.pinned) {
        return;
    }
    let keeper = Arc::new(Mutex::new(Keeper::default()));
    let loading: Arc<Mutex<HashSet<(usize, String)>>> = Arc::default();
    loop {
        for instance in registry.all().iter() {
            // By the instance's index, which a reload that removes another one does not move.
            let pos = instance.index;
            let due = due_pins(&keeper, pos, instance, &rules);
            for model in due {
                let key = (pos, model.clone());
                let Ok(mut l) = loading.lock() else { continue };
                if !l.insert(key.clone()) {
                    continue;
                }
                drop(l);
                let (instance, keeper, loading) =
                    (instance.clone(), keeper.clone(), loading.clone());
                tokio::spawn(async move {
                    let ok = pin(&instance, &model).await;
                    if let Ok(mut k) = keeper.lock() {
                        let p = k.pins.entry(key.clone()).or_default();
                        p.done = ok;
                        p.not_before = (!ok).then(|| Instant::now() + RETRY_AFTER);
                    }
                    if let Ok(mut l) = loading.lock() {
                        l.remove(&key);
                    }
                });
            }
        }
        tokio::time::sleep(CHECK).await;
    }
}

/// The pinned models instance `pos` should be asked to load now.
fn due_pins(
    keeper: &Mutex<Keeper>,
    pos: usize,
    instance: &Instance,
    rules: &ModelRulesConfig,
) -> Vec<String> {
    let Ok(mut k) = keeper.lock() else {
        return Vec::new();
    };
    if k.was_ready.len() <= pos {
        k.was_ready.resize(pos + 1, false);
    }
    let ready = instance.is_ready();
    let came_back = ready && !k.was_ready[pos];
    k.was_ready[pos] = ready;
    if !ready {
        return Vec::new();
    }
    let installed = instance.installed_models().unwrap_or_default();
    let now = Instant::now();
    let mut due = Vec::new();
    for model in pinned_models(rules, &instance.name, &installed) {
        let p = k.pins.entry((pos, model.clone())).or_default();
        if came_back || !instance.has_model(&model) {
            p.done = false;
        }
        if !p.done && p.not_before.is_none_or(|t| t <= now) {
            due.push(model);
        }
    }
    due
}

/// Asks `instance` to load `model` for good; true when it answered 200.
async fn pin(instance: &Instance, model: &str) -> bool {
    let Some((addr, host)) = instance.target() else {
        return false;
    };
    let body = serde_json::json!({ "model": model, "keep_alive": -1 });
    let started = Instant::now();
    let answer = client::post_json(addr, host, "/api/generate", &body, LOAD_TIMEOUT).await;
    match answer {
        Ok(a) if a.status == 200 => {
            instance.note_model(model);
            instance.mark_loaded_stale();
            tracing::debug!(instance = %instance.name, model, took_ms = started.elapsed().as_millis() as u64, "pinned model loaded");
            true
        }
        Ok(a) => {
            tracing::warn!(instance = %instance.name, model, status = a.status,
                body = %String::from_utf8_lossy(&a.body), "cannot pin model");
            false
        }
        Err(e) => {
            tracing::warn!(instance = %instance.name, model, error = %e, "cannot pin model");
            false
        }
    }
}
