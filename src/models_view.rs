//! The fleet's model lists, answered by the sidecar: `/api/tags`, `/api/ps` and `/v1/models` as
//! the merged view of every ready instance, in Ollama's shape, each model once, in a stable
//! order. Forwarding them to one instance would make the list depend on which instance answered.
//! Reading `/api/tags` also refreshes what dispatch knows each instance has installed.

use crate::upstream::{client, models::parse_model_list, Instance, Registry};
use bytes::Bytes;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A list the sidecar merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelList {
    /// `/api/tags`: installed models, newest first (Ollama's ListHandler order).
    Tags,
    /// `/api/ps`: loaded models, latest expiry first (Ollama's PsHandler order).
    Running,
    /// `/v1/models`: installed models as OpenAI objects, newest first.
    OpenAi,
}

impl ModelList {
    /// The list a GET or HEAD of the route `pattern` (the classified route's name) asks for,
    /// in a fleet of `instances`. A single instance's own answer is its fleet's view: it is
    /// forwarded as it is (query, headers and all).
    pub fn for_request(
        method: &http::Method,
        pattern: &str,
        instances: usize,
    ) -> Option<ModelList> {
        if instances < 2 || (method != http::Method::GET && method != http::Method::HEAD) {
            return None;
        }
        match pattern {
            "/api/tags" => Some(ModelList::Tags),
            "/api/ps" => Some(ModelList::Running),
            "/v1/models" => Some(ModelList::OpenAi),
            _ => None,
        }
    }

    fn path(self) -> &'static str {
        match self {
            ModelList::Tags => "/api/tags",
            ModelList::Running => "/api/ps",
            ModelList::OpenAi => "/v1/models",
        }
    }

    /// The array's key in the answer, and the field naming an entry.
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            ModelList::Tags | ModelList::Running => ("models", "name"),
            ModelList::OpenAi => ("data", "id"),
        }
    }

    /// The field entries are ordered by, newest (largest) first.
    fn order_key(self) -> &'static str {
        match self {
            ModelList::Tags => "modified_at",
            ModelList::Running => "expires_at",
            ModelList::OpenAi => "created",
        }
    }
}

/// Why the merged list cannot be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewError {
    NoInstanceReady,
    NoAnswer,
}

/// Asks every ready instance for `list` at once (each bounded by `timeout`) and merges the
/// answers. Instances that do not answer are left out; `/api/tags` answers update each
/// instance's installed models.
pub async fn fetch(
    registry: &Registry,
    list: ModelList,
    timeout: Duration,
) -> Result<Bytes, ViewError> {
    let all = registry.all();
    let ready: Vec<&Arc<Instance>> = all.iter().filter(|i| i.is_ready()).collect();
    if ready.is_empty() {
        return Err(ViewError::NoInstanceReady);
    }
    let asks = ready.iter().map(|instance| async move {
        let (addr, host) = instance.target()?;
        let answer = client::request(addr, host, http::Method::GET, list.path(), None, timeout)
            .await
            .ok()
            .filter(|a| a.status == 200)?;
        if list == ModelList::Tags {
            if let Some(models) = parse_model_list(&answer.body) {
                if instance.set_installed_models(models) {
                    registry.notify_changed();
                }
            }
        }
        serde_json::from_slice::<Value>(&answer.body).ok()
    });
    let answers: Vec<Value> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    if answers.is_empty() {
        return Err(ViewError::NoAnswer);
    }
    Ok(Bytes::from(merge(list, &answers).to_string()))
}

/// One list from several instances' answers: each model once (the entry with the newest order
/// field wins), ordered newest first, then by name, so equal inputs give equal outputs.
pub fn merge(list: ModelList, answers: &[Value]) -> Value {
    let (array, name) = list.keys();
    let order = list.order_key();
    let mut merged: Vec<&Value> = Vec::new();
    for entry in answers
        .iter()
        .filter_map(|a| a.get(array)?.as_array())
        .flatten()
    {
        let Some(id) = entry.get(name).and_then(Value::as_str) else {
            continue;
        };
        match merged
            .iter_mut()
            .find(|e| e.get(name).and_then(Value::as_str) == Some(id))
        {
            Some(kept) => {
                if newer(entry, kept, order) == Ordering::Less {
                    *kept = entry;
                }
            }
            None => merged.push(entry),
        }
    }
    merged.sort_by(|a, b| {
        newer(a, b, order).then_with(|| {
            let n = |v: &Value| v.get(name).and_then(Value::as_str).map(str::to_owned);
            n(a).cmp(&n(b))
        })
    });
    let mut out = Map::new();
    if list == ModelList::OpenAi {
        out.insert("object".into(), Value::from("list"));
    }
    out.insert(
        array.into(),
        Value::Array(merged.into_iter().cloned().collect()),
    );
    Value::Object(out)
}

/// `Less` when `a` sorts before `b`: the larger order field (a later time) first. Times are
/// RFC 3339 text (compared as text) or Unix seconds.
fn newer(a: &Value, b: &Value, key: &str) -> Ordering {
    match (a.get(key), b.get(key)) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => y
            .as_f64()
            .partial_cmp(&x.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => y.cmp(x),
        _ => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tags_are_merged_once_each_newest_first_and_stable() {
        let a = json!({"models": [
            {"name": "llama3.2:latest", "modified_at": "2026-11-01T10:00:00Z", "size": 1},
            {"name": "qwen2.5:0.5b", "modified_at": "2026-11-02T10:00:00Z"}
        ]});
        let b = json!({"models": [
            {"name": "qwen2.5:0.5b", "modified_at": "2026-11-03T10:00:00Z"},
            {"name": "bge:latest", "modified_at": "2026-11-01T10:00:00Z"}
        ]});
        let ab = merge(ModelList::Tags, &[a.clone(), b.clone()]);
        let names: Vec<&str> = ab["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["qwen2.5:0.5b", "bge:latest", "llama3.2:latest"]);
        assert_eq!(ab["models"][0]["modified_at"], "2026-11-03T10:00:00Z");
        // The order of the answers does not matter.
        assert_eq!(ab, merge(ModelList::Tags, &[b, a]));
    }

    #[test]
    fn openai_list_keeps_its_shape() {
        let a = json!({"object": "list", "data": [{"id": "x:latest", "object": "model", "created": 5, "owned_by": "library"}]});
        let b = json!({"object": "list", "data": [{"id": "y:latest", "object": "model", "created": 9, "owned_by": "library"}]});
        let v = merge(ModelList::OpenAi, &[a, b]);
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "y:latest");
        assert_eq!(v["data"][1]["id"], "x:latest");
    }

    #[test]
    fn routes() {
        let get = http::Method::GET;
        assert_eq!(
            ModelList::for_request(&get, "/api/ps", 2),
            Some(ModelList::Running)
        );
        assert_eq!(
            ModelList::for_request(&http::Method::POST, "/api/tags", 2),
            None
        );
        assert_eq!(ModelList::for_request(&get, "/api/show", 2), None);
        assert_eq!(ModelList::for_request(&get, "/api/tags", 1), None);
    }
}
