//! Which models each instance has loaded, read from `GET /api/ps` (never an inference route), so
//! dispatch can send a request where its model is already warm. A change re-runs dispatch.

use super::{client, model_key, Registry};
use crate::admission::Admission;
use std::sync::Arc;
use std::time::Duration;

/// The model names in an `/api/ps` answer, in `model_key` form.
pub fn parse_ps(body: &[u8]) -> Option<Vec<String>> {
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

/// Polls every ready instance's `/api/ps` each `interval`, forever.
pub async fn poll_loaded_models(registry: Arc<Registry>, interval: Duration) {
    let timeout = interval.min(Duration::from_secs(5));
    loop {
        for instance in registry.all() {
            let Some(addr) = instance.addr().filter(|_| instance.is_ready()) else {
                continue;
            };
            let answer = client::request(
                addr,
                &instance.host_header,
                http::Method::GET,
                "/api/ps",
                None,
                timeout,
            )
            .await;
            let Some(models) = answer
                .ok()
                .filter(|a| a.status == 200)
                .and_then(|a| parse_ps(&a.body))
            else {
                continue;
            };
            let mut current = instance.loaded_models();
            current.sort();
            if current != models {
                tracing::debug!(instance = %instance.name, ?models, "loaded models changed");
                instance.set_loaded_models(models);
                registry.notify_changed();
            }
        }
        tokio::time::sleep(interval).await;
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
    use super::parse_ps;

    #[test]
    fn parses_ps() {
        let body = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},{"name":"qwen","model":"qwen"}]}"#;
        assert_eq!(
            parse_ps(body).unwrap(),
            vec!["llama3.2:latest".to_string(), "qwen:latest".to_string()]
        );
        assert_eq!(parse_ps(br#"{"models":[]}"#).unwrap(), Vec::<String>::new());
        assert!(parse_ps(b"nope").is_none());
    }
}
