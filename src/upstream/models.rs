//! Which models each instance has loaded, read from `GET /api/ps` (never an inference route), so
//! dispatch can send a request where its model is already warm. A change re-runs dispatch.

use super::{client, model_key, Instance, Registry};
use crate::admission::Admission;
use std::sync::Arc;
use std::time::Duration;

/// The model names in an `/api/ps` or `/api/tags` answer, in `model_key` form.
pub fn parse_model_list(body: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let models = v.get("models")?.as_array()?;
    let mut names: Vec<String> = models
        .iter()
        .filter_map(|m| m.get("model").or_else(|| m.get("name"))?.as_str())
        .map(model_key)
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

/// The models a ready instance lists at `path` (`/api/ps`: loaded; `/api/tags`: installed);
/// `None` when it is not ready or does not answer well within `timeout`.
pub async fn model_list(instance: &Instance, path: &str, timeout: Duration) -> Option<Vec<String>> {
    let (addr, host) = instance.target().filter(|_| instance.is_ready())?;
    let answer = client::request(addr, host, http::Method::GET, path, None, timeout).await;
    match answer {
        Ok(a) if a.status == 200 => parse_model_list(&a.body),
        Ok(a) => {
            tracing::debug!(instance = %instance.name, path, status = a.status, "model list failed");
            None
        }
        Err(e) => {
            tracing::debug!(instance = %instance.name, path, error = %e, "model list failed");
            None
        }
    }
}

/// How often instances the sidecar just made load a model are looked at between polls.
const STALE_CHECK: Duration = Duration::from_millis(100);

/// Polls every ready instance's `/api/ps` (loaded) and `/api/tags` (installed) each
/// `interval`, and at once after a model-management request, forever. An instance the sidecar
/// just made load a model has its `/api/ps` read again within [`STALE_CHECK`], so the model the
/// load evicted leaves the view before the next poll.
pub async fn poll_loaded_models(registry: Arc<Registry>, first: Duration) {
    let mut interval = first;
    loop {
        let timeout = interval.min(Duration::from_secs(5));
        for instance in registry.all().iter() {
            instance.take_loaded_stale();
            refresh(&registry, instance, timeout).await;
        }
        let next = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                _ = registry.models_stale().notified() => break,
                _ = tokio::time::sleep(STALE_CHECK) => {
                    for instance in registry.all().iter() {
                        if instance.take_loaded_stale() {
                            refresh_loaded(&registry, instance, timeout).await;
                        }
                    }
                }
            }
        }
        // A reload may have changed it.
        interval = registry.health().models_interval;
    }
}

/// Reads one instance's model lists; a change re-runs dispatch.
pub async fn refresh(registry: &Registry, instance: &Instance, timeout: Duration) {
    if let Some(models) = model_list(instance, "/api/tags", timeout).await {
        if instance.set_installed_models(models) {
            tracing::debug!(instance = %instance.name, "installed models changed");
            registry.notify_changed();
        }
        super::parallel::learn(instance, timeout).await;
    }
    refresh_loaded(registry, instance, timeout).await;
}

/// Reads one instance's `/api/ps`; a change re-runs dispatch.
async fn refresh_loaded(registry: &Registry, instance: &Instance, timeout: Duration) {
    let Some(models) = model_list(instance, "/api/ps", timeout).await else {
        return;
    };
    let mut current = instance.loaded_models();
    current.sort();
    let changed = current != models;
    if changed {
        tracing::debug!(instance = %instance.name, ?models, "loaded models changed");
    }
    // Even when it matches the view (the sidecar noted the loads it caused), the answer
    // confirms the noted models and teaches how many fit.
    instance.set_loaded_models(models);
    if changed {
        registry.notify_changed();
    }
}

/// Re-runs dispatch whenever an instance changes (state, loaded models), forever.
pub async fn poke_on_change(registry: Arc<Registry>, admission: Arc<Admission>) {
    loop {
        registry.changed().notified().await;
        admission.poke();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_model_list;

    #[test]
    fn parses_ps() {
        let body = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},{"name":"qwen","model":"qwen"}]}"#;
        assert_eq!(
            parse_model_list(body).unwrap(),
            vec!["llama3.2:latest".to_string(), "qwen:latest".to_string()]
        );
        assert_eq!(
            parse_model_list(br#"{"models":[]}"#).unwrap(),
            Vec::<String>::new()
        );
        assert!(parse_model_list(b"nope").is_none());
    }
}
