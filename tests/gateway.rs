//! The sidecar as a model server behind Kubernetes' inference gateway (Gateway API Inference
//! Extension), through the real binaries:
//!
//! - a scraper that behaves like the endpoint picker (llm-d/llm-d-router v0.9.0) reads
//!   `/metrics/gateway` every 50 ms while requests queue and run on hung mock instances, and the
//!   three gauges are checked against the sidecar's own `/status` at every step up and down;
//! - requests shaped like the ones the gateway forwards (the picker re-encodes the body) are
//!   served, with the usage the picker reads from the stream;
//! - the manifests in `docker/kubernetes/inference-pool/` carry what the picker reads from them.

mod common;

use common::*;
use ollama_sidecar::metrics::{GATEWAY_PATH, GATEWAY_QUEUED, GATEWAY_RUNNING, GATEWAY_UTILIZATION};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the endpoint picker accepts from a scrape, written from its source (not copied):
/// llm-d/llm-d-router v0.9.0 `pkg/epp/framework/plugins/datalayer/source/metrics/datasource.go`
/// parses the body with Prometheus' `expfmt.TextParser` under legacy name validation (one bad
/// line fails the whole scrape), and `.../extractor/metrics/spec.go` picks, in the family named
/// by a spec, the series whose labels match and whose timestamp is latest, then reads its value
/// only if it is a gauge or a counter (`extractValue`: anything else reads as 0).
mod picker {
    use std::collections::BTreeMap;

    #[derive(Debug, Default)]
    pub struct Family {
        pub kind: Option<String>,
        help: bool,
        pub samples: Vec<Sample>,
    }

    #[derive(Debug)]
    pub struct Sample {
        pub labels: BTreeMap<String, String>,
        pub value: f64,
        pub timestamp_ms: Option<i64>,
    }

    fn legacy_metric_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn legacy_label_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// The family a sample name belongs to: its own, or for `_bucket`/`_sum`/`_count` the
    /// histogram or summary it extends.
    fn family_of(families: &BTreeMap<String, Family>, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some(f) = families.get(base) {
                    if matches!(f.kind.as_deref(), Some("histogram" | "summary")) {
                        return base.to_string();
                    }
                }
            }
        }
        name.to_string()
    }

    fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            }
            let (name, after) = rest
                .split_once('=')
                .ok_or_else(|| format!("label without '=': {rest}"))?;
            let name = name.trim();
            if !legacy_label_name(name) {
                return Err(format!("invalid label name {name:?}"));
            }
            let mut chars = after
                .trim_start()
                .strip_prefix('"')
                .ok_or("label value not quoted")?
                .char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("invalid escape {other:?}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            let quoted = after.trim_start();
            rest = &quoted[1 + end + 1..];
            if labels.insert(name.to_string(), value).is_some() {
                return Err(format!("duplicate label {name}"));
            }
            rest = rest.trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }

    /// The metric families of a scrape, or why the picker would reject all of it.
    pub fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            let line = line.trim_start_matches([' ', '\t']);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                let (keyword, name) = (words.next(), words.next());
                let (Some(keyword @ ("HELP" | "TYPE")), Some(name)) = (keyword, name) else {
                    continue; // other comments are ignored
                };
                if !legacy_metric_name(name) {
                    return Err(err(format!("invalid metric name {name:?}")));
                }
                let family = families.entry(name.to_string()).or_default();
                if keyword == "HELP" {
                    if family.help {
                        return Err(err("second HELP line".into()));
                    }
                    family.help = true;
                } else {
                    let kind = words.next().unwrap_or("");
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(err(format!("unknown type {kind:?}")));
                    }
                    if family.kind.is_some() || !family.samples.is_empty() {
                        return Err(err("second TYPE line, or TYPE after samples".into()));
                    }
                    family.kind = Some(kind.to_string());
                }
                continue;
            }
            let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
            let name = &line[..name_end];
            if !legacy_metric_name(name) {
                return Err(err(format!("invalid metric name {name:?}")));
            }
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(after) = rest.strip_prefix('{') {
                let (l, after) = parse_labels(after).map_err(err)?;
                labels = l;
                rest = after;
            }
            let mut fields = rest.split_whitespace();
            let value: f64 = match fields.next() {
                Some("+Inf") => f64::INFINITY,
                Some("-Inf") => f64::NEG_INFINITY,
                Some(v) => v.parse().map_err(|_| err(format!("invalid value {v:?}")))?,
                None => return Err(err("no value".into())),
            };
            let timestamp_ms = match fields.next() {
                Some(t) => Some(
                    t.parse()
                        .map_err(|_| err(format!("invalid timestamp {t:?}")))?,
                ),
                None => None,
            };
            if fields.next().is_some() {
                return Err(err("trailing data".into()));
            }
            let family = family_of(&families, name);
            families.entry(family).or_default().samples.push(Sample {
                labels,
                value,
                timestamp_ms,
            });
        }
        Ok(families)
    }

    /// The value the picker stores for a spec `name{label="value",...}`.
    pub fn extract(
        families: &BTreeMap<String, Family>,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<f64, String> {
        let family = families
            .get(name)
            .filter(|f| !f.samples.is_empty())
            .ok_or_else(|| format!("metric family {name:?} not found"))?;
        let latest = family
            .samples
            .iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .max_by_key(|s| s.timestamp_ms.unwrap_or(0))
            .ok_or_else(|| format!("no series of {name} matches {labels:?}"))?;
        Ok(match family.kind.as_deref() {
            Some("gauge" | "counter") => latest.value,
            _ => 0.0,
        })
    }
}

/// The three values the picker keeps per pod from one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PodMetrics {
    queued: f64,
    running: f64,
    utilization: f64,
}

fn scrape_as_picker(
    http: &reqwest::blocking::Client,
    admin_port: u16,
    path: &str,
) -> Result<PodMetrics, String> {
    let resp = http
        .get(format!("http://127.0.0.1:{admin_port}{path}"))
        .send()
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let families = picker::parse(&resp.text().map_err(|e| e.to_string())?)?;
    for name in [GATEWAY_QUEUED, GATEWAY_RUNNING, GATEWAY_UTILIZATION] {
        // The protocol asks for gauges; the picker would read an untyped family as 0.
        let kind = families.get(name).and_then(|f| f.kind.clone());
        if kind.as_deref() != Some("gauge") {
            return Err(format!("{name} is {kind:?}, not a gauge"));
        }
    }
    Ok(PodMetrics {
        queued: picker::extract(&families, GATEWAY_QUEUED, &[])?,
        running: picker::extract(&families, GATEWAY_RUNNING, &[])?,
        utilization: picker::extract(&families, GATEWAY_UTILIZATION, &[])?,
    })
}

/// The gauges as the sidecar's own state says they must be: from `/status`.
fn expected_from(status: &Value) -> PodMetrics {
    let queue = &status["queue"];
    let instances = status["instances"].as_array().expect("instances");
    let busy: u64 = instances
        .iter()
        .map(|i| i["busy_slots"].as_u64().expect("busy_slots"))
        .sum();
    let open: u64 = instances
        .iter()
        .filter(|i| i["ready"] == json!(true))
        .map(|i| i["slots"].as_u64().expect("slots"))
        .sum();
    assert_eq!(queue["held_slots"].as_u64(), Some(busy), "{status}");
    PodMetrics {
        queued: queue["queued"].as_u64().expect("queued") as f64,
        running: busy as f64,
        utilization: if open == 0 {
            1.0
        } else {
            (busy as f64 / open as f64).min(1.0)
        },
    }
}

/// The requests in the sidecar (queued + running), from `/status`.
fn load_of(status: &Value) -> u64 {
    status["queue"]["queued"].as_u64().unwrap_or(0)
        + status["queue"]["held_slots"].as_u64().unwrap_or(0)
}

/// Waits until `/status` holds `n` requests and is stable around one scrape, then returns the
/// scrape and the state it must show.
fn settled_scrape(sc: &Sidecar, n: u64) -> (PodMetrics, PodMetrics) {
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = sc.status();
        if load_of(&before) == n {
            let got = scrape_as_picker(&http, sc.admin_port, GATEWAY_PATH).expect("scrape");
            let after = sc.status();
            if expected_from(&before) == expected_from(&after) {
                return (got, expected_from(&after));
            }
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never held {n} requests steadily; status: {before}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The paced scraper's first scrape that started after this call (the state holds still
/// between steps, so it must show the step's state).
fn next_paced_scrape(seen: &Mutex<Vec<Result<PodMetrics, String>>>) -> Result<PodMetrics, String> {
    let from = seen.lock().expect("seen").len() + 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(r) = seen.lock().expect("seen").get(from) {
            return r.clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("the paced scraper stalled".into())
}

/// Two hung instances (1 and 2 slots): requests up to 3 run, the rest queue. Clients arrive one
/// by one, then leave one by one; at every step the picker's view equals `/status`, while a
/// scraper at the picker's 50 ms pace parses every scrape.
#[test]
fn gateway_gauges_follow_the_queue_and_the_slots() {
    let small = Mock::start(&[]);
    let large = Mock::start(&[]);
    let sc = Sidecar::start(&format!(
        "instances:\n  - name: small\n    url: http://127.0.0.1:{}\n    num_parallel: 1\n  - name: large\n    url: http://127.0.0.1:{}\n    num_parallel: 2\n",
        small.port, large.port
    ));
    assert!(
        wait_until(Duration::from_secs(15), || {
            sc.status()["instances"]
                .as_array()
                .is_some_and(|a| a.iter().all(|i| i["ready"] == json!(true)))
        }),
        "instances not ready; log:\n{}",
        sc.log_text()
    );
    for mock in [&small, &large] {
        let r = client()
            .post(mock.url("/mock/faults"))
            .json(&json!({"hang": true}))
            .send()
            .expect("faults");
        assert_eq!(r.status(), 200);
    }

    let idle = PodMetrics {
        queued: 0.0,
        running: 0.0,
        utilization: 0.0,
    };
    let http = client();
    assert_eq!(
        scrape_as_picker(&http, sc.admin_port, GATEWAY_PATH),
        Ok(idle)
    );

    // The picker's pace: a scrape every 50 ms, on kept-alive connections.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<Result<PodMetrics, String>>::new()));
    let scraper = {
        let (stop, seen, port) = (stop.clone(), seen.clone(), sc.admin_port);
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10)) // the picker's own client timeout
                .build()
                .expect("client");
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = scrape_as_picker(&http, port, GATEWAY_PATH);
                seen.lock().expect("seen").push(r);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let body = json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let mut clients = Vec::new();
    let mut steps = Vec::new();
    for n in 1..=6u64 {
        clients.push(post_raw(sc.port, "/api/chat", &body, ""));
        let (got, want) = settled_scrape(&sc, n);
        assert_eq!(got, want, "with {n} requests in");
        assert_eq!(next_paced_scrape(&seen), Ok(want), "paced, {n} in");
        steps.push(got);
    }
    while let Some(gone) = clients.pop() {
        drop(gone);
        let n = clients.len() as u64;
        let (got, want) = settled_scrape(&sc, n);
        assert_eq!(got, want, "with {n} requests left");
        assert_eq!(next_paced_scrape(&seen), Ok(want), "paced, {n} left");
        steps.push(got);
    }
    stop.store(true, Ordering::Relaxed);
    scraper.join().expect("scraper");

    // Up: 1..3 run (utilization k/3), then 4..6 add to the queue; down the same way.
    let queued: Vec<f64> = steps.iter().map(|s| s.queued).collect();
    let running: Vec<f64> = steps.iter().map(|s| s.running).collect();
    assert_eq!(
        queued,
        [0., 0., 0., 1., 2., 3., 2., 1., 0., 0., 0., 0.],
        "{steps:?}"
    );
    assert_eq!(
        running,
        [1., 2., 3., 3., 3., 3., 3., 3., 3., 2., 1., 0.],
        "{steps:?}"
    );
    for s in &steps {
        assert_eq!(s.utilization, s.running / 3.0, "{s:?}");
    }
    assert_eq!(steps.last(), Some(&idle));

    let seen = seen.lock().expect("seen");
    let failures: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "scrapes the picker would reject: {failures:?}"
    );
    assert!(seen.len() >= 20, "only {} scrapes", seen.len());
    let ok: Vec<PodMetrics> = seen.iter().filter_map(|r| r.clone().ok()).collect();
    for m in &ok {
        // One scrape is one snapshot: running and utilization agree, nothing out of range.
        assert_eq!(m.utilization, m.running / 3.0, "{m:?}");
        assert!(
            (0.0..=3.0).contains(&m.queued) && m.queued.fract() == 0.0,
            "{m:?}"
        );
    }
    assert!(
        ok.iter().any(|m| m.queued == 3.0 && m.running == 3.0),
        "the 50 ms scraper never saw the full queue"
    );
    assert_eq!(ok.last(), Some(&idle));

    // The full /metrics, which a picker may be pointed at instead, parses the same way.
    assert_eq!(scrape_as_picker(&http, sc.admin_port, "/metrics"), Ok(idle));
}

/// Real streams that finish on their own: eight on two slots, scraped at the picker's pace.
/// Every scrape is consistent (at most two running, utilization running/2), the queue is seen
/// to fill, and everything is back at 0 once the streams end.
#[test]
fn gateway_gauges_drain_as_streams_finish() {
    let mock = Mock::start(&[("MOCK_TOKENS", "10"), ("MOCK_TOKEN_DELAY_MS", "25")]);
    let sc = Sidecar::start(&external_instances(&[&mock], 2));
    assert!(wait_until(Duration::from_secs(15), || sc.status()
        ["instances"][0]["ready"]
        == json!(true)));
    let port = sc.port;
    let streams: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let body =
                    json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
                let mut reader = post_raw(port, "/api/chat", &body.to_string(), "");
                let (lines, ended) = read_json_lines(&mut reader, Duration::from_secs(30));
                ended && lines.last().is_some_and(|l| l["done"] == json!(true))
            })
        })
        .collect();
    let http = client();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while streams.iter().any(|s| !s.is_finished()) && Instant::now() < deadline {
        seen.push(scrape_as_picker(&http, sc.admin_port, GATEWAY_PATH).expect("scrape"));
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in streams {
        assert!(s.join().expect("stream"), "a stream did not complete");
    }
    for m in &seen {
        assert!(m.running <= 2.0 && m.queued + m.running <= 8.0, "{m:?}");
        assert_eq!(m.utilization, m.running / 2.0, "{m:?}");
    }
    assert!(
        seen.iter().any(|m| m.queued > 0.0 && m.running == 2.0),
        "never saw a full box with a queue: {seen:?}"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        scrape_as_picker(&http, sc.admin_port, GATEWAY_PATH)
            == Ok(PodMetrics {
                queued: 0.0,
                running: 0.0,
                utilization: 0.0,
            })
    }));
}

/// `/metrics/gateway` stays open when the admin token guards `/metrics` and `/status`: the
/// picker's scraper sends no token.
#[test]
fn gateway_gauges_need_no_admin_token() {
    let mock = Mock::start(&[]);
    let token = "a-long-admin-token-for-tests";
    let sc = Sidecar::start_with_env(
        // Continues the `admin:` map the harness writes.
        &format!(
            "  token_env: GW_ADMIN_TOKEN\n{}",
            external_instances(&[&mock], 1)
        ),
        &[("GW_ADMIN_TOKEN", token)],
    );
    assert!(wait_until(Duration::from_secs(10), || port_open(
        sc.admin_port
    )));
    let http = client();
    let get = |path: &str| {
        http.get(format!("http://127.0.0.1:{}{path}", sc.admin_port))
            .send()
            .expect("admin")
            .status()
            .as_u16()
    };
    assert_eq!(get("/metrics"), 401);
    assert_eq!(get("/status"), 401);
    assert_eq!(get(GATEWAY_PATH), 200);
    let m = scrape_as_picker(&http, sc.admin_port, GATEWAY_PATH).expect("scrape");
    assert_eq!((m.queued, m.running), (0.0, 0.0));
}

/// A body as the picker forwards it: it decodes the client's JSON into a Go map, may rewrite
/// `model` (llm-d/llm-d-router v0.9.0 `pkg/epp/requestcontrol/director.go`) and encodes it again
/// (keys sorted, no spaces). Its OpenAI parser (`.../parsers/openai/openai.go`,
/// `extractUsageStreaming`) counts tokens from the `data:` line that carries `usage`.
#[test]
fn requests_shaped_by_the_gateway_are_served_with_usage() {
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&external_instances(&[&mock], 2));
    assert!(wait_until(Duration::from_secs(15), || sc.status()
        ["instances"][0]["ready"]
        == json!(true)));
    let cases = [
        (
            "/v1/chat/completions",
            r#"{"messages":[{"content":"hi","role":"user"}],"model":"llama3.2","stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"llama3.2","prompt":"why is the sky blue","stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    ];
    for (path, body) in cases {
        let resp = client()
            .post(sc.url(path))
            .header("content-type", "application/json")
            // What Envoy-based gateways add on the way to the picked pod.
            .header(
                "x-gateway-destination-endpoint",
                format!("127.0.0.1:{}", sc.port),
            )
            .header("x-forwarded-for", "10.0.0.9")
            .body(body)
            .send()
            .expect("request");
        assert_eq!(resp.status(), 200, "{path}");
        let text = resp.text().expect("body");
        let usage: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]" && d.contains("usage"))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["usage"].is_object())
            .collect();
        let first = usage
            .first()
            .unwrap_or_else(|| panic!("{path}: no usage in {text}"));
        assert!(
            first["usage"]["prompt_tokens"].as_u64() > Some(0)
                && first["usage"]["completion_tokens"].as_u64() > Some(0),
            "{path}: the picker reads the first usage it finds: {first}"
        );
        assert!(text.trim_end().ends_with("data: [DONE]"), "{path}: {text}");
    }
    let http = client();
    let m = scrape_as_picker(&http, sc.admin_port, GATEWAY_PATH).expect("scrape");
    assert_eq!((m.queued, m.running, m.utilization), (0.0, 0.0, 0.0));
}

fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| {
            let v: Value =
                serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

fn flag<'a>(args: &'a [Value], name: &str) -> Option<&'a str> {
    args.iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

/// What the picker reads from the InferencePool and its own configuration, checked against
/// its source (llm-d/llm-d-router v0.9.0) and against the sidecar the pods run, without the
/// CRD's schema: `pkg/epp/util/pool/pool.go` (InferencePoolToEndpointPool),
/// `pkg/epp/datastore/datastore.go` (podUpdateOrAddIfNotExist: the metrics port override
/// applies to a single target port; a pod must declare the target port),
/// `pkg/epp/server/options.go` (--pool-group), `.../extractor/metrics/factories.go`.
#[test]
fn inference_pool_manifests_carry_what_the_picker_reads() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/kubernetes/inference-pool"
    );
    let pool_docs = yaml_docs(&format!("{dir}/ollama-pool.yaml"));
    let epp_docs = yaml_docs(&format!("{dir}/endpoint-picker.yaml"));
    let gateway_docs = yaml_docs(&format!("{dir}/gateway.yaml"));

    let pool = one(&pool_docs, "InferencePool");
    assert_eq!(pool["apiVersion"], "inference.networking.k8s.io/v1");
    let spec = &pool["spec"];
    for v1alpha2 in ["targetPortNumber", "extensionRef"] {
        assert!(spec.get(v1alpha2).is_none(), "{v1alpha2} is v1alpha2");
    }
    let selector = spec["selector"].as_object().expect("selector");
    assert_eq!(
        selector.keys().collect::<Vec<_>>(),
        ["matchLabels"],
        "v1 selects by matchLabels only"
    );
    let match_labels = selector["matchLabels"].as_object().expect("matchLabels");
    assert!(!match_labels.is_empty());
    let ports = spec["targetPorts"].as_array().expect("targetPorts");
    assert_eq!(
        ports.len(),
        1,
        "the metrics port flag applies to one target port"
    );
    let target_port = ports[0]["number"].as_u64().expect("targetPorts[0].number");
    let picker_ref = &spec["endpointPickerRef"];
    assert!(picker_ref["kind"].is_null() || picker_ref["kind"] == "Service");
    assert!(["FailOpen", "FailClose"].contains(&picker_ref["failureMode"].as_str().unwrap_or("")));

    // The pods the selector picks run the sidecar, serving the target port.
    let sts = one(&pool_docs, "StatefulSet");
    let template = &sts["spec"]["template"];
    for (k, v) in match_labels {
        assert_eq!(&template["metadata"]["labels"][k], v, "pod label {k}");
    }
    let containers = template["spec"]["containers"]
        .as_array()
        .expect("containers");
    let container = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("container {name}"))
    };
    let sidecar = container("sidecar");
    let declared: Vec<u64> = sidecar["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert!(declared.contains(&target_port), "{declared:?}");
    let config_map = one(&pool_docs, "ConfigMap");
    let config: Value = yaml_serde::from_str(
        config_map["data"]["sidecar.yaml"]
            .as_str()
            .expect("sidecar.yaml"),
    )
    .expect("sidecar config");
    assert_eq!(
        port_of(config["listen"].as_str().expect("listen")),
        target_port
    );
    let admin_port = port_of(config["admin"]["listen"].as_str().expect("admin.listen"));
    assert!(declared.contains(&admin_port), "{declared:?}");
    let ollama_env = container("ollama")["env"].as_array().expect("env");
    let num_parallel = ollama_env
        .iter()
        .find(|e| e["name"] == "OLLAMA_NUM_PARALLEL")
        .and_then(|e| e["value"].as_str())
        .expect("OLLAMA_NUM_PARALLEL");
    assert_eq!(
        config["instances"][0]["num_parallel"]
            .as_u64()
            .map(|n| n.to_string())
            .as_deref(),
        Some(num_parallel),
        "the sidecar's slots are Ollama's"
    );

    // The picker: the pool it watches, where it scrapes, the names it reads.
    let service = epp_docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == picker_ref["name"])
        .expect("the Service endpointPickerRef names");
    assert!(service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .any(|p| p["port"] == picker_ref["port"]["number"]
            && p["appProtocol"] == "kubernetes.io/h2c"));
    let epp = one(&epp_docs, "Deployment");
    let args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args");
    assert_eq!(flag(args, "pool-name"), pool["metadata"]["name"].as_str());
    assert_eq!(
        flag(args, "pool-group"),
        Some("inference.networking.k8s.io")
    );
    assert_eq!(
        flag(args, "model-server-metrics-port").map(|p| p.parse::<u64>().ok()),
        Some(Some(admin_port))
    );
    let epp_config: Value = yaml_serde::from_str(
        one(&epp_docs, "ConfigMap")["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml"),
    )
    .expect("EndpointPickerConfig");
    assert_eq!(epp_config["kind"], "EndpointPickerConfig");
    assert_eq!(
        flag(args, "config-file"),
        Some("/config/config.yaml"),
        "the ConfigMap is mounted on /config"
    );
    let plugin = |kind: &str| {
        epp_config["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .find(|p| p["type"] == kind)
            .unwrap_or_else(|| panic!("plugin {kind}"))
            .clone()
    };
    assert_eq!(
        plugin("metrics-data-source")["parameters"]["path"],
        GATEWAY_PATH
    );
    let engine = template["metadata"]["labels"]["llm-d.ai/engine-type"]
        .as_str()
        .expect("llm-d.ai/engine-type label");
    let engines = plugin("core-metrics-extractor")["parameters"]["engineConfigs"].clone();
    let mapping = engines
        .as_array()
        .expect("engineConfigs")
        .iter()
        .find(|e| e["name"] == engine)
        .unwrap_or_else(|| panic!("no engineConfigs entry for {engine}"))
        .clone();
    assert_eq!(mapping["queuedRequestsSpec"], GATEWAY_QUEUED);
    assert_eq!(mapping["runningRequestsSpec"], GATEWAY_RUNNING);
    assert_eq!(mapping["kvUsageSpec"], GATEWAY_UTILIZATION);

    // The route sends clients to the pool.
    let route = one(&gateway_docs, "HTTPRoute");
    let backend = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(backend["group"], "inference.networking.k8s.io");
    assert_eq!(backend["kind"], "InferencePool");
    assert_eq!(backend["name"], pool["metadata"]["name"]);
}
