//! Metrics and access logs, through the real binaries: the sidecar in front of mock Ollamas,
//! scraped on its admin port, checked by `promtool` and by a real Prometheus server. Every wait is
//! bounded; every process started here is killed by a guard.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

const MOCK_TOKENS: u64 = 7;

fn admin_get(sc: &Sidecar, path: &str) -> reqwest::blocking::Response {
    client()
        .get(format!("http://127.0.0.1:{}{path}", sc.admin_port))
        .send()
        .expect("admin request")
}

fn scrape(sc: &Sidecar) -> String {
    let resp = admin_get(sc, "/metrics");
    assert_eq!(resp.status(), 200);
    resp.text().expect("metrics text")
}

/// Starts the sidecar and waits until its admin port answers and it knows the instances' models
/// (the `model` label's allow-list).
fn start_sidecar(body: &str) -> Sidecar {
    let sc = Sidecar::start(body);
    assert!(
        wait_until(Duration::from_secs(10), || port_open(sc.admin_port)),
        "admin port did not open; log:\n{}",
        sc.log_text()
    );
    let known = wait_until(Duration::from_secs(15), || {
        client()
            .get(format!("http://127.0.0.1:{}/status", sc.admin_port))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|v| v["known_models"].as_array().map(|a| !a.is_empty()))
            .unwrap_or(false)
    });
    assert!(known, "no known models; log:\n{}", sc.log_text());
    sc
}

/// Parses `name{a="x",b="y"} value` lines of the text format.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let mut map = BTreeMap::new();
        // Label values here hold no `",` sequences.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
        }
        if let Ok(v) = value.parse::<f64>() {
            out.push((map, v));
        }
    }
    out
}

/// The sum of `name` over the series whose labels include all of `want`.
fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .iter()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

fn post(sc: &Sidecar, path: &str, body: &Value) -> (u16, String) {
    let resp = client()
        .post(sc.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().expect("body"))
}

fn chat_body(stream: bool) -> Value {
    json!({"model": "llama3.2", "stream": stream, "messages": [{"role": "user", "content": "hello world"}]})
}

fn generate_body(stream: bool) -> Value {
    json!({"model": "llama3.2", "stream": stream, "prompt": "why is the sky blue? tell me"})
}

fn openai_body(stream: bool, include_usage: bool) -> Value {
    let mut v = json!({"model": "llama3.2", "stream": stream, "messages": [{"role": "user", "content": "hello there, model"}]});
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

/// The (prompt, completion) counts an answer reports, as a client reads them.
fn counts_in(body: &str) -> (u64, u64) {
    let mut prompt = 0;
    let mut completion = 0;
    for line in body.lines() {
        let json = line.strip_prefix("data: ").unwrap_or(line);
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            continue;
        };
        let usage = [&v["usage"], &v["message"]["usage"], &v["response"]["usage"]];
        if let Some(n) = v["prompt_eval_count"].as_u64() {
            prompt = n;
        }
        if let Some(n) = v["eval_count"].as_u64() {
            completion = n;
        }
        for u in usage {
            if let Some(n) = u["prompt_tokens"].as_u64().or(u["input_tokens"].as_u64()) {
                prompt = n;
            }
            if let Some(n) = u["completion_tokens"]
                .as_u64()
                .or(u["output_tokens"].as_u64())
            {
                completion = n;
            }
        }
    }
    (prompt, completion)
}

/// Skips (returns false) only when promtool is absent and `CI` is unset; in CI it must run.
fn have_prometheus_tools() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing in CI: .ci/run installs Debian's `prometheus` package"
        );
        eprintln!("SKIPPED: promtool/prometheus not installed (apt-get install -y prometheus)");
    }
    found
}

/// Traffic of every kind: streamed and non-streamed native chat and generate, embed, OpenAI chat
/// streamed with and without usage and not streamed, Anthropic messages, metadata, an unknown
/// path (404), an unknown model (404), an invalid body and one too large (refusals).
fn every_kind_of_traffic(sc: &Sidecar) {
    for stream in [true, false] {
        assert_eq!(post(sc, "/api/chat", &chat_body(stream)).0, 200);
        assert_eq!(post(sc, "/api/generate", &generate_body(stream)).0, 200);
    }
    assert_eq!(
        post(
            sc,
            "/api/embed",
            &json!({"model": "nomic-embed-text", "input": ["a b c", "d e f"]})
        )
        .0,
        200
    );
    assert_eq!(
        post(sc, "/v1/chat/completions", &openai_body(true, true)).0,
        200
    );
    assert_eq!(
        post(sc, "/v1/chat/completions", &openai_body(true, false)).0,
        200
    );
    assert_eq!(
        post(sc, "/v1/chat/completions", &openai_body(false, false)).0,
        200
    );
    let anthropic = json!({"model": "llama3.2", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(sc, "/v1/messages", &anthropic).0, 200);
    let tags = client().get(sc.url("/api/tags")).send().expect("tags");
    assert_eq!(tags.status(), 200);
    let nope = client().get(sc.url("/nope")).send().expect("404");
    assert_eq!(nope.status(), 404);
    let unknown = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(post(sc, "/api/chat", &unknown).0, 404);
    let invalid = client()
        .post(sc.url("/api/chat"))
        .body("{not json")
        .send()
        .expect("invalid");
    assert_eq!(invalid.status(), 400);
    let big = client()
        .post(sc.url("/api/chat"))
        .body(vec![b' '; 20 * 1024])
        .send()
        .expect("too large");
    assert_eq!(big.status(), 413);
}

#[test]
fn promtool_check_metrics_passes_after_traffic_of_every_kind() {
    if !have_prometheus_tools() {
        return;
    }
    let mock = Mock::start(&[("MOCK_TOKENS", "5")]);
    let sc = start_sidecar(&format!(
        "limits:\n  max_body: 16KiB\n{}",
        external_instances(&[&mock], 2)
    ));
    every_kind_of_traffic(&sc);
    let text = scrape(&sc);
    // Every kind left its mark.
    assert_eq!(
        metric(
            &text,
            "ollama_sidecar_rejections_total",
            &[("reason", "invalid_body")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "ollama_sidecar_rejections_total",
            &[("reason", "body_too_large")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "ollama_sidecar_requests_total",
            &[("route", "other"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "ollama_sidecar_requests_total",
            &[("class", "metadata"), ("route", "/api/tags")]
        ),
        1.0
    );
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write metrics");
    }
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {:?}\n{said}\n--- scrape ---\n{text}",
        out.status
    );
}

#[test]
fn token_counters_equal_the_mocks_counts() {
    let tokens = MOCK_TOKENS.to_string();
    let mock = Mock::start(&[("MOCK_TOKENS", tokens.as_str())]);
    let sc = start_sidecar(&external_instances(&[&mock], 2));
    let anthropic = |stream: bool| json!({"model": "llama3.2", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hello"}]});
    let cases: Vec<(&str, Value, bool)> = vec![
        // (route, body, generates tokens)
        ("/api/chat", chat_body(true), true),
        ("/api/chat", chat_body(false), true),
        ("/api/generate", generate_body(true), true),
        ("/api/generate", generate_body(false), true),
        (
            "/api/embed",
            json!({"model": "nomic-embed-text", "input": ["one two three four", "five"]}),
            false,
        ),
        ("/v1/chat/completions", openai_body(true, true), true),
        ("/v1/chat/completions", openai_body(false, false), true),
        (
            "/v1/embeddings",
            json!({"model": "nomic-embed-text", "input": "some text here"}),
            false,
        ),
        ("/v1/messages", anthropic(true), true),
        ("/v1/messages", anthropic(false), true),
    ];
    let mut expected: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (route, body, generates) in &cases {
        let (status, text) = post(&sc, route, body);
        assert_eq!(status, 200, "{route}: {text}");
        let (prompt, completion) = counts_in(&text);
        assert!(prompt > 0, "{route}: no prompt count in {text}");
        if *generates {
            assert_eq!(completion, MOCK_TOKENS, "{route}: {text}");
        }
        let e = expected.entry(route).or_default();
        e.0 += prompt;
        e.1 += completion;
    }
    // A stream without `include_usage` shows the client no counts, but the sidecar asked Ollama
    // for them: they are counted like those of the same stream with the option.
    let (status, text) = post(&sc, "/v1/chat/completions", &openai_body(true, false));
    assert_eq!(status, 200);
    assert_eq!(counts_in(&text), (0, 0));
    let (_, with_usage) = post(&sc, "/v1/chat/completions", &openai_body(true, true));
    let (prompt, completion) = counts_in(&with_usage);
    let e = expected.entry("/v1/chat/completions").or_default();
    e.0 += 2 * prompt;
    e.1 += 2 * completion;
    // The mock's prompt count: 1 + chars/4 + 4 per message ("hello world": 1 + 2 + 4).
    let (_, text) = post(&sc, "/api/chat", &chat_body(false));
    assert_eq!(counts_in(&text), (7, MOCK_TOKENS));
    let e = expected.entry("/api/chat").or_default();
    e.0 += 7;
    e.1 += MOCK_TOKENS;

    let scraped = scrape(&sc);
    for (route, (prompt, completion)) in &expected {
        let model = if route.contains("embed") {
            "nomic-embed-text:latest"
        } else {
            "llama3.2:latest"
        };
        let labels = [("route", *route), ("model", model)];
        assert_eq!(
            metric(&scraped, "ollama_sidecar_prompt_tokens_total", &labels),
            *prompt as f64,
            "prompt tokens of {route}"
        );
        assert_eq!(
            metric(&scraped, "ollama_sidecar_completion_tokens_total", &labels),
            *completion as f64,
            "completion tokens of {route}"
        );
    }
    // Speed is measured at least for the native answers (eval_count / eval_duration): 5.
    assert!(
        metric(
            &scraped,
            "ollama_sidecar_generation_tokens_per_second_count",
            &[("model", "llama3.2:latest")]
        ) >= 5.0
    );
    assert!(
        metric(
            &scraped,
            "ollama_sidecar_model_load_duration_seconds_count",
            &[]
        ) >= 5.0
    );
}

#[test]
fn ttft_is_measured_to_the_first_token_not_the_headers() {
    // The first request loads the model (300 ms) before its stream starts; every request waits
    // 400 ms for its first token after that.
    let mock = Mock::start(&[
        ("MOCK_TOKENS", "3"),
        ("MOCK_LOAD_DELAY_MS", "300"),
        ("MOCK_FIRST_TOKEN_DELAY_MS", "400"),
    ]);
    let sc = start_sidecar(&format!(
        "log:\n  format: json\n{}",
        external_instances(&[&mock], 1)
    ));
    let (status, _) = post(&sc, "/api/chat", &chat_body(true));
    assert_eq!(status, 200);
    // Anthropic streams send `message_start` right after the header, before the first token.
    let anthropic = json!({"model": "llama3.2", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (status, _) = post(&sc, "/v1/messages", &anthropic);
    assert_eq!(status, 200);
    let text = scrape(&sc);
    let chat = [("route", "/api/chat"), ("model", "llama3.2:latest")];
    let chat_ttft = metric(
        &text,
        "ollama_sidecar_time_to_first_token_seconds_sum",
        &chat,
    );
    assert!(
        (0.7..10.0).contains(&chat_ttft),
        "chat TTFT {chat_ttft} s includes the load and the first-token delay"
    );
    let load = metric(
        &text,
        "ollama_sidecar_model_load_duration_seconds_sum",
        &[("model", "llama3.2:latest")],
    );
    assert!(load >= 0.3, "model load {load} s");
    let messages = [("route", "/v1/messages"), ("model", "llama3.2:latest")];
    let ttft = metric(
        &text,
        "ollama_sidecar_time_to_first_token_seconds_sum",
        &messages,
    );
    let ttfb = metric(
        &text,
        "ollama_sidecar_time_to_first_byte_seconds_sum",
        &messages,
    );
    assert!(ttft >= 0.4, "TTFT {ttft} s >= the first-token delay");
    assert!(
        ttfb < ttft - 0.3,
        "TTFB {ttfb} s is the header and message_start, well before the first token ({ttft} s)"
    );
    // The access log line says the same, as JSON.
    let mut lines = Vec::new();
    let logged = wait_until(Duration::from_secs(5), || {
        lines = sc
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect();
        lines.len() >= 2
    });
    assert!(logged, "access lines; log:\n{}", sc.log_text());
    let line = lines
        .iter()
        .find(|v| v["path"] == "/v1/messages")
        .expect("messages line");
    for field in [
        "request_id",
        "client",
        "route",
        "model",
        "instance",
        "status",
        "outcome",
        "queue_ms",
        "ttfb_ms",
        "ttft_ms",
        "duration_ms",
        "prompt_tokens",
        "completion_tokens",
        "bytes_in",
        "bytes_out",
        "retries",
    ] {
        assert!(line.get(field).is_some(), "{field} missing in {line}");
    }
    assert!(line["ttft_ms"].as_f64().unwrap_or(0.0) >= 400.0, "{line}");
    assert_eq!(line["completion_tokens"], 3);
    assert_eq!(line["status"], 200);
    assert_eq!(line["outcome"], "served");
    assert_eq!(line["instance"], "m0");
}

#[test]
fn a_flood_of_made_up_model_names_adds_no_series() {
    let mock = Mock::start(&[]);
    let sc = start_sidecar(&external_instances(&[&mock], 4));
    let made_up = |i: usize| json!({"model": format!("made-up-{i}"), "messages": [{"role": "user", "content": "x"}]});
    // One first, so the series for `other` exist.
    assert_eq!(post(&sc, "/api/chat", &made_up(0)).0, 404);
    let before = scrape(&sc);
    for i in 1..=200 {
        assert_eq!(post(&sc, "/api/chat", &made_up(i)).0, 404);
    }
    let after = scrape(&sc);
    assert_eq!(
        before.lines().count(),
        after.lines().count(),
        "new series appeared:\n{}",
        after
            .lines()
            .filter(|l| !before
                .lines()
                .any(|b| b.split(' ').next() == l.split(' ').next()))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metric(
            &after,
            "ollama_sidecar_requests_total",
            &[("model", "other"), ("status_class", "4xx")]
        ),
        201.0
    );
    assert!(!after.contains("made-up"));
}

#[test]
fn access_log_can_be_switched_off() {
    let mock = Mock::start(&[]);
    let on = start_sidecar(&external_instances(&[&mock], 1));
    let off = start_sidecar(&format!(
        "log:\n  access: false\n{}",
        external_instances(&[&mock], 1)
    ));
    for sc in [&on, &off] {
        assert_eq!(post(sc, "/api/chat", &chat_body(true)).0, 200);
    }
    assert!(
        wait_until(Duration::from_secs(5), || on.log_text().contains("access:")),
        "no access line; log:\n{}",
        on.log_text()
    );
    let line = on
        .log_text()
        .lines()
        .find(|l| l.contains("access:"))
        .map(str::to_string)
        .unwrap_or_default();
    for field in [
        "request_id=",
        "status=200",
        "outcome=",
        "ttft_ms=",
        "completion_tokens=",
        "retries=0",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(!off.log_text().contains("access:"), "{}", off.log_text());
    // Metrics are recorded either way.
    assert_eq!(
        metric(
            &scrape(&off),
            "ollama_sidecar_requests_total",
            &[("route", "/api/chat")]
        ),
        1.0
    );
}

/// A real Prometheus server scraping the admin port every second sees the exact counts sent.
#[test]
fn a_prometheus_server_scrapes_the_exact_counts() {
    if !have_prometheus_tools() {
        return;
    }
    let mock = Mock::start(&[("MOCK_TOKENS", "4")]);
    let sc = start_sidecar(&external_instances(&[&mock], 2));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sidecar\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            sc.admin_port
        ),
    )
    .expect("prometheus config");
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn prometheus");
    let prometheus = Proc { child };

    let mut prompt = 0;
    for _ in 0..3 {
        let (status, text) = post(&sc, "/api/chat", &chat_body(false));
        assert_eq!(status, 200);
        prompt += counts_in(&text).0;
    }
    for _ in 0..2 {
        let (status, text) = post(&sc, "/api/generate", &generate_body(true));
        assert_eq!(status, 200);
        prompt += counts_in(&text).0;
    }

    let query = |q: &str| -> Option<f64> {
        let v: Value = client()
            .get(format!("http://127.0.0.1:{port}/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .ok()?
            .json()
            .ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let wants = [
        (
            "sum(ollama_sidecar_requests_total{route=\"/api/chat\",status_class=\"2xx\"})",
            3.0,
        ),
        (
            "sum(ollama_sidecar_requests_total{route=\"/api/generate\",status_class=\"2xx\"})",
            2.0,
        ),
        ("sum(ollama_sidecar_completion_tokens_total)", 20.0),
        ("sum(ollama_sidecar_prompt_tokens_total)", prompt as f64),
        ("sum(ollama_sidecar_instance_up)", 1.0),
    ];
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(40), || {
        seen = wants.iter().map(|(q, _)| query(q)).collect();
        wants
            .iter()
            .zip(&seen)
            .all(|((_, want), got)| *got == Some(*want))
    });
    assert!(
        ok,
        "Prometheus saw {seen:?}, wanted {:?}",
        wants.iter().map(|w| w.1).collect::<Vec<_>>()
    );

    // Every query of the Grafana dashboard is one this Prometheus accepts.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docker/grafana/ollama-sidecar.json"
        ))
        .expect("dashboard file"),
    )
    .expect("dashboard JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| {
            t["expr"]
                .as_str()
                .map(|e| e.replace("$__rate_interval", "1m"))
        })
        .collect();
    assert!(exprs.len() > 20);
    for expr in &exprs {
        let v: Value = client()
            .get(format!("http://127.0.0.1:{port}/api/v1/query"))
            .query(&[("query", expr.as_str())])
            .send()
            .expect("query")
            .json()
            .expect("query JSON");
        assert_eq!(v["status"], "success", "{expr}: {v}");
    }
    drop(prometheus);
}

#[test]
fn a_relayed_error_is_not_a_stream_error_and_absent_values_are_left_out() {
    let mock = Mock::start(&[]);
    let sc = start_sidecar(&format!(
        "log:\n  format: json\n{}",
        external_instances(&[&mock], 2)
    ));
    let send = |id: &str, body: &str| {
        client()
            .post(sc.url("/api/chat"))
            .header("x-request-id", id)
            .body(body.to_string())
            .send()
            .expect("request")
            .status()
            .as_u16()
    };
    let unknown = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(send("unknown-model", &unknown.to_string()), 404);
    assert_eq!(send("not-json", "{not json"), 400);
    let lines = access_lines(&sc, |ls| ls.len() >= 2);
    let line = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no line for {id}; log:\n{}", sc.log_text()))
    };
    // Ollama's 404 is relayed: served, its message is the line's error, no stream broke.
    let relayed = line("unknown-model");
    assert_eq!(relayed["status"], 404, "{relayed}");
    assert_eq!(relayed["outcome"], "served", "{relayed}");
    assert!(relayed.get("stream_error").is_none(), "{relayed}");
    assert!(
        relayed["error"]
            .as_str()
            .unwrap_or("")
            .contains("not found"),
        "{relayed}"
    );
    assert!(relayed.get("rejection").is_none(), "{relayed}");
    // Refused before any instance: no instance, no model, no "-" placeholders.
    let refused = line("not-json");
    assert_eq!(refused["rejection"], "invalid_body", "{refused}");
    assert_eq!(refused["error"], "invalid_body", "{refused}");
    assert!(refused.get("instance").is_none(), "{refused}");
    assert!(refused.get("model").is_none(), "{refused}");
    assert!(!refused.to_string().contains("\"-\""), "{refused}");
    let text = scrape(&sc);
    assert_eq!(
        metric(&text, "ollama_sidecar_stream_errors_total", &[]),
        0.0,
        "{text}"
    );
}
