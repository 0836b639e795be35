//! Access control through the real server: API keys (401), model and route policy (403), request,
//! concurrency and token rates (429 + Retry-After), CORS answered by the sidecar, the admin token,
//! and keys that never reach the logs or the upstream. Every wait is bounded; every process
//! started here is killed by a guard.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdefgh";
const ADMIN: &str = "admin-key-0123456789abcdef";

fn sha(secret: &str) -> String {
    format!("{:x}", Sha256::digest(secret.as_bytes()))
}

fn chat_body(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": false})
        .to_string()
}

fn openai_body(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// Sends a request, returning status, headers and body.
fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = client().request(method.parse().expect("method"), url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.header("content-type", "application/json").body(b);
    }
    let resp = rb.send().expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().unwrap_or_default())
}

/// `send`s a non-streamed `/api/chat` for `model` with `headers`.
fn post_chat(
    sc: &Sidecar,
    headers: &[(&str, &str)],
    model: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    send(
        "POST",
        &sc.url("/api/chat"),
        headers,
        Some(chat_body(model)),
    )
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The error message, checking the body has the shape of the route's API.
fn error_in_shape(path: &str, status: u16, body: &str) -> String {
    let v = json_of(body);
    if path.starts_with("/v1/messages") {
        assert_eq!(v["type"], "error", "{body}");
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "",
        };
        if !kind.is_empty() {
            assert_eq!(v["error"]["type"], kind, "{body}");
        }
        v["error"]["message"].as_str().expect("message").to_string()
    } else if path.starts_with("/v1/") {
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400 | 413 => "invalid_request_error",
            _ => "api_error",
        };
        assert_eq!(v["error"]["type"], kind, "{body}");
        assert!(v["error"]["param"].is_null(), "{body}");
        v["error"]["message"].as_str().expect("message").to_string()
    } else {
        v["error"].as_str().expect("error string").to_string()
    }
}

fn keys_config(extra_key_fields: &str) -> String {
    format!(
        "auth:\n  keys:\n    - name: alice\n      sha256: {}\n{extra_key_fields}    - name: bob\n      key_env: TEST_BOB_KEY\n      models: [\"llama3.2*\"]\n    - name: root\n      sha256: {}\n      admin: true\n      models: [\"llama3.2*\", \"tinyllama*\"]\n",
        sha(ALICE),
        sha(ADMIN)
    )
}

fn start_with_keys(mock: &Mock, extra_key_fields: &str, more: &str) -> Sidecar {
    let body = format!(
        "{}{}{}",
        keys_config(extra_key_fields),
        more,
        external_instances(&[mock], 4)
    );
    Sidecar::start_with_env(&body, &[("TEST_BOB_KEY", BOB), ("RUST_LOG", "debug")])
}

#[test]
fn missing_or_wrong_key_is_401_in_each_shape() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "", "");
    let before = client_requests(&mock);
    let cases = [
        ("POST", "/api/chat", Some(chat_body("llama3.2"))),
        ("POST", "/api/generate", Some(json!({"model":"llama3.2","prompt":"hi"}).to_string())),
        ("POST", "/v1/chat/completions", Some(openai_body("llama3.2"))),
        ("POST", "/v1/messages", Some(json!({"model":"llama3.2","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}).to_string())),
        ("GET", "/api/tags", None),
        ("GET", "/v1/models", None),
        ("POST", "/api/pull", Some(json!({"model":"llama3.2"}).to_string())),
        ("GET", "/no/such/path", None),
    ];
    for (method, path, body) in &cases {
        for auth in [
            None,
            Some(("authorization", "Bearer wrong-key-0123456789")),
            Some(("x-api-key", "wrong-key-0123456789")),
            Some(("authorization", "Basic YWxpY2U6eA==")),
        ] {
            let headers: Vec<(&str, &str)> = auth.into_iter().collect();
            let (status, h, text) = send(method, &sc.url(path), &headers, body.clone());
            assert_eq!(status, 401, "{method} {path} {auth:?}: {text}");
            let msg = error_in_shape(path, status, &text);
            assert!(msg.contains("API key"), "{msg}");
            assert!(h
                .get("www-authenticate")
                .is_some_and(|v| v.to_str().unwrap_or("").starts_with("Bearer")));
            assert!(h.get("x-request-id").is_some());
        }
    }
    assert_eq!(
        client_requests(&mock),
        before,
        "a refused request reached Ollama"
    );

    // The right key, in either header, passes (a key from an environment variable too).
    for (name, value) in [
        ("authorization", format!("Bearer {ALICE}")),
        ("x-api-key", ALICE.to_string()),
        ("Authorization", format!("bearer {BOB}")),
    ] {
        let (status, _, text) = post_chat(&sc, &[(name, &value)], "llama3.2");
        assert_eq!(status, 200, "{name}: {text}");
        let (status, _, _) = send("GET", &sc.url("/api/tags"), &[(name, &value)], None);
        assert_eq!(status, 200);
    }
}

#[test]
fn keys_never_reach_the_logs_or_the_upstream() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "", "");
    let bearer = format!("Bearer {ALICE}");
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Option<String>);
    let requests: Vec<Case> = vec![
        (
            "POST",
            "/api/chat",
            vec![("authorization", &bearer)],
            Some(chat_body("llama3.2")),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![("x-api-key", ALICE)],
            Some(openai_body("llama3.2")),
        ),
        ("GET", "/api/tags", vec![("authorization", &bearer)], None),
        (
            "POST",
            "/api/show",
            vec![("authorization", &bearer)],
            Some(json!({"model":"llama3.2"}).to_string()),
        ),
        // The sidecar key in x-api-key; an Authorization meant for Ollama itself passes on.
        (
            "POST",
            "/api/generate",
            vec![
                ("x-api-key", BOB),
                ("authorization", "Bearer ollama-cloud-token"),
            ],
            Some(json!({"model":"llama3.2","prompt":"hi","stream":false}).to_string()),
        ),
        (
            "POST",
            "/api/chat",
            vec![("authorization", "Bearer wrong-key-0123456789")],
            Some(chat_body("llama3.2")),
        ),
    ];
    for (method, path, headers, body) in requests {
        let (status, _, text) = send(method, &sc.url(path), &headers, body);
        assert!(status == 200 || status == 401, "{path}: {status} {text}");
    }
    let seen = mock_requests(&mock);
    assert!(seen.len() >= 5, "{seen:?}");
    for req in &seen {
        let all = req.to_string();
        assert!(
            !all.contains(ALICE) && !all.contains(BOB),
            "key forwarded: {all}"
        );
        if req["path"] != "/api/generate" {
            assert_eq!(logged_header(req, "authorization"), None, "{all}");
        }
        assert_eq!(logged_header(req, "x-api-key"), None, "{all}");
    }
    let generate = seen
        .iter()
        .find(|r| r["path"] == "/api/generate")
        .expect("generate forwarded");
    assert_eq!(
        logged_header(generate, "authorization").as_deref(),
        Some("Bearer ollama-cloud-token")
    );
    // The access log names the key, never the secret (RUST_LOG=debug).
    let log = sc.log_text();
    assert!(
        log.contains("client=alice") || log.contains("\"client\":\"alice\""),
        "{log}"
    );
    assert!(
        !log.contains(ALICE) && !log.contains(BOB),
        "a key in the log:\n{log}"
    );
    assert!(
        !log.contains("wrong-key-0123456789"),
        "a presented key in the log"
    );
}

#[test]
fn auth_off_leaves_authorization_alone() {
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&external_instances(&[&mock], 2));
    let (status, _, _) = post_chat(
        &sc,
        &[("authorization", "Bearer anything"), ("x-api-key", "k")],
        "llama3.2",
    );
    assert_eq!(status, 200);
    let seen = mock_requests(&mock);
    let chat = seen
        .iter()
        .find(|r| r["path"] == "/api/chat")
        .expect("chat");
    assert_eq!(
        logged_header(chat, "authorization").as_deref(),
        Some("Bearer anything")
    );
    assert_eq!(logged_header(chat, "x-api-key").as_deref(), Some("k"));
}

#[test]
fn forbidden_model_is_403_in_each_shape() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "", "");
    let bob = format!("Bearer {BOB}");
    let auth = [("authorization", bob.as_str())];
    let before = client_requests(&mock);
    let cases = [
        ("/api/chat", chat_body("qwen3:8b")),
        ("/api/chat", chat_body("llama3")),
        (
            "/api/generate",
            json!({"model":"mistral","prompt":"x"}).to_string(),
        ),
        (
            "/api/embed",
            json!({"model":"nomic-embed-text","input":"x"}).to_string(),
        ),
        ("/v1/chat/completions", openai_body("qwen3:8b")),
        (
            "/v1/embeddings",
            json!({"model":"nomic-embed-text","input":"x"}).to_string(),
        ),
        (
            "/v1/messages",
            json!({"model":"qwen3","max_tokens":8,"messages":[]}).to_string(),
        ),
        ("/api/show", json!({"model":"qwen3:8b"}).to_string()),
        ("/api/show", json!({"name":"qwen3:8b"}).to_string()),
    ];
    for (path, body) in &cases {
        let (status, _, text) = send("POST", &sc.url(path), &auth, Some(body.clone()));
        assert_eq!(status, 403, "{path} {body}: {text}");
        let msg = error_in_shape(path, status, &text);
        assert!(msg.contains("not allowed for key `bob`"), "{msg}");
    }
    let (status, _, text) = send("GET", &sc.url("/v1/models/qwen3:8b"), &auth, None);
    assert_eq!(status, 403, "{text}");
    // A compressed body cannot be checked: refused while a model restriction applies.
    let (status, _, text) = send(
        "POST",
        &sc.url("/api/chat"),
        &[
            ("authorization", bob.as_str()),
            ("content-encoding", "gzip"),
        ],
        Some("\u{1f}binary".to_string()),
    );
    assert_eq!(status, 403, "{text}");
    assert_eq!(
        client_requests(&mock),
        before,
        "a forbidden model reached Ollama"
    );

    // Allowed: the raw name or its `name:tag` form matches `llama3.2*`.
    for model in ["llama3.2", "llama3.2:latest", "LLAMA3.2:1b"] {
        let (status, _, text) = post_chat(&sc, &auth, model);
        // Ollama (the mock) decides whether it has the model.
        assert!(status == 200 || status == 404, "{model}: {status} {text}");
    }
    let (status, _, text) = send(
        "POST",
        &sc.url("/v1/chat/completions"),
        &auth,
        Some(openai_body("llama3.2")),
    );
    assert_eq!(status, 200, "{text}");
    // Alice's key allows every model.
    let (status, _, text) = post_chat(&sc, &[("x-api-key", ALICE)], "qwen3:8b");
    assert_ne!(status, 403, "{text}");
}

#[test]
fn management_needs_an_admin_key() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "", "");
    let before = client_requests(&mock);
    let alice = format!("Bearer {ALICE}");
    let root = format!("Bearer {ADMIN}");
    for (method, path, body) in [
        ("POST", "/api/pull", json!({"model":"llama3.2"})),
        ("DELETE", "/api/delete", json!({"model":"llama3.2"})),
        (
            "POST",
            "/api/copy",
            json!({"source":"llama3.2","destination":"x"}),
        ),
        (
            "POST",
            "/api/create",
            json!({"model":"x","from":"llama3.2"}),
        ),
        ("POST", "/api/push", json!({"model":"llama3.2"})),
    ] {
        let (status, _, text) = send(
            method,
            &sc.url(path),
            &[("authorization", alice.as_str())],
            Some(body.to_string()),
        );
        assert_eq!(status, 403, "{path}: {text}");
        let msg = error_in_shape(path, status, &text);
        assert!(
            msg.contains("management") && msg.contains("admin: true"),
            "{msg}"
        );
    }
    let (status, _, _) = send(
        "HEAD",
        &sc.url("/api/blobs/sha256:0000"),
        &[("authorization", alice.as_str())],
        None,
    );
    assert_eq!(status, 403);
    // The admin key's own model list applies to management bodies too.
    for (method, path, body) in [
        ("POST", "/api/pull", json!({"model":"qwen3"})),
        ("DELETE", "/api/delete", json!({"name":"qwen3"})),
        (
            "POST",
            "/api/copy",
            json!({"source":"llama3.2","destination":"qwen3"}),
        ),
        (
            "POST",
            "/api/create",
            json!({"model":"llama3.2-mine","from":"qwen3"}),
        ),
    ] {
        let (status, _, text) = send(
            method,
            &sc.url(path),
            &[("authorization", root.as_str())],
            Some(body.to_string()),
        );
        assert_eq!(status, 403, "{path}: {text}");
    }
    let (status, _, text) = send(
        "POST",
        &sc.url("/api/pull"),
        &[("authorization", root.as_str())],
        Some("{not json".to_string()),
    );
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        client_requests(&mock),
        before,
        "a refused request reached Ollama"
    );

    // Allowed: the body read for the check still reaches Ollama whole.
    let body = json!({"model":"tinyllama","stream":false}).to_string();
    let (status, _, text) = send(
        "POST",
        &sc.url("/api/pull"),
        &[("authorization", root.as_str())],
        Some(body.clone()),
    );
    assert_eq!(status, 200, "{text}");
    let seen = mock_requests(&mock);
    let pull = seen
        .iter()
        .find(|r| r["path"] == "/api/pull")
        .expect("pull forwarded");
    assert_eq!(pull["body_len"].as_u64(), Some(body.len() as u64), "{pull}");
    assert_eq!(pull["model"], "tinyllama", "{pull}");
}

#[test]
fn request_rate_is_429_with_retry_after() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "      requests_per_minute: 4\n", "");
    let alice = format!("Bearer {ALICE}");
    let auth = [("authorization", alice.as_str())];
    for _ in 0..4 {
        let (status, _, text) = post_chat(&sc, &auth, "llama3.2");
        assert_eq!(status, 200, "{text}");
    }
    let before = client_requests(&mock);
    for path in ["/api/chat", "/v1/chat/completions", "/api/tags"] {
        let body = (path != "/api/tags").then(|| chat_body("llama3.2"));
        let method = if body.is_some() { "POST" } else { "GET" };
        let (status, h, text) = send(method, &sc.url(path), &auth, body);
        assert_eq!(status, 429, "{path}: {text}");
        let msg = error_in_shape(path, status, &text);
        assert!(msg.contains("4 requests per minute"), "{msg}");
        let after: u64 = h
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=15).contains(&after), "Retry-After {after}");
    }
    assert_eq!(client_requests(&mock), before);
    // Another key has its own budget.
    let (status, _, _) = post_chat(&sc, &[("x-api-key", BOB)], "llama3.2");
    assert_eq!(status, 200);
}

#[test]
fn concurrency_cap_is_429() {
    // Each stream takes about 8 x 150 ms.
    let mock = Mock::start(&[("MOCK_TOKEN_DELAY_MS", "150")]);
    let sc = start_with_keys(&mock, "      max_concurrent: 1\n", "");
    let alice = format!("Bearer {ALICE}");
    let stream_body =
        json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}).to_string();
    let first = client()
        .post(sc.url("/api/chat"))
        .header("authorization", &alice)
        .body(stream_body.clone())
        .send()
        .expect("first stream");
    assert_eq!(first.status(), 200);
    for path in ["/api/chat", "/v1/chat/completions"] {
        let (status, h, text) = send(
            "POST",
            &sc.url(path),
            &[("authorization", alice.as_str())],
            Some(chat_body("llama3.2")),
        );
        assert_eq!(status, 429, "{path}: {text}");
        let msg = error_in_shape(path, status, &text);
        assert!(msg.contains("max_concurrent"), "{msg}");
        assert_eq!(
            h.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
    }
    // Metadata is not counted; another key is not affected.
    let (status, _, _) = send(
        "GET",
        &sc.url("/api/tags"),
        &[("authorization", alice.as_str())],
        None,
    );
    assert_eq!(status, 200);
    let (status, _, _) = post_chat(&sc, &[("x-api-key", BOB)], "llama3.2");
    assert_eq!(status, 200);
    // Once the stream is over, the key may send again.
    let text = first.text().expect("stream");
    assert!(text.contains("\"done\":true"), "{text}");
    assert!(wait_until(Duration::from_secs(5), || {
        post_chat(&sc, &[("authorization", alice.as_str())], "llama3.2").0 == 200
    }));
}

#[test]
fn token_budget_is_429_after_usage() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "      tokens_per_minute: 20\n", "");
    let alice = format!("Bearer {ALICE}");
    let auth = [("authorization", alice.as_str())];
    // The first answer spends more than the budget (prompt + completion tokens)...
    let (status, _, text) = send(
        "POST",
        &sc.url("/api/generate"),
        &auth,
        Some(json!({"model":"llama3.2","prompt":"a long prompt to count several tokens in it please","stream":false,"options":{"num_predict":16}}).to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let v = json_of(&text);
    let used = v["prompt_eval_count"].as_u64().unwrap_or(0) + v["eval_count"].as_u64().unwrap_or(0);
    assert!(
        used > 20,
        "the mock answered with only {used} tokens: {text}"
    );
    // ... so the next one waits for the refill, in every shape.
    for path in ["/api/chat", "/v1/chat/completions"] {
        let (status, h, text) = send("POST", &sc.url(path), &auth, Some(chat_body("llama3.2")));
        assert_eq!(status, 429, "{path}: {text}");
        let msg = error_in_shape(path, status, &text);
        assert!(msg.contains("tokens per minute"), "{msg}");
        let after: u64 = h
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=300).contains(&after), "Retry-After {after}");
    }
    // Streamed usage is counted as well: bob's budget is untouched, alice's stays spent.
    let (status, _, _) = post_chat(&sc, &[("x-api-key", BOB)], "llama3.2");
    assert_eq!(status, 200);
}

#[test]
fn streamed_tokens_are_charged() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "      tokens_per_minute: 5\n", "");
    let alice = format!("Bearer {ALICE}");
    let stream_body =
        json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}).to_string();
    let resp = client()
        .post(sc.url("/api/chat"))
        .header("authorization", &alice)
        .body(stream_body)
        .send()
        .expect("stream");
    assert_eq!(resp.status(), 200);
    assert!(resp.text().expect("body").contains("\"eval_count\""));
    // Charged when the request ends (after the last chunk reached the client).
    assert!(wait_until(Duration::from_secs(5), || {
        post_chat(&sc, &[("authorization", alice.as_str())], "llama3.2").0 == 429
    }));
}

/// The events of an SSE body, with the fields that differ between two runs (`id`, `created`)
/// blanked, so a stream through the sidecar can be compared with one from the mock directly.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(
            |e| match e.strip_prefix("data: ").map(serde_json::from_str::<Value>) {
                Some(Ok(Value::Object(mut o))) => {
                    o.remove("id");
                    o.remove("created");
                    Value::Object(o).to_string()
                }
                _ => e.to_string(),
            },
        )
        .collect()
}

#[test]
fn openai_streams_are_charged_without_include_usage() {
    let mock = Mock::start(&[("MOCK_TOKENS", "70")]);
    let sc = start_with_keys(&mock, "      tokens_per_minute: 60\n", "");
    let alice = format!("Bearer {ALICE}");
    let stream =
        json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true})
            .to_string();
    let auth = [("authorization", alice.as_str())];
    // The client gets exactly what Ollama would send it without the option: no usage chunk.
    let (status, _, through) = send(
        "POST",
        &sc.url("/v1/chat/completions"),
        &auth,
        Some(stream.clone()),
    );
    assert_eq!(status, 200, "{through}");
    let (_, _, direct) = send(
        "POST",
        &mock.url("/v1/chat/completions"),
        &[],
        Some(stream.clone()),
    );
    assert!(!through.contains("\"usage\""), "{through}");
    assert_eq!(sse_events(&through), sse_events(&direct));
    // Ollama was asked for the usage on the client's behalf: the body it got through the
    // sidecar is the client's with the option as its last key.
    let asking = format!(
        "{},\"stream_options\":{{\"include_usage\":true}}}}",
        &stream[..stream.len() - 1]
    );
    let bodies: Vec<String> = mock_requests(&mock)
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .map(|r| r["body_sha256"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        bodies,
        [sha(&asking), sha(&stream)],
        "through the sidecar, then direct"
    );
    // The first stream spent more than the 60-token budget (a prompt and 70 tokens): the next ones are refused.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, _, _) = send(
            "POST",
            &sc.url("/v1/chat/completions"),
            &auth,
            Some(stream.clone()),
        );
        statuses.push(status);
    }
    assert!(statuses.iter().all(|&s| s == 429), "{statuses:?}");
    // A client that asked for the usage still gets it.
    let (status, _, text) = send(
        "POST",
        &sc.url("/v1/chat/completions"),
        &[("x-api-key", BOB)],
        Some(json!({"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}).to_string()),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"completion_tokens\":70"), "{text}");
}

#[test]
fn a_stream_cut_short_is_charged_for_what_it_carried() {
    use std::io::{Read, Write};
    let mock = Mock::start(&[("MOCK_TOKENS", "200"), ("MOCK_TOKEN_DELAY_MS", "20")]);
    let sc = start_with_keys(&mock, "      tokens_per_minute: 30\n", "");
    let body = json!({"model":"llama3.2","prompt":"hi"}).to_string();
    let request = format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", sc.port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(request.as_bytes()).expect("send");
    // Read until about 40 tokens have arrived, then leave before the counts at the end.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.windows(13).filter(|w| w == b"\"done\":false}").count() < 40 {
        assert!(std::time::Instant::now() < deadline, "the stream stalled");
        let n = conn.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    // Charged when the sidecar has seen the client go (its access line); a probe that was let
    // through would spend tokens itself, so one probe only.
    assert!(
        wait_until(Duration::from_secs(5), || sc
            .log_text()
            .contains("outcome=\"cancelled_streaming\"")),
        "the client's leaving went unnoticed"
    );
    // What it carried (about 40 tokens) is over the 30-token budget: the key is refused.
    let alice = format!("Bearer {ALICE}");
    let (status, _, text) = post_chat(&sc, &[("authorization", alice.as_str())], "llama3.2");
    assert_eq!(
        status, 429,
        "a stream the client cut short was not charged: {text}"
    );
}

#[test]
fn anonymous_metadata_when_allowed() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "", "");
    let (status, _, _) = send("GET", &sc.url("/api/tags"), &[], None);
    assert_eq!(status, 401, "metadata needs a key by default");
    drop(sc);
    let body = format!(
        "{}  allow_anonymous_metadata: true\n{}",
        keys_config(""),
        external_instances(&[&mock], 2)
    );
    let sc = Sidecar::start_with_env(&body, &[("TEST_BOB_KEY", BOB)]);
    for path in ["/", "/api/version", "/api/tags", "/api/ps", "/v1/models"] {
        let (status, _, text) = send("GET", &sc.url(path), &[], None);
        assert_eq!(status, 200, "{path}: {text}");
    }
    let (status, _, _) = post_chat(&sc, &[], "llama3.2");
    assert_eq!(status, 401);
    // A wrong key is refused even where no key is needed.
    let (status, _, _) = send(
        "GET",
        &sc.url("/api/tags"),
        &[("x-api-key", "nope-0123456789abcdef")],
        None,
    );
    assert_eq!(status, 401);
}

#[test]
fn policy_without_keys() {
    let mock = Mock::start(&[]);
    let body = format!(
        "policy:\n  models: [\"llama3.2*\"]\n  deny_classes: [management]\n  requests_per_minute_per_client: 6\n{}",
        external_instances(&[&mock], 2)
    );
    let sc = Sidecar::start(&body);
    let before = client_requests(&mock);
    let (status, _, text) = post_chat(&sc, &[], "qwen3");
    assert_eq!(status, 403);
    assert!(error_in_shape("/api/chat", 403, &text).contains("policy.models"));
    let (status, _, text) = send(
        "POST",
        &sc.url("/v1/chat/completions"),
        &[],
        Some(openai_body("qwen3")),
    );
    assert_eq!(status, 403);
    error_in_shape("/v1/chat/completions", 403, &text);
    let (status, _, text) = send(
        "POST",
        &sc.url("/api/pull"),
        &[],
        Some(json!({"model":"llama3.2"}).to_string()),
    );
    assert_eq!(status, 403);
    assert!(error_in_shape("/api/pull", 403, &text).contains("policy.deny_classes"));
    assert_eq!(client_requests(&mock), before);
    // Two of six used (the refused models; a denied route is refused before counting): four
    // more pass, then 429 for this client address.
    for _ in 0..4 {
        let (status, _, text) = post_chat(&sc, &[], "llama3.2");
        assert_eq!(status, 200, "{text}");
    }
    let (status, h, text) = send("GET", &sc.url("/api/tags"), &[], None);
    assert_eq!(status, 429, "{text}");
    assert!(error_in_shape("/api/tags", 429, &text).contains("requests_per_minute_per_client"));
    assert!(h.get("retry-after").is_some());
    let (status, _, text) = send(
        "POST",
        &sc.url("/v1/chat/completions"),
        &[],
        Some(openai_body("llama3.2")),
    );
    assert_eq!(status, 429);
    error_in_shape("/v1/chat/completions", 429, &text);
}

#[test]
fn cors_answered_by_the_sidecar() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(
        &mock,
        "",
        "cors:\n  origins: [\"https://app.example\"]\n  max_age: 5m\n",
    );
    let before = client_requests(&mock);
    let alice = format!("Bearer {ALICE}");
    // Preflight: answered here (no key needed), never forwarded.
    for path in ["/api/chat", "/v1/chat/completions", "/api/tags"] {
        let (status, h, body) = send(
            "OPTIONS",
            &sc.url(path),
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type, x-stainless-os",
                ),
            ],
            None,
        );
        assert_eq!(status, 204, "{path}: {body}");
        let get = |k: &str| {
            h.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(get("access-control-allow-origin"), "https://app.example");
        assert!(get("access-control-allow-methods").contains("POST"));
        assert_eq!(
            get("access-control-allow-headers"),
            "authorization, content-type, x-stainless-os"
        );
        assert_eq!(get("access-control-max-age"), "300");
        assert_eq!(get("vary"), "Origin");
        assert!(body.is_empty());
    }
    assert_eq!(client_requests(&mock), before, "a preflight was forwarded");

    // Actual requests: the allowed origin gets the header; Ollama never sees the Origin.
    for (method, path, body) in [
        ("POST", "/api/chat", Some(chat_body("llama3.2"))),
        (
            "POST",
            "/v1/chat/completions",
            Some(openai_body("llama3.2")),
        ),
        ("GET", "/api/tags", None),
    ] {
        let (status, h, text) = send(
            method,
            &sc.url(path),
            &[
                ("origin", "https://app.example"),
                ("authorization", alice.as_str()),
            ],
            body,
        );
        assert_eq!(status, 200, "{path}: {text}");
        assert_eq!(
            h.get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some("https://app.example"),
            "{path}"
        );
        assert!(h
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap_or("").contains("Origin")));
        assert!(h
            .get("access-control-expose-headers")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("X-Request-Id")));
    }
    let seen = mock_requests(&mock);
    assert!(
        seen.iter().all(|r| logged_header(r, "origin").is_none()),
        "{seen:?}"
    );
    // The sidecar's own errors carry the header too, so the page can read them.
    let (status, h, _) = send(
        "GET",
        &sc.url("/api/tags"),
        &[("origin", "https://app.example")],
        None,
    );
    assert_eq!(status, 401);
    assert!(h.get("access-control-allow-origin").is_some());

    // A disallowed origin: no CORS headers, and the request passes as before, Origin included:
    // Ollama's own origin check (the mock has it too) refuses it.
    let (status, h, _) = send(
        "GET",
        &sc.url("/api/tags"),
        &[
            ("origin", "https://evil.example"),
            ("authorization", alice.as_str()),
        ],
        None,
    );
    assert_eq!(status, 403);
    assert!(h.get("access-control-allow-origin").is_none());
    let seen = mock_requests(&mock);
    assert!(seen
        .iter()
        .any(|r| logged_header(r, "origin").as_deref() == Some("https://evil.example")));
    let (status, h, _) = send(
        "OPTIONS",
        &sc.url("/api/chat"),
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        None,
    );
    assert_eq!(
        status, 401,
        "a disallowed preflight is not answered by the sidecar"
    );
    assert!(h.get("access-control-allow-origin").is_none());
}

#[test]
fn cors_off_passes_through() {
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&external_instances(&[&mock], 2));
    let before = client_requests(&mock);
    let (_, h, _) = send(
        "OPTIONS",
        &sc.url("/api/tags"),
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "GET"),
        ],
        None,
    );
    assert!(h.get("access-control-allow-origin").is_none());
    assert_eq!(
        client_requests(&mock),
        before + 1,
        "the preflight goes to Ollama"
    );
    // Origin forwarded: Ollama's own check decides (the reason the sidecar can answer CORS).
    let (status, _, _) = send(
        "GET",
        &sc.url("/api/tags"),
        &[("origin", "https://app.example")],
        None,
    );
    assert_eq!(status, 403);
    let seen = mock_requests(&mock);
    assert!(seen
        .iter()
        .any(|r| logged_header(r, "origin").as_deref() == Some("https://app.example")));
}

/// A sidecar with an admin token (the `admin` section is not `Sidecar::start`'s to write).
fn start_admin_token_sidecar(mock: &Mock, token: &str) -> Sidecar {
    let instances = external_instances(&[mock], 1);
    SidecarCmd::config(move |p| {
        format!(
            "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n  token_env: TEST_ADMIN_TOKEN\n{instances}",
            p.proxy, p.admin
        )
    })
    .env("TEST_ADMIN_TOKEN", token)
    .start()
}

#[test]
fn admin_token_guards_metrics_and_status() {
    let mock = Mock::start(&[]);
    let token = "admin-token-0123456789abcdef";
    let sc = start_admin_token_sidecar(&mock, token);
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", sc.admin_port);
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            send("GET", &url(path), &[], None).0,
            200,
            "{path} stays open"
        );
    }
    for path in ["/metrics", "/status"] {
        let (status, h, body) = send("GET", &url(path), &[], None);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(h.get("www-authenticate").is_some());
        let (status, _, _) = send(
            "GET",
            &url(path),
            &[("authorization", "Bearer wrong")],
            None,
        );
        assert_eq!(status, 401);
        let bearer = format!("Bearer {token}");
        let (status, _, body) = send(
            "GET",
            &url(path),
            &[("authorization", bearer.as_str())],
            None,
        );
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[test]
fn invalid_access_config_names_the_key() {
    let cases = [
        ("auth:\n  keys:\n    - name: a\n      sha256: xyz\n", "auth.keys[0].sha256"),
        ("auth:\n  keys:\n    - name: a\n", "auth.keys[0]: expected exactly one of"),
        ("auth:\n  keys:\n    - name: a\n      key_env: TEST_SURELY_UNSET_VAR\n", "auth.keys[0].key_env: environment variable `TEST_SURELY_UNSET_VAR` is not set"),
        ("auth:\n  keys:\n    - name: a\n      key_file: /nonexistent/key\n", "auth.keys[0].key_file: cannot read"),
        ("auth:\n  keys:\n    - name: a\n      sha256: abababababababababababababababababababababababababababababababab\n      routes: [management]\n", "auth.keys[0].routes: `management` needs `admin: true`"),
        ("policy:\n  deny_classes: [everything]\n", "policy.deny_classes[0]: `everything`: expected one of"),
        ("cors:\n  origins: [\"app.example\"]\n", "cors.origins[0]"),
        ("limits:\n  max_headers: 1000\n", "limits.max_headers: expected 1 to 256"),
        ("limits:\n  body_read_timeout: 1ms\n", "limits.body_read_timeout"),
        ("auth:\n  allow_anonymous_metadata: true\n", "auth.allow_anonymous_metadata"),
    ];
    for (yaml, expected) in cases {
        let mut config = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("config");
        std::io::Write::write_all(
            &mut config,
            format!("{yaml}instances:\n  - name: a\n    url: http://127.0.0.1:1\n").as_bytes(),
        )
        .expect("write");
        let mut check = sidecar_command();
        check.arg("check").arg("--config").arg(config.path());
        let out = run_to_end(check);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{yaml}: expected `{expected}` in: {stderr}"
        );
        assert!(
            stderr.contains(&config.path().display().to_string()),
            "{stderr}"
        );
    }
}

#[test]
fn denied_route_class_is_403_in_each_shape() {
    let mock = Mock::start(&[]);
    let body = format!(
        "policy:\n  deny_classes: [inference]\n{}",
        external_instances(&[&mock], 2)
    );
    let sc = Sidecar::start(&body);
    let before = client_requests(&mock);
    for (path, body) in [
        ("/api/chat", chat_body("llama3.2")),
        ("/v1/chat/completions", openai_body("llama3.2")),
        (
            "/v1/messages",
            json!({"model":"llama3.2","max_tokens":8,"messages":[]}).to_string(),
        ),
    ] {
        let (status, _, text) = send("POST", &sc.url(path), &[], Some(body));
        assert_eq!(status, 403, "{path}: {text}");
        let msg = error_in_shape(path, status, &text);
        assert!(msg.contains("inference routes are disabled"), "{msg}");
    }
    assert_eq!(client_requests(&mock), before);
    let (status, _, _) = send("GET", &sc.url("/v1/models"), &[], None);
    assert_eq!(status, 200);
}

/// Issue 14: a percent-encoded path and a case-folded body key name a route and a model for
/// Ollama (Go decodes `URL.Path`; `encoding/json` matches keys case-insensitively), so the
/// sidecar decides on what Ollama will run, not on the bytes as sent.
#[test]
fn encoded_paths_and_folded_keys_are_decided_as_ollama_reads_them() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "      models: [\"qwen*\"]\n", "");
    let alice = format!("Bearer {ALICE}");
    let auth = [
        ("Authorization", alice.as_str()),
        ("Content-Type", "application/json"),
    ];
    let mut conn = RawConn::new(sc.port);
    let before = client_requests(&mock);
    let pull = json!({"model": "qwen2.5:0.5b"}).to_string();
    // Management for Ollama, so 403 for a key without `admin`, however it is spelled.
    for target in [
        "/api/pull",
        "/api/%70ull",
        "/api%2Fpull",
        "/api/%70%75%6C%6C?x=1",
    ] {
        let req = raw_request("POST", target.as_bytes(), &auth, pull.as_bytes());
        let resp = conn.exchange(&req, false).expect("an answer");
        assert_eq!(resp.status, 403, "{target}: {}", resp.text());
        assert!(resp.text().contains("management routes"), "{}", resp.text());
    }
    // An inference route behind an escape is still inference: its model is checked.
    let chat = chat_body("llama3.2");
    let req = raw_request("POST", b"/api/%63hat", &auth, chat.as_bytes());
    let resp = conn.exchange(&req, false).expect("an answer");
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert!(resp.text().contains("llama3.2"), "{}", resp.text());
    // Keys Go binds to `model`: checked as the model Ollama would run.
    for body in [
        r#"{"Model":"llama3.2","messages":[]}"#,
        r#"{"MODEL":"llama3.2","messages":[]}"#,
        r#"{"moDel":"llama3.2","stream":false}"#,
    ] {
        let req = raw_request("POST", b"/api/chat", &auth, body.as_bytes());
        let resp = conn.exchange(&req, false).expect("an answer");
        assert_eq!(resp.status, 403, "{body}: {}", resp.text());
    }
    // Two keys that bind `model` to different values: Ollama takes the last, the sidecar refuses.
    let body = r#"{"model":"qwen2.5:0.5b","MODEL":"llama3.2","messages":[]}"#;
    let req = raw_request("POST", b"/api/chat", &auth, body.as_bytes());
    let resp = conn.exchange(&req, false).expect("an answer");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.text().contains("ambiguous"), "{}", resp.text());
    // A target Go itself rejects (a bad escape) is refused here, in the route's shape.
    let req = raw_request("POST", b"/v1/chat/%zzompletions", &auth, b"{}");
    let resp = conn.exchange(&req, false).expect("an answer");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(error_in_shape("/v1/x", 400, &resp.text()).contains("percent-escape"));
    assert_eq!(
        client_requests(&mock),
        before,
        "a refused request reached Ollama"
    );

    // What passes is forwarded byte for byte and logged under its real route.
    let body = r#"{"Model":"qwen2.5:0.5b","messages":[],"stream":false}"#;
    let req = raw_request("POST", b"/api/%63hat?t=1", &auth, body.as_bytes());
    let resp = conn.exchange(&req, false).expect("an answer");
    assert_ne!(resp.status, 403, "{}", resp.text());
    // The sidecar's own reads (an /api/ps after the cold load this causes) may follow it.
    let seen = mock_requests(&mock);
    let last = seen
        .iter()
        .rev()
        .find(|r| r["method"] == "POST")
        .expect("the mock saw the request");
    let logged = last["path"].as_str().unwrap_or_default().to_string()
        + last["raw_path"].as_str().unwrap_or_default()
        + last["target"].as_str().unwrap_or_default()
        + last["uri"].as_str().unwrap_or_default();
    assert!(logged.contains("%63hat"), "not forwarded as sent: {last}");
    assert!(
        wait_until(Duration::from_secs(5), || {
            sc.log_text().lines().any(|l| {
                l.contains("/api/%63hat") && l.contains("route=\"/api/chat\"")
                    || l.contains("/api/%63hat") && l.contains("route=/api/chat")
            })
        }),
        "access log: {}",
        sc.log_text()
    );
}

/// Blob uploads keep working whether the client encodes the digest's colon or not (Go decodes
/// `%3A` before gin binds `:digest`), and stay management routes either way.
#[test]
fn blob_uploads_with_and_without_an_encoded_colon() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(&mock, "", "");
    let root = format!("Bearer {ADMIN}");
    let alice = format!("Bearer {ALICE}");
    let digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let mut conn = RawConn::new(sc.port);
    for target in [
        format!("/api/blobs/sha256:{digest}"),
        format!("/api/blobs/sha256%3A{digest}"),
        format!("/api/blobs/sha256%3a{digest}"),
    ] {
        let before = client_requests(&mock);
        let req = raw_request(
            "POST",
            target.as_bytes(),
            &[("Authorization", &alice)],
            b"hello",
        );
        let resp = conn.exchange(&req, false).expect("an answer");
        assert_eq!(resp.status, 403, "{target}: {}", resp.text());
        assert!(resp.text().contains("management routes"), "{}", resp.text());
        assert_eq!(client_requests(&mock), before, "{target} reached Ollama");

        let req = raw_request(
            "POST",
            target.as_bytes(),
            &[("Authorization", &root)],
            b"hello",
        );
        let resp = conn.exchange(&req, false).expect("an answer");
        assert_ne!(resp.status, 403, "{target}: {}", resp.text());
        assert_eq!(client_requests(&mock), before + 1, "{target} not forwarded");
        let req = raw_request("HEAD", target.as_bytes(), &[("Authorization", &root)], b"");
        let resp = conn.exchange(&req, true).expect("an answer");
        assert_ne!(resp.status, 403, "HEAD {target}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            sc.log_text()
                .lines()
                .filter(|l| l.contains("/api/blobs/:digest") && l.contains("sha256%3"))
                .count()
                >= 4
        }),
        "access log: {}",
        sc.log_text()
    );
}

/// The access line of the request with `request_id`, once it is written.
fn line_of(sc: &Sidecar, request_id: &str) -> Value {
    let lines = access_lines(sc, |ls| ls.iter().any(|l| l["request_id"] == request_id));
    lines
        .into_iter()
        .find(|l| l["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no access line for {request_id}; log:\n{}", sc.log_text()))
}

/// (authorization, method, path, body, status, label, words of the message)
type RefusalCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<String>,
    u16,
    &'a str,
    &'a str,
);

#[test]
fn refusals_say_their_cause_in_the_metric_and_the_log() {
    let mock = Mock::start(&[]);
    let sc = start_with_keys(
        &mock,
        "      requests_per_minute: 2\n",
        "log:\n  format: json\n",
    );
    let alice = format!("Bearer {ALICE}");
    let bob = format!("Bearer {BOB}");
    let cases: Vec<RefusalCase> = vec![
        (
            "",
            "GET",
            "/api/tags",
            None,
            401,
            "unauthorized",
            "API key is required",
        ),
        (
            bob.as_str(),
            "POST",
            "/api/pull",
            Some(json!({"model": "llama3.2"}).to_string()),
            403,
            "forbidden_route",
            "may not use management routes",
        ),
        (
            bob.as_str(),
            "POST",
            "/api/chat",
            Some(chat_body("qwen3")),
            403,
            "forbidden_model",
            "not allowed for key `bob` (auth.keys[].models)",
        ),
        (alice.as_str(), "GET", "/api/tags", None, 200, "", ""),
        (alice.as_str(), "GET", "/api/tags", None, 200, "", ""),
        (
            alice.as_str(),
            "GET",
            "/api/tags",
            None,
            429,
            "rate_limited_requests",
            "(requests_per_minute)",
        ),
    ];
    for (i, (auth, method, path, body, status, label, words)) in cases.into_iter().enumerate() {
        let id = format!("refusal-{i}");
        let mut headers = vec![("x-request-id", id.as_str())];
        if !auth.is_empty() {
            headers.push(("authorization", auth));
        }
        let (got, _, text) = send(method, &sc.url(path), &headers, body);
        assert_eq!(got, status, "{path}: {text}");
        let line = line_of(&sc, &id);
        if label.is_empty() {
            assert!(line.get("rejection").is_none(), "{line}");
            assert!(line.get("error").is_none(), "{line}");
            continue;
        }
        let message = error_in_shape(path, status, &text);
        assert!(message.contains(words), "{message}");
        // `policy.models` is empty: the refusal names only the list that refused.
        assert!(!message.contains("policy.models"), "{message}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["outcome"], "refused", "{line}");
        assert_eq!(line["rejection"], label, "{line}");
        assert_eq!(line["error"], label, "{line}");
        // Absent values are left out, never written as "-".
        assert!(line.get("instance").is_none(), "{line}");
        assert!(!line.to_string().contains("\"-\""), "{line}");
        let series = format!("ollama_sidecar_rejections_total{{reason=\"{label}\"}}");
        assert_eq!(metric_value(sc.admin_port, &series), 1.0, "{series}");
    }
}

#[test]
fn sidecar_errors_carry_cors_headers() {
    let origin = "https://app.example";
    let slow = Mock::start(&[("MOCK_TOKENS", "20"), ("MOCK_TOKEN_DELAY_MS", "200")]);
    let sc = Sidecar::start(&format!(
        "cors:\n  origins: [\"{origin}\"]\nlimits:\n  max_body: 1KiB\nadmission:\n  max_wait: 1s\nlog:\n  format: json\n{}",
        external_instances(&[&slow], 1)
    ));
    let hang = Mock::start(&[("MOCK_HANG", "true")]);
    let hung = Sidecar::start(&format!(
        "cors:\n  origins: [\"{origin}\"]\ntimeouts:\n  response_header: 1s\nretries:\n  max_attempts: 1\n{}",
        external_instances(&[&hang], 1)
    ));
    let dead_port = free_port();
    let dead = Sidecar::start(&format!(
        "cors:\n  origins: [\"{origin}\"]\ninstances:\n  - name: gone\n    url: http://127.0.0.1:{dead_port}\n"
    ));
    let with_origin = [("origin", origin)];
    let has_cors = |h: &reqwest::header::HeaderMap| {
        h.get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            == Some(origin)
            && h.get("access-control-expose-headers")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("Retry-After"))
    };
    // One slow stream holds the only slot.
    let url = sc.url("/api/chat");
    let holder = std::thread::spawn(move || {
        let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
        client()
            .post(url)
            .body(body.to_string())
            .send()
            .map(|r| r.text().unwrap_or_default())
    });
    std::thread::sleep(Duration::from_millis(300));
    let cases: Vec<(&Sidecar, &str, &str, Option<String>, u16)> = vec![
        (&sc, "POST", "/api/chat", Some("{not json".to_string()), 400),
        (
            &sc,
            "POST",
            "/v1/chat/completions",
            Some("x".repeat(2048)),
            413,
        ),
        (&sc, "POST", "/api/chat", Some(chat_body("llama3.2")), 503),
        (&hung, "POST", "/api/chat", Some(chat_body("llama3.2")), 504),
        (&dead, "GET", "/api/tags", None, 503),
    ];
    for (sidecar, method, path, body, status) in cases {
        let (got, h, text) = send(method, &sidecar.url(path), &with_origin, body);
        assert_eq!(got, status, "{path}: {text}");
        error_in_shape(path, status, &text);
        assert!(has_cors(&h), "{status} on {path} without CORS: {h:?}");
    }
    // Shutting down: new requests get 503 with CORS while the stream drains.
    sc.proc.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let (got, h, text) = send("GET", &sc.url("/api/tags"), &with_origin, None);
    assert_eq!(got, 503, "{text}");
    assert!(error_in_shape("/api/tags", 503, &text).contains("shutting down"));
    assert!(has_cors(&h), "draining 503 without CORS: {h:?}");
    assert!(h.get("retry-after").is_some());
    let streamed = holder.join().expect("holder thread").expect("stream");
    assert!(streamed.contains("\"done\":true"), "{streamed}");
}

#[test]
fn the_token_budget_has_its_own_label() {
    let mock = Mock::start(&[("MOCK_TOKENS", "20")]);
    let sc = start_with_keys(
        &mock,
        "      tokens_per_minute: 10\n",
        "log:\n  format: json\n",
    );
    let alice = format!("Bearer {ALICE}");
    // Alice's first answer uses 20 tokens of her 10: the next is refused for tokens.
    let (status, _, text) = post_chat(&sc, &[("authorization", alice.as_str())], "llama3.2");
    assert_eq!(status, 200, "{text}");
    let tokens_refused = wait_until(Duration::from_secs(5), || {
        let (status, _, _) = send(
            "GET",
            &sc.url("/api/tags"),
            &[
                ("authorization", alice.as_str()),
                ("x-request-id", "over-tokens"),
            ],
            None,
        );
        status == 429
    });
    assert!(tokens_refused, "tokens were not charged");
    let line = line_of(&sc, "over-tokens");
    assert_eq!(line["rejection"], "rate_limited_tokens", "{line}");
    assert_eq!(
        metric_value(
            sc.admin_port,
            "ollama_sidecar_rejections_total{reason=\"rate_limited_tokens\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            sc.admin_port,
            "ollama_sidecar_rejections_total{reason=\"rate_limited_requests\"}"
        ),
        0.0
    );
}

#[test]
fn the_per_address_limit_has_its_own_label() {
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&format!(
        "policy:\n  requests_per_minute_per_client: 1\nlog:\n  format: json\n{}",
        external_instances(&[&mock], 1)
    ));
    let (status, _, _) = send("GET", &sc.url("/api/tags"), &[], None);
    assert_eq!(status, 200);
    let (status, h, text) = send(
        "GET",
        &sc.url("/api/tags"),
        &[("x-request-id", "over-address")],
        None,
    );
    assert_eq!(status, 429, "{text}");
    assert!(h.get("retry-after").is_some());
    assert!(error_in_shape("/api/tags", 429, &text).contains("client 127.0.0.1"));
    let line = line_of(&sc, "over-address");
    assert_eq!(line["rejection"], "rate_limited_client", "{line}");
    assert_eq!(line["error"], "rate_limited_client", "{line}");
    assert_eq!(
        metric_value(
            sc.admin_port,
            "ollama_sidecar_rejections_total{reason=\"rate_limited_client\"}"
        ),
        1.0
    );
}

#[test]
fn the_merged_model_list_carries_cors_headers() {
    // With two instances the sidecar answers /api/tags itself (the merged list): like every
    // answer of its own, it must let an allowed browser origin read it.
    let origin = "https://app.example";
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let sc = Sidecar::start(&format!(
        "cors:\n  origins: [\"{origin}\"]\n{}",
        external_instances(&[&a, &b], 1)
    ));
    assert!(
        wait_until(Duration::from_secs(10), || {
            client()
                .get(sc.url("/api/tags"))
                .send()
                .is_ok_and(|r| r.status() == 200)
        }),
        "no merged list; log:\n{}",
        sc.log_text()
    );
    let r = client()
        .get(sc.url("/api/tags"))
        .header("origin", origin)
        .send()
        .expect("tags");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(origin),
        "{:?}",
        r.headers()
    );
}
