//! Model placement: the swapping mock (memory budget, eviction, load time by size) and the
//! sidecar's dispatch over instances that hold different models, through the real binaries.

mod common;

use common::{client, mock_stats, Mock};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn generate(base: &str, model: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{base}/api/generate"))
        .json(&json!({"model": model, "prompt": "hi", "stream": false}))
        .send()
        .expect("generate");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .and_then(|r| r.json())
        .expect("json")
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("name").or_else(|| m.get("id"))?.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The mock swaps like Ollama: two small models fit where one large one does, loading one
/// evicts the idle large model, `/api/ps` tells the truth, load time grows with size and is
/// reported as `load_duration`, and `/mock/stats` counts cold loads and evictions.
#[test]
fn mock_swaps_models_within_its_memory_budget() {
    let mock = Mock::start(&[
        ("MOCK_MODELS", "big=2GB,small-a=500MB,small-b=500MB"),
        ("MOCK_MEMORY", "2.4GB"),
        ("MOCK_LOAD_MS_PER_GB", "200"),
    ]);
    let base = mock.url("");
    let t = Instant::now();
    let (status, v) = generate(&base, "big");
    assert_eq!(status, 200, "{v}");
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert!(v["load_duration"].as_u64().unwrap() >= 400_000_000, "{v}");
    assert_eq!(
        names(&get_json(&mock.url("/api/ps")), "models"),
        ["big:latest"]
    );

    let (_, v) = generate(&base, "small-a");
    assert!(v["load_duration"].as_u64().unwrap() >= 100_000_000, "{v}");
    generate(&base, "small-b");
    let mut ps = names(&get_json(&mock.url("/api/ps")), "models");
    ps.sort();
    assert_eq!(ps, ["small-a:latest", "small-b:latest"]);
    // Warm: no load.
    let (_, v) = generate(&base, "small-a");
    assert!(v["load_duration"].as_u64().unwrap() < 50_000_000, "{v}");
    let stats = mock_stats(&mock);
    assert_eq!(stats["cold_loads"], 3, "{stats}");
    assert_eq!(stats["evictions"], 1, "{stats}");
}

/// OLLAMA_MAX_LOADED_MODELS=1: a request for another model waits while the loaded one is busy
/// (it is not evicted under a running request), then evicts it.
#[test]
fn mock_waits_for_a_busy_model_before_evicting_it() {
    let mock = Mock::start(&[
        ("MOCK_MODELS", "a,b"),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),
        ("MOCK_TOKEN_DELAY_MS", "100"),
        ("MOCK_TOKENS", "6"),
    ]);
    let base = mock.url("");
    let busy = std::thread::spawn({
        let base = base.clone();
        move || generate(&base, "a")
    });
    assert!(common::wait_until(Duration::from_secs(5), || {
        mock_stats(&mock)["inference_in_flight"] == 1
    }));
    let t = Instant::now();
    let (status, _) = generate(&base, "b");
    assert_eq!(status, 200);
    assert_eq!(busy.join().unwrap().0, 200);
    // b could only load once a's 600 ms answer was done.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        names(&get_json(&mock.url("/api/ps")), "models"),
        ["b:latest"]
    );
    let stats = mock_stats(&mock);
    assert_eq!(stats["evictions"], 1, "{stats}");
    assert_eq!(stats["cold_loads"], 2, "{stats}");
}
