//! Model placement: the swapping mock (memory budget, eviction, load time by size) and the
//! sidecar's dispatch over instances that hold different models, through the real binaries.

mod common;

use common::{client, mock_stats, Mock, Sidecar};
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

fn model_names_of(mock: &Mock) -> Vec<String> {
    common::mock_requests(mock)
        .iter()
        .filter(|r| r["route"] == "/api/generate")
        .filter_map(|r| r["model"].as_str().map(str::to_string))
        .collect()
}

/// Two instances with different installed models: every request reaches an instance that has
/// its model, a model nobody has gets Ollama's own 404, the model lists are the merged view
/// (each model once, the same on every call), and a model pulled through the sidecar is served
/// right after the pull.
#[test]
fn dispatch_sends_each_request_where_its_model_is_installed() {
    let m0 = Mock::start(&[("MOCK_MODELS", "only-zero:latest,shared:latest")]);
    let m1 = Mock::start(&[("MOCK_MODELS", "only-one:latest,shared:latest")]);
    let sidecar = Sidecar::start(&common::external_instances(&[&m0, &m1], 2));
    let base = sidecar.url("");
    let tags = |path: &str| get_json(&sidecar.url(path));
    assert!(
        common::wait_until(Duration::from_secs(15), || {
            names(&tags("/api/tags"), "models").len() == 3
        }),
        "merged tags: {}",
        tags("/api/tags")
    );
    let first = tags("/api/tags");
    let mut listed = names(&first, "models");
    listed.sort();
    assert_eq!(
        listed,
        ["only-one:latest", "only-zero:latest", "shared:latest"]
    );
    for _ in 0..3 {
        assert_eq!(tags("/api/tags"), first, "the merged list is stable");
    }
    let v1 = tags("/v1/models");
    assert_eq!(v1["object"], "list");
    assert_eq!(names(&v1, "data").len(), 3, "{v1}");

    for i in 0..12 {
        let model = ["only-zero", "only-one:latest", "shared"][i % 3];
        let (status, v) = generate(&base, model);
        assert_eq!(status, 200, "{model}: {v}");
    }
    let on0 = model_names_of(&m0);
    let on1 = model_names_of(&m1);
    assert!(!on0.iter().any(|m| m.starts_with("only-one")), "{on0:?}");
    assert!(!on1.iter().any(|m| m.starts_with("only-zero")), "{on1:?}");
    assert_eq!(on0.len() + on1.len(), 12);

    // Loaded models, merged the same way.
    let mut ps = names(&tags("/api/ps"), "models");
    ps.sort();
    assert_eq!(ps, ["only-one:latest", "only-zero:latest", "shared:latest"]);

    let (status, v) = generate(&base, "nowhere");
    assert_eq!(status, 404, "{v}");
    // Forwarded: the instance answers in Ollama's own words.
    assert_eq!(v["error"], "model 'nowhere' not found");

    // Pulled through the sidecar onto one instance: known at once, served there.
    let pulled = client()
        .post(sidecar.url("/api/pull"))
        .json(&json!({"model": "fresh:latest", "stream": false}))
        .send()
        .expect("pull");
    assert_eq!(pulled.status().as_u16(), 200);
    let mut served = false;
    for _ in 0..50 {
        let (status, _) = generate(&base, "fresh");
        if status == 200 {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        served,
        "the pulled model is served within a second of the pull"
    );
    assert_eq!(names(&tags("/api/tags"), "models").len(), 4);
}

/// The only instance with a model goes down while another is ready: a request for that model
/// gets a 503 that says why, at once, instead of waiting or a 404 from the wrong instance.
#[test]
fn a_model_whose_instances_are_all_down_is_refused_with_the_reason() {
    let m0 = Mock::start(&[("MOCK_MODELS", "only-zero:latest")]);
    let m1 = Mock::start(&[("MOCK_MODELS", "only-one:latest")]);
    let body = format!(
        "health:\n  interval: 200ms\n  fall: 1\n{}",
        common::external_instances(&[&m0, &m1], 1)
    );
    let sidecar = Sidecar::start(&body);
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 2
    }));
    assert_eq!(generate(&base, "only-one").0, 200);
    refused_once_down(
        &sidecar,
        m1,
        "only-one",
        "ollama-sidecar: no ready instance has model \"only-one\" installed",
        "only-zero",
    );
}

/// Stops `down`; once the sidecar sees it unhealthy, a request for `model` gets a 503 with
/// `error` at once, and one for `served` is still served.
fn refused_once_down(sidecar: &Sidecar, down: Mock, model: &str, error: &str, served: &str) {
    let base = sidecar.url("");
    drop(down);
    assert!(
        common::wait_until(Duration::from_secs(15), || {
            sidecar.status().to_string().contains("\"unhealthy\"")
        }),
        "{}",
        sidecar.status()
    );
    let t = Instant::now();
    let (status, v) = generate(&base, model);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"], error);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(generate(&base, served).0, 200);
}

/// Two swapping mocks that both have `x` and `y`; each loads one model at a time, a load
/// takes 500 ms and an answer about 100 ms.
fn swapping_pair() -> (Mock, Mock) {
    let env = [
        ("MOCK_MODELS", "x=1GB,y=1GB"),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),
        ("MOCK_LOAD_MS_PER_GB", "500"),
        ("MOCK_TOKENS", "4"),
        ("MOCK_TOKEN_DELAY_MS", "25"),
    ];
    (Mock::start(&env), Mock::start(&env))
}

fn cold_loads(mock: &Mock) -> u64 {
    mock_stats(mock)["cold_loads"].as_u64().unwrap_or(0)
}

/// Runs `models` requests at once through the sidecar; their statuses, in order.
fn burst(base: &str, models: &[&str]) -> Vec<u16> {
    let threads: Vec<_> = models
        .iter()
        .map(|m| {
            let (base, m) = (base.to_string(), m.to_string());
            std::thread::spawn(move || generate(&base, &m).0)
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap_or(0)).collect()
}

/// The sidecar learns what a load costs, then waits for the warm instance when its slot is
/// near instead of loading the model on the other instance; with a backlog far longer than a
/// load, it does load it there; a rarely asked model is served meanwhile.
#[test]
fn dispatch_waits_for_a_near_warm_slot_and_cold_loads_when_far_behind() {
    let (m0, m1) = swapping_pair();
    let sidecar = Sidecar::start(&common::external_instances(&[&m0, &m1], 1));
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 2
    }));
    // Learn: one cold load of x, then warm answers.
    for _ in 0..4 {
        assert_eq!(generate(&base, "x").0, 200);
    }
    let warm = if cold_loads(&m0) == 1 { &m0 } else { &m1 };
    let other = if cold_loads(&m0) == 1 { &m1 } else { &m0 };
    assert_eq!(cold_loads(warm) + cold_loads(other), 1);

    // Two at once: the second waits ~100 ms for the warm slot rather than a 500 ms load.
    for _ in 0..3 {
        assert_eq!(burst(&base, &["x", "x"]), [200, 200]);
    }
    assert_eq!(cold_loads(other), 0, "no cold load for a near warm slot");

    // Eight at once: the last would wait ~700 ms warm, longer than a load: x loads on the other
    // instance too. A request for y in the middle is served, not starved.
    let t = Instant::now();
    let statuses = burst(&base, &["x", "x", "x", "x", "y", "x", "x", "x", "x"]);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        cold_loads(other) >= 1,
        "the other instance loaded a model: {}",
        mock_stats(other)
    );
    let status = sidecar.status();
    let text = status.to_string();
    assert!(text.contains("\"cold_load\""), "{status}");
    assert!(text.contains("\"model_loaded\""), "{status}");

    // The same decisions as metrics, with the model label of an installed model.
    let metrics = client()
        .get(format!("http://127.0.0.1:{}/metrics", sidecar.admin_port))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let cold = value("ollama_sidecar_model_cold_loads_total{");
    assert!(cold >= 2.0, "{cold}: {metrics}");
    assert!(
        metrics.contains("model=\"x:latest\""),
        "model label: {metrics}"
    );
    let hits = value("ollama_sidecar_placement_affinity_total{result=\"hit\"}");
    let misses = value("ollama_sidecar_placement_affinity_total{result=\"miss\"}");
    assert_eq!(hits + misses, 19.0, "{metrics}");
    assert_eq!(misses, cold);
    assert!(value("ollama_sidecar_placement_decisions_total{") >= 19.0);
    assert!(value("ollama_sidecar_model_load_duration_seconds_count{model=\"x:latest\"}") >= 1.0);
    assert!(value("ollama_sidecar_placement_warm_wait_seconds_count{") >= 1.0);
}

/// A request with `keep_alive: 0` unloads its model in Ollama when it ends (sched.go
/// `processCompleted` expires a zero session at once). The sidecar must not go on counting it
/// loaded: an instance it left empty is where the next new model goes, instead of evicting a
/// model another instance still holds and is asked for.
#[test]
fn a_model_a_request_unloads_is_not_counted_loaded() {
    let env = [
        ("MOCK_MODELS", "x=1GB,y=1GB,z=1GB"),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),
        ("MOCK_LOAD_MS_PER_GB", "200"),
    ];
    let (m0, m1) = (Mock::start(&env), Mock::start(&env));
    // No periodic /api/ps read in between: the view is what the sidecar itself keeps.
    let sidecar = Sidecar::start(&format!(
        "health:\n  models_interval: 1h\n{}",
        common::external_instances(&[&m0, &m1], 1)
    ));
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 3
    }));
    let send = |body: Value| {
        let r = client()
            .post(format!("{base}/api/generate"))
            .json(&body)
            .send()
            .expect("generate");
        assert_eq!(r.status(), 200);
        // The sidecar gives the slot back once the client has the answer.
        std::thread::sleep(Duration::from_millis(150));
    };
    let ask = |model: &str| send(json!({"model": model, "prompt": "hi", "stream": false}));
    // x on one instance, y on the other, y asked last.
    ask("x");
    ask("y");
    ask("y");
    // x once more, asking Ollama to unload it afterwards: its instance is empty now.
    send(json!({"model": "x", "prompt": "hi", "stream": false, "keep_alive": 0}));
    assert_eq!(loaded_on(m0.port).len() + loaded_on(m1.port).len(), 1);
    // z goes where nothing is loaded; y stays where it is and answers warm.
    ask("z");
    ask("y");
    let (s0, s1) = (mock_stats(&m0), mock_stats(&m1));
    assert_eq!(
        s0["evictions"].as_u64().unwrap_or(0) + s1["evictions"].as_u64().unwrap_or(0),
        0,
        "a model was evicted: {s0} {s1}"
    );
    assert_eq!(cold_loads(&m0) + cold_loads(&m1), 3, "{s0} {s1}");
}

fn generate_as(base: &str, client_id: &str, model: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{base}/api/generate"))
        .header("X-Client-Id", client_id)
        .json(&json!({"model": model, "prompt": "hi", "stream": false}))
        .send()
        .expect("generate");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// A short generate for `model` as `client_id`: one token (`num_predict: 1`); its latency.
fn short_generate_as(base: &str, client_id: &str, model: &str) -> Duration {
    let started = Instant::now();
    let r = client()
        .post(format!("{base}/api/generate"))
        .header("X-Client-Id", client_id)
        .json(&json!({"model": model, "prompt": "hi", "stream": false,
            "options": {"num_predict": 1}}))
        .send()
        .expect("generate");
    assert_eq!(r.status(), 200);
    started.elapsed()
}

/// An instance whose every loaded model is busy has no place for another model: Ollama's
/// scheduler would take the request and stop there until a model goes idle to be evicted
/// (sched.go `processPending`), holding up every later request to that instance, even one for
/// the busy model's free slot. The sidecar keeps such a request (for at most one learned load
/// time), so the busy model's next request is served at once.
#[test]
fn a_request_with_no_place_does_not_hold_up_the_loaded_models_requests() {
    let env = [
        ("MOCK_MODELS", "x=1GB,y=1GB"),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),
        ("OLLAMA_NUM_PARALLEL", "2"),
        ("MOCK_LOAD_MS_PER_GB", "400"),
        ("MOCK_TOKENS", "12"),
        ("MOCK_TOKEN_DELAY_MS", "100"),
    ];
    let mock = Mock::start(&env);
    let sidecar = Sidecar::start(&format!(
        "admission:\n  client_id_header: X-Client-Id\n{}",
        common::external_instances(&[&mock], 2)
    ));
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 2
    }));
    // Learn what a load costs, and that the instance holds one model at a time.
    for model in ["x", "y", "x"] {
        short_generate_as(&base, "learn", model);
    }
    assert_eq!(cold_loads(&mock), 3);
    // x busy for about 1.2 s; then y (no place: x is busy and fills the instance); then a
    // second x, which x's free slot can serve at once.
    let long = {
        let base = base.clone();
        std::thread::spawn(move || generate_as(&base, "a", "x").0)
    };
    std::thread::sleep(Duration::from_millis(150));
    let other = {
        let base = base.clone();
        std::thread::spawn(move || short_generate_as(&base, "b", "y"))
    };
    std::thread::sleep(Duration::from_millis(50));
    let second_x = short_generate_as(&base, "c", "x");
    assert!(
        second_x < Duration::from_millis(700),
        "the second x waited {second_x:?} behind y: {}",
        sidecar.log_text()
    );
    assert_eq!(long.join().ok(), Some(200));
    let y = other.join().expect("y answered");
    assert!(y < Duration::from_secs(4), "y waited {y:?}");
}

/// Ollama runs an embedding model one request at a time whatever `OLLAMA_NUM_PARALLEL` says
/// (sched.go `load`). The sidecar learns that from `/api/show` and keeps the second request
/// itself, where priorities apply: a high-priority request that arrives later goes before a
/// low-priority one that would otherwise already be waiting inside Ollama.
#[test]
fn an_embedding_model_gets_one_slot_and_priorities_still_decide() {
    let env = [
        ("MOCK_MODELS", "nomic-embed-text,x"),
        ("OLLAMA_NUM_PARALLEL", "2"),
        ("MOCK_FIRST_TOKEN_DELAY_MS", "400"),
    ];
    let mock = Mock::start(&env);
    let sidecar = Sidecar::start(&format!(
        "admission:\n  client_id_header: X-Client-Id\n  priority_header: X-Priority\n{}",
        common::external_instances(&[&mock], 2)
    ));
    assert!(
        common::wait_until(Duration::from_secs(15), || {
            sidecar.status()["instances"][0]["one_at_a_time_models"]
                == json!(["nomic-embed-text:latest"])
        }),
        "{}",
        sidecar.status()
    );
    let base = sidecar.url("");
    let started = Instant::now();
    let embed = |client_id: &'static str, priority: &'static str| {
        let base = base.clone();
        std::thread::spawn(move || {
            let r = client()
                .post(format!("{base}/api/embed"))
                .header("X-Client-Id", client_id)
                .header("X-Priority", priority)
                .json(&json!({"model": "nomic-embed-text", "input": "hi"}))
                .send()
                .expect("embed");
            (r.status().as_u16(), started.elapsed())
        })
    };
    let first = embed("a", "0");
    std::thread::sleep(Duration::from_millis(100));
    let low = embed("b", "-5");
    std::thread::sleep(Duration::from_millis(100));
    let high = embed("c", "5");
    let (first, low, high) = (first.join(), low.join(), high.join());
    let (Ok(first), Ok(low), Ok(high)) = (first, low, high) else {
        panic!("a request failed");
    };
    assert_eq!((first.0, low.0, high.0), (200, 200, 200));
    assert!(
        high.1 < low.1,
        "the later high-priority request finished at {:?}, the low one at {:?}",
        high.1,
        low.1
    );
    let stats = mock_stats(&mock);
    assert_eq!(
        stats["peak_queued"], 0,
        "a request waited inside Ollama: {stats}"
    );
}

/// `max_concurrent` and `max_concurrent_per_instance` hold across two instances with room for
/// more: the requests over the limit wait (none is refused), and another client's request for
/// another model is served meanwhile, not queued behind them.
#[test]
fn per_model_concurrency_limits_hold_and_other_models_pass() {
    let env = [
        ("MOCK_MODELS", "x,y"),
        ("MOCK_TOKENS", "4"),
        ("MOCK_TOKEN_DELAY_MS", "75"),
    ];
    let (m0, m1) = (Mock::start(&env), Mock::start(&env));
    let sidecar = Sidecar::start(&format!(
        "admission:\n  client_id_header: X-Client-Id\nmodels:\n  - match: \"x*\"\n    \
         max_concurrent: 2\n    max_concurrent_per_instance: 1\n{}",
        common::external_instances(&[&m0, &m1], 4)
    ));
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 2
    }));
    // Loaded once on each instance, so the timing below is answers only.
    burst(&base, &["x", "x"]);
    for m in [&m0, &m1] {
        client().post(m.url("/mock/reset")).send().expect("reset");
    }
    let t = Instant::now();
    let xs: Vec<_> = (0..6)
        .map(|_| {
            let base = base.clone();
            std::thread::spawn(move || generate_as(&base, "flood", "x").0)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let ty = Instant::now();
    assert_eq!(generate_as(&base, "other", "y").0, 200);
    let y_took = ty.elapsed();
    let statuses: Vec<u16> = xs.into_iter().map(|h| h.join().unwrap_or(0)).collect();
    let x_took = t.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Two at a time, about 240 ms each: three rounds (without the rule: one).
    assert!(x_took >= Duration::from_millis(600), "{x_took:?}");
    assert!(y_took < Duration::from_millis(600), "y waited {y_took:?}");
    for m in [&m0, &m1] {
        let stats = mock_stats(m);
        assert_eq!(stats["peak_by_model"]["x:latest"], 1, "{stats}");
    }
}

/// `instances:` holds: a model goes only to the instances its rule names; with those down it
/// gets a 503 that says why while the other instance serves other models; a model that only a
/// disallowed instance has is sent to an allowed one, which answers Ollama's own 404.
#[test]
fn a_model_runs_only_on_the_instances_its_rule_allows() {
    let m0 = Mock::start(&[("MOCK_MODELS", "x,y,only-zero")]);
    let m1 = Mock::start(&[("MOCK_MODELS", "x,y")]);
    let sidecar = Sidecar::start(&format!(
        "health:\n  interval: 200ms\n  fall: 1\nmodels:\n  - match: y\n    instances: [m1]\n  \
         - match: \"only-*\"\n    instances: [m1]\n{}",
        common::external_instances(&[&m0, &m1], 2)
    ));
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 3
    }));
    let statuses = burst(&base, &["y", "y", "y", "y", "y", "y", "x", "x"]);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let on0 = model_names_of(&m0);
    assert!(!on0.iter().any(|m| m.starts_with('y')), "{on0:?}");
    assert_eq!(
        model_names_of(&m1)
            .iter()
            .filter(|m| m.starts_with('y'))
            .count(),
        6
    );
    let (status, v) = generate(&base, "only-zero");
    assert_eq!(status, 404, "{v}");
    assert!(!model_names_of(&m0).iter().any(|m| m.starts_with("only")));
    refused_once_down(
        &sidecar,
        m1,
        "y",
        "ollama-sidecar: none of the instances the `models` rule for \"y\" allows is ready with it installed",
        "x",
    );
}

/// The pid of the mock on `port`; `None` while none answers.
fn mock_pid(port: u16) -> Option<u64> {
    client()
        .get(format!("http://127.0.0.1:{port}/mock/stats"))
        .send()
        .and_then(|r| r.json::<Value>())
        .ok()
        .and_then(|v| v["pid"].as_u64())
}

/// The models the mock on `port` has loaded; none while it does not answer.
fn loaded_on(port: u16) -> Vec<String> {
    client()
        .get(format!("http://127.0.0.1:{port}/api/ps"))
        .send()
        .and_then(|r| r.json::<Value>())
        .map(|v| names(&v, "models"))
        .unwrap_or_default()
}

/// `pinned: true` on a supervised instance: the model is loaded at start without a request,
/// stays loaded while two other models take turns in the one other place (and after a request
/// for it), and is loaded again after the instance is killed and restarted.
#[test]
fn a_pinned_model_is_loaded_at_start_kept_and_reloaded_after_a_restart() {
    let port = common::free_port();
    // `aaa` sorts first: with equal keep-alives, Ollama would evict it first.
    let sidecar = Sidecar::start(&format!(
        "models:\n  - match: aaa\n    pinned: true\ninstances:\n  - name: sup\n    command: {}\n    \
         port: {port}\n    num_parallel: 2\n    restart:\n      initial_backoff: 100ms\n      \
         max_backoff: 500ms\n    env:\n      MOCK_MODELS: \"aaa=1GB,b=1GB,c=1GB\"\n      \
         OLLAMA_MAX_LOADED_MODELS: \"2\"\n      MOCK_LOAD_MS_PER_GB: \"200\"\n",
        common::MOCK
    ));
    let base = sidecar.url("");
    assert!(
        common::wait_until(Duration::from_secs(15), || common::port_open(port)
            && loaded_on(port) == ["aaa:latest"]),
        "pinned at start: {}",
        sidecar.log_text()
    );
    for model in ["b", "c", "aaa", "b", "c", "b"] {
        assert_eq!(generate(&base, model).0, 200);
        let loaded = loaded_on(port);
        assert!(
            loaded.contains(&"aaa:latest".to_string()),
            "{model}: {loaded:?}"
        );
    }
    let pid = mock_pid(port).expect("mock pid");
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    assert!(
        common::wait_until(Duration::from_secs(15), || {
            common::port_open(port)
                && mock_pid(port).is_some_and(|p| p != pid)
                && loaded_on(port) == ["aaa:latest"]
        }),
        "pinned again after the restart: {}",
        sidecar.log_text()
    );
}

/// A sidecar in front of `mock` (two slots) with `model` pinned and `extra` configuration,
/// once the pin has loaded it.
fn sidecar_pinning(mock: &Mock, model: &str, extra: &str) -> Sidecar {
    let sidecar = Sidecar::start(&format!(
        "{extra}models:\n  - match: {model}\n    pinned: true\n{}",
        common::external_instances(&[mock], 2)
    ));
    let key = format!("{model}:latest");
    assert!(
        common::wait_until(Duration::from_secs(15), || loaded_on(mock.port)
            == [key.as_str()]),
        "pinned at start: {}",
        sidecar.log_text()
    );
    sidecar
}

/// A client's `keep_alive` cannot unload a pinned model: in Ollama a request's `keep_alive`
/// becomes the model's session (sched.go `useLoadedRunner`), so `0` would unload it the moment
/// the request ends and `"1s"` a second later, and the next request for it would wait for a
/// cold load. The sidecar sends such requests with `keep_alive: -1`, so the model is loaded once
/// and stays: no second load, whatever the spelling of the key, `ollama stop` included.
#[test]
fn a_clients_keep_alive_cannot_unload_a_pinned_model() {
    let mock = Mock::start(&[("MOCK_MODELS", "aaa,b"), ("MOCK_LOAD_DELAY_MS", "100")]);
    let sidecar = sidecar_pinning(&mock, "aaa", "");
    let base = sidecar.url("");
    let post = |path: &str, body: &str| {
        let r = client()
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("answer");
        let status = r.status().as_u16();
        (status, r.text().unwrap_or_default())
    };
    let asks = [
        (
            "/api/chat",
            r#"{"model":"aaa","messages":[{"role":"user","content":"hi"}],"stream":false,"keep_alive":0}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"aaa","prompt":"hi","stream":false,"Keep_Alive":"1s"}"#,
        ),
        (
            "/api/embed",
            r#"{"model":"aaa","input":"hi","keep_alive":"0s"}"#,
        ),
        // `ollama stop aaa`: an empty prompt with keep_alive 0 asks Ollama to unload it.
        ("/api/generate", r#"{"model":"aaa","keep_alive":0}"#),
        (
            "/v1/chat/completions",
            r#"{"model":"aaa","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ];
    for (path, body) in asks {
        let (status, text) = post(path, body);
        assert_eq!(status, 200, "{path} {body}: {text}");
        // Long enough for a 1 s keep-alive to run out, and for the keeper to notice a gap.
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(800));
    let ps = get_json(&mock.url("/api/ps"));
    let aaa = ps["models"]
        .as_array()
        .and_then(|l| l.iter().find(|m| m["name"] == "aaa:latest"))
        .unwrap_or_else(|| panic!("aaa was unloaded: {ps}"));
    let year: u32 = aaa["expires_at"].as_str().unwrap_or("")[..4]
        .parse()
        .unwrap_or(0);
    assert!(year > 2100, "aaa no longer kept for good: {aaa}");
    assert_eq!(
        mock_stats(&mock)["cold_loads"],
        1,
        "aaa was loaded again: {}",
        sidecar.log_text()
    );
}

/// `limits.max_keep_alive`: no client keeps a model in memory longer than the operator allows
/// after its last request, whether it asks for `-1` (for good) or a long duration; a pinned
/// model stays loaded.
#[test]
fn a_clients_long_keep_alive_is_held_to_the_operators_limit() {
    let mock = Mock::start(&[("MOCK_MODELS", "x,y,p")]);
    let sidecar = sidecar_pinning(&mock, "p", "limits:\n  max_keep_alive: 1s\n");
    let base = sidecar.url("");
    for (model, keep_alive) in [("x", json!(-1)), ("y", json!("2h")), ("p", json!("1s"))] {
        let r = client()
            .post(format!("{base}/api/generate"))
            .json(&json!({"model": model, "prompt": "hi", "stream": false,
                "KEEP_ALIVE": keep_alive}))
            .send()
            .expect("generate");
        assert_eq!(r.status(), 200, "{model}");
    }
    let mut loaded = loaded_on(mock.port);
    loaded.sort();
    assert_eq!(loaded, ["p:latest", "x:latest", "y:latest"]);
    // A second after their last request, x and y are gone; the pinned model stays.
    assert!(
        common::wait_until(Duration::from_secs(4), || loaded_on(mock.port)
            == ["p:latest"]),
        "still loaded: {:?}",
        loaded_on(mock.port)
    );
}

/// `pinned: true` on external instances: loaded at start only where the rule allows it, and
/// loaded again when an instance that went away comes back (a fresh Ollama with nothing loaded).
#[test]
fn a_pinned_model_is_loaded_again_when_an_external_instance_comes_back() {
    let env = [("MOCK_MODELS", "keep,other")];
    let (m0, m1) = (Mock::start(&env), Mock::start(&env));
    let port = m1.port;
    let sidecar = Sidecar::start(&format!(
        "health:\n  interval: 200ms\n  fall: 1\n  rise: 1\nmodels:\n  - match: keep\n    \
         pinned: true\n    instances: [m1]\n{}",
        common::external_instances(&[&m0, &m1], 1)
    ));
    assert!(
        common::wait_until(Duration::from_secs(15), || loaded_on(port)
            == ["keep:latest"]),
        "pinned at start: {}",
        sidecar.log_text()
    );
    assert!(
        loaded_on(m0.port).is_empty(),
        "m0 is not allowed to serve it"
    );
    drop(m1);
    assert!(common::wait_until(Duration::from_secs(15), || {
        sidecar.status().to_string().contains("\"unhealthy\"")
    }));
    let back = Mock::start_on(port, &env);
    assert!(
        common::wait_until(Duration::from_secs(15), || loaded_on(back.port)
            == ["keep:latest"]),
        "pinned again once back: {}",
        sidecar.log_text()
    );
}

/// Ollama gives every loaded model its own `OLLAMA_NUM_PARALLEL` slots (server/sched.go sets
/// `numParallel` per runner), so an instance holding two models runs a request for each at
/// once. The sidecar sends it that much and no more: two models' requests run side by side,
/// a second request for the same model waits in the sidecar, never inside Ollama.
#[test]
fn each_loaded_model_gets_its_own_num_parallel_slots() {
    let mock = Mock::start(&[
        ("MOCK_MODELS", "a,b"),
        ("OLLAMA_NUM_PARALLEL", "1"),
        ("OLLAMA_MAX_LOADED_MODELS", "2"),
        ("MOCK_TOKENS", "6"),
        ("MOCK_TOKEN_DELAY_MS", "100"),
    ]);
    let sidecar = Sidecar::start(&common::external_instances(&[&mock], 1));
    let base = sidecar.url("");
    assert!(common::wait_until(Duration::from_secs(15), || {
        names(&get_json(&sidecar.url("/api/tags")), "models").len() == 2
    }));
    // Both models loaded, and the sidecar has seen the instance hold both.
    assert_eq!(generate(&base, "a").0, 200);
    assert_eq!(generate(&base, "b").0, 200);
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            sidecar.status()["instances"][0]["slots"] == 2
        }),
        "{}",
        sidecar.status()
    );
    client()
        .post(mock.url("/mock/reset"))
        .send()
        .expect("reset");

    let t = Instant::now();
    assert_eq!(burst(&base, &["a", "b", "a"]), [200, 200, 200]);
    let elapsed = t.elapsed();
    let stats = mock_stats(&mock);
    assert_eq!(stats["peak_inference_in_flight"], 2, "{stats}");
    assert_eq!(stats["peak_by_model"]["a:latest"], 1, "{stats}");
    assert_eq!(
        stats["peak_queued"], 0,
        "nothing waited inside Ollama: {stats}"
    );
    assert_eq!(stats["cold_loads"], 0, "no swap: {stats}");
    // One instance slot would serve the three 600 ms answers one after another (1.8 s).
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}
