//! How many requests a loaded model runs at once in Ollama. `OLLAMA_NUM_PARALLEL` (the
//! instance's `num_parallel`) applies to most, but server/sched.go `load` gives one slot to a
//! model without the completion capability (an embedding model) and to the model families whose
//! runners are not safe with more (`ModelFamily` in its list). A second request sent to such a
//! model waits inside Ollama, where no priority or fairness of the sidecar's applies; so the
//! sidecar asks each instance's `/api/show` once per installed model (its `capabilities` and
//! `details.family`, which is `ModelFamily`) and gives those models one slot.

use super::{client, Instance};
use serde::Deserialize;
use std::time::Duration;

/// The families sched.go `load` runs one request at a time (Ollama as of August 2026).
const ONE_AT_A_TIME_FAMILIES: &[&str] = &[
    "mllama",
    "qwen3vl",
    "qwen3vlmoe",
    "qwen35",
    "qwen35moe",
    "qwen3next",
    "lfm2",
    "lfm2moe",
    "nemotron_h",
    "nemotron_h_moe",
    "nemotron_h_omni",
];

/// How many models one refresh asks about per instance (the rest wait for the next one), so a
/// box with hundreds of models does not answer hundreds of `/api/show` at once.
const SHOWS_PER_REFRESH: usize = 16;

#[derive(Deserialize)]
struct Show {
    /// Absent in Ollama releases before capabilities were reported: nothing is known then.
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    details: Details,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    family: String,
}

/// Whether an `/api/show` answer describes a model Ollama runs one request at a time; `None`
/// when the answer does not say.
fn runs_one_at_a_time(show: &[u8]) -> Option<bool> {
    let show: Show = serde_json::from_slice(show).ok()?;
    if ONE_AT_A_TIME_FAMILIES.contains(&show.details.family.as_str()) {
        return Some(true);
    }
    let capabilities = show.capabilities?;
    Some(!capabilities.iter().any(|c| c == "completion"))
}

/// Asks the instance about the installed models it has not been asked about yet (at most
/// [`SHOWS_PER_REFRESH`]). A model whose answer fails or says nothing is asked again next time;
/// an instance that does not answer at all is left until the next refresh, so one that hangs
/// holds up the refresh of the others for one timeout, not one per model.
pub async fn learn(instance: &Instance, timeout: Duration) {
    let Some((addr, host)) = instance.target().filter(|_| instance.is_ready()) else {
        return;
    };
    for model in instance.parallel_unknown(SHOWS_PER_REFRESH) {
        let body = serde_json::json!({ "model": model });
        let answer = client::post_json(addr, host, "/api/show", &body, timeout).await;
        match answer {
            Ok(a) if a.status == 200 => {
                if let Some(one) = runs_one_at_a_time(&a.body) {
                    if one {
                        tracing::info!(instance = %instance.name, model, "model runs one request at a time");
                    }
                    instance.set_one_at_a_time(&model, one);
                }
            }
            Ok(a) => {
                tracing::debug!(instance = %instance.name, model, status = a.status, "show failed")
            }
            Err(e) => {
                tracing::debug!(instance = %instance.name, model, error = %e, "show failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::runs_one_at_a_time;

    #[test]
    fn embedding_models_and_listed_families_run_one_at_a_time() {
        let show = |caps: &str, family: &str| {
            format!(r#"{{"capabilities":{caps},"details":{{"family":"{family}"}}}}"#)
        };
        let one = |s: String| runs_one_at_a_time(s.as_bytes());
        assert_eq!(one(show(r#"["embedding"]"#, "nomic-bert")), Some(true));
        assert_eq!(one(show(r#"["completion","tools"]"#, "llama")), Some(false));
        assert_eq!(
            one(show(r#"["completion","vision"]"#, "mllama")),
            Some(true)
        );
        assert_eq!(one(r#"{"details":{"family":"llama"}}"#.into()), None);
        assert_eq!(one("not json".into()), None);
    }
}
