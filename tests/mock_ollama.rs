//! Behaviour of the `mock-ollama` binary that the project's tests, demo and benchmarks rely on.
//! Every test spawns its own mock through the shared harness (tests/common), on a free 127.0.0.1
//! port it is seen to hold; a guard kills it on every path.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{free_port, listens_on, run_to_end, wait_until, MockCmd, Proc, MOCK};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// A mock from the shared harness (tests/common) with this file's async client.
struct Mock {
    mock: common::Mock,
    http: reqwest::Client,
}

/// The harness's mock: `port`, `url`, and its process (`child`, signals).
impl std::ops::Deref for Mock {
    type Target = common::Mock;
    fn deref(&self) -> &common::Mock {
        &self.mock
    }
}

impl std::ops::DerefMut for Mock {
    fn deref_mut(&mut self) -> &mut common::Mock {
        &mut self.mock
    }
}

/// This file's mocks: two worker threads, stderr kept for the tests that read it.
fn mock_cmd(envs: &[(&str, &str)], args: &[&str]) -> MockCmd {
    MockCmd::new()
        .env("MOCK_THREADS", "2")
        .envs(envs)
        .args(args)
        .capture_stderr()
}

fn command(port: u16, envs: &[(&str, &str)], args: &[&str]) -> Command {
    mock_cmd(envs, args).command(port)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn spawn_with(envs: &[(&str, &str)], args: &[&str]) -> Mock {
    Mock {
        mock: mock_cmd(envs, args).start(),
        http: client(),
    }
}

fn spawn(envs: &[(&str, &str)]) -> Mock {
    spawn_with(envs, &[])
}

impl Mock {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn stats(&self) -> Value {
        self.get("/mock/stats").await.json().await.unwrap()
    }

    async fn faults(&self, body: Value) -> Value {
        let r = self.post("/mock/faults", body).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Poll the stats until `pred` holds (bounded).
    async fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats().await;
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait (bounded) for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.mock
            .proc
            .wait_exit(limit)
            .expect("mock-ollama did not exit")
    }
}

/// Send raw bytes, return the whole response (the mock closes after `Connection: close`).
fn raw(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn ndjson(text: &str) -> Vec<Value> {
    assert!(
        text.ends_with('\n'),
        "NDJSON must end with a newline: {text:?}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn sse(text: &str) -> Vec<String> {
    assert!(text.ends_with("\n\n"), "SSE must end with a blank line");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without data: {e:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn metadata_routes_have_ollama_shapes() {
    let m = spawn(&[]);
    let r = m.get("/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "Ollama is running");
    let r = m.http.head(m.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");

    let r = m.get("/api/version").await;
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(r.text().await.unwrap(), r#"{"version":"0.33.0"}"#);
    let r = m.http.head(m.url("/api/version")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(m.get("/api/status").await.status(), 200);

    let tags: Value = m.get("/api/tags").await.json().await.unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"]
    );
    let first = &tags["models"][0];
    for k in ["model", "modified_at", "size", "digest", "details"] {
        assert!(first.get(k).is_some(), "tags entry lacks {k}: {first}");
    }
    assert_eq!(first["details"]["format"], "gguf");
    assert_eq!(first["digest"].as_str().unwrap().len(), 64);
    assert_eq!(
        m.http
            .head(m.url("/api/tags"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // show: model or legacy name, 404 otherwise
    let show: Value = m
        .post("/api/show", json!({"model": "llama3.2"}))
        .await
        .json()
        .await
        .unwrap();
    for k in [
        "modelfile",
        "parameters",
        "template",
        "details",
        "model_info",
        "capabilities",
    ] {
        assert!(show.get(k).is_some(), "show lacks {k}");
    }
    assert_eq!(show["capabilities"], json!(["completion", "tools"]));
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    let show: Value = m
        .post("/api/show", json!({"name": "nomic-embed-text"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show["capabilities"], json!(["embedding"]));
    let r = m.post("/api/show", json!({"model": "nope"})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"model 'nope' not found"}"#
    );

    // ps starts empty
    let ps: Value = m.get("/api/ps").await.json().await.unwrap();
    assert_eq!(ps, json!({"models": []}));
}

#[tokio::test]
async fn routing_errors_follow_gin() {
    let m = spawn(&[]);
    let r = m.get("/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "404 page not found");

    let r = m.get("/api/chat").await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = m.http.post(m.url("/api/tags")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // gin lists the other method trees in creation order; Ollama's first registration
    // is r.HEAD("/"), so HEAD comes before GET (gin.go handleHTTPRequest).
    assert_eq!(r.headers()["allow"], "HEAD, GET");
    let r = m.http.get(m.url("/api/delete")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "DELETE");

    // A trailing slash redirects, never silently normalised.
    let raw_resp = raw(
        m.port,
        "GET /api/tags/?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(raw_resp.starts_with("HTTP/1.1 301"), "{raw_resp}");
    assert!(raw_resp
        .to_ascii_lowercase()
        .contains("location: /api/tags?x=1"));
}

#[tokio::test]
async fn host_check_and_cors_like_ollama() {
    let m = spawn(&[]);
    let req = |host: &str| {
        raw(
            m.port,
            &format!("GET /api/version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
    };
    let forbidden = req("evil.example.com");
    assert!(forbidden.starts_with("HTTP/1.1 403"), "{forbidden}");
    assert!(forbidden.to_ascii_lowercase().contains("content-length: 0"));
    assert!(req("evil.example.com:11434").starts_with("HTTP/1.1 403"));
    assert!(req("8.8.8.8:80").starts_with("HTTP/1.1 403"));
    for ok in [
        "localhost",
        &format!("localhost:{}", m.port),
        &format!("127.0.0.1:{}", m.port),
        "127.0.0.2",
        "[::1]:80",
        "10.1.2.3:11434",
        "172.20.0.1",
        "192.168.1.10:8080",
        "ollama.internal:11434",
        "box.local",
        "app.localhost",
    ] {
        let r = req(ok);
        assert!(r.starts_with("HTTP/1.1 200"), "Host {ok}: {r}");
    }
    // /mock/* is never host-checked.
    let r = raw(
        m.port,
        "GET /mock/stats HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // CORS: a foreign origin is refused, a local one is echoed, preflight answers 204.
    let r = m
        .http
        .get(m.url("/api/tags"))
        .header("Origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = m
        .http
        .get(m.url("/api/tags"))
        .header("Origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let r = m
        .http
        .request(reqwest::Method::OPTIONS, m.url("/api/chat"))
        .header("Origin", "http://127.0.0.1:8080")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
}

#[tokio::test]
async fn native_streams_are_ndjson() {
    let m = spawn(&[("MOCK_TOKENS", "5")]);
    let r = m
        .post(
            "/api/chat",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    assert!(r.headers().get("content-length").is_none());
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines.len(), 6);
    for l in &lines[..5] {
        assert_eq!(l["done"], false);
        assert_eq!(l["model"], "llama3.2");
        assert_eq!(l["message"]["role"], "assistant");
        assert!(l["created_at"].as_str().unwrap().ends_with('Z'));
    }
    let last = &lines[5];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["message"]["content"], "");
    assert_eq!(last["eval_count"], 5);
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(last[k].as_u64().unwrap() > 0, "{k} missing in {last}");
    }
    assert!(last.get("context").is_none());

    let r = m
        .post(
            "/api/generate",
            json!({"model": "llama3.2", "prompt": "hi"}),
        )
        .await;
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines.len(), 6);
    assert!(lines[0]["response"].is_string());
    assert!(lines[5]["context"].as_array().unwrap().len() > 5);

    // stream:false answers one object with everything, Content-Length set.
    let r = m
        .post(
            "/api/generate",
            json!({"model": "llama3.2", "prompt": "hi", "stream": false}),
        )
        .await;
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    assert!(r.headers().get("content-length").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["done"], true);
    assert_eq!(v["response"], "Hello from the mock Ollama");
    assert_eq!(v["eval_count"], 5);
    let v: Value = m
        .post(
            "/api/chat",
            json!({"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "x"}], "stream": false, "options": {"num_predict": 2}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["message"]["content"], "Hello from");
    assert_eq!(v["done_reason"], "length");

    // errors
    let r = m.post("/api/chat", json!({"messages": []})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"model is required"}"#);
    let r = m
        .post("/api/generate", json!({"model": "ghost", "prompt": "x"}))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"model 'ghost' not found"}"#
    );
    let r = m
        .http
        .post(m.url("/api/chat"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("invalid character"));
    let r = m.http.post(m.url("/api/chat")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"missing request body"}"#
    );
    let r = m
        .post(
            "/api/chat",
            json!({"model": "nomic-embed-text", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn load_unload_and_keep_alive() {
    let m = spawn(&[("OLLAMA_KEEP_ALIVE", "10m")]);
    let v: Value = m
        .post("/api/generate", json!({"model": "llama3.2"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["done_reason"], "load");
    assert_eq!(v["done"], true);
    let ps: Value = m.get("/api/ps").await.json().await.unwrap();
    let entry = &ps["models"][0];
    assert_eq!(entry["name"], "llama3.2:latest");
    for k in [
        "expires_at",
        "size_vram",
        "context_length",
        "digest",
        "details",
        "size",
    ] {
        assert!(entry.get(k).is_some(), "ps lacks {k}: {entry}");
    }
    let stats = m.stats().await;
    assert_eq!(stats["loaded"], json!(["llama3.2:latest"]));

    // keep_alive -1: loaded "forever" (Go: now + MaxInt64 ns, ~292 years).
    let v: Value = m
        .post(
            "/api/chat",
            json!({"model": "qwen2.5:0.5b", "messages": [], "keep_alive": -1}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["done_reason"], "load");
    let ps: Value = m.get("/api/ps").await.json().await.unwrap();
    assert_eq!(ps["models"][0]["name"], "qwen2.5:0.5b");
    assert!(ps["models"][0]["expires_at"].as_str().unwrap() > "2200");

    // keep_alive 0 with an empty prompt unloads.
    let v: Value = m
        .post(
            "/api/generate",
            json!({"model": "llama3.2", "keep_alive": 0}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["done_reason"], "unload");
    let v: Value = m
        .post(
            "/api/chat",
            json!({"model": "qwen2.5:0.5b", "messages": [], "keep_alive": "0s"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["done_reason"], "unload");
    let ps: Value = m.get("/api/ps").await.json().await.unwrap();
    assert_eq!(ps["models"], json!([]));

    let r = m
        .post(
            "/api/generate",
            json!({"model": "llama3.2", "keep_alive": "5"}),
        )
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn openai_routes_use_sse_and_openai_shapes() {
    let m = spawn(&[("MOCK_TOKENS", "3")]);
    let r = m
        .post(
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse(&r.text().await.unwrap());
    assert_eq!(events.len(), 3 + 1 + 1 + 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "Hello");
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);

    let v: Value = m
        .post(
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from the");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 3
    );

    let v: Value = m
        .post(
            "/v1/completions",
            json!({"model": "llama3.2", "prompt": "x"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Hello from the");
    let events = sse(&m
        .post(
            "/v1/completions",
            json!({"model": "llama3.2", "prompt": "x", "stream": true}),
        )
        .await
        .text()
        .await
        .unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");

    let v: Value = m.get("/v1/models").await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "llama3.2:latest");
    assert_eq!(v["data"][0]["owned_by"], "library");
    let v: Value = m.get("/v1/models/qwen2.5:0.5b").await.json().await.unwrap();
    assert_eq!(v["id"], "qwen2.5:0.5b");
    let r = m.get("/v1/models/ghost").await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["message"], "model 'ghost' not found");
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());

    let r = m
        .post(
            "/v1/chat/completions",
            json!({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 404);

    let v: Value = m
        .post(
            "/v1/embeddings",
            json!({"model": "nomic-embed-text", "input": ["a", "b"]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 768);
}

#[tokio::test]
async fn anthropic_messages() {
    let m = spawn(&[("MOCK_TOKENS", "2")]);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let v: Value = m
        .post(
            "/v1/messages",
            json!({"model": "llama3.2", "max_tokens": 64, "messages": msgs}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "Hello from");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["output_tokens"], 2);
    let r = m
        .post(
            "/v1/messages",
            json!({"model": "llama3.2", "max_tokens": 64, "messages": msgs, "stream": true}),
        )
        .await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.lines().next().unwrap().trim_start_matches("event: "))
        .collect();
    assert_eq!(
        events,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    // AnthropicMessagesMiddleware refuses these after binding, before any handler work.
    for (body, msg) in [
        (
            json!({"max_tokens": 64, "messages": msgs}),
            "model is required",
        ),
        (
            json!({"model": "llama3.2", "messages": msgs}),
            "max_tokens is required and must be positive",
        ),
        (
            json!({"model": "llama3.2", "max_tokens": 64, "messages": []}),
            "messages is required",
        ),
    ] {
        let r = m.post("/v1/messages", body).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], msg);
    }
    m.faults(json!({"fail_next": 1, "status": 503})).await;
    let r = m
        .post(
            "/v1/messages",
            json!({"model": "llama3.2", "max_tokens": 64, "messages": msgs}),
        )
        .await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert_eq!(v["error"]["message"], BUSY);
}

#[tokio::test]
async fn embeddings_native() {
    let m = spawn(&[]);
    let v: Value = m
        .post(
            "/api/embed",
            json!({"model": "nomic-embed-text", "input": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["model"], "nomic-embed-text");
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 1);
    for k in ["total_duration", "load_duration", "prompt_eval_count"] {
        assert!(v.get(k).is_some());
    }
    let v2: Value = m
        .post(
            "/api/embed",
            json!({"model": "nomic-embed-text", "input": ["hello", "world"]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v2["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(v2["embeddings"][0], v["embeddings"][0], "deterministic");
    let v: Value = m
        .post(
            "/api/embeddings",
            json!({"model": "nomic-embed-text", "prompt": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["embedding"].as_array().unwrap().len(), 768);
    let r = m
        .post("/api/embed", json!({"model": "ghost", "input": "x"}))
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn model_management() {
    let m = spawn(&[]);
    // pull streams progress and installs the model
    let r = m.post("/api/pull", json!({"model": "tinyllama"})).await;
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines[0]["status"], "pulling manifest");
    assert!(lines
        .iter()
        .any(|l| l["status"].as_str().unwrap().starts_with("pulling ") && l["digest"].is_string()));
    assert_eq!(lines.last().unwrap()["status"], "success");
    let tags: Value = m.get("/api/tags").await.json().await.unwrap();
    assert_eq!(tags["models"][0]["name"], "tinyllama:latest");
    let v: Value = m
        .post("/api/pull", json!({"name": "phi3:mini", "stream": false}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"status": "success"}));
    let lines = ndjson(
        &m.post("/api/pull", json!({"model": "missing-model"}))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert!(lines.last().unwrap()["error"].is_string());

    // copy, delete the copy, delete again -> 404
    let r = m
        .post(
            "/api/copy",
            json!({"source": "llama3.2", "destination": "mine:v1"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    assert_eq!(
        m.post("/api/show", json!({"model": "mine:v1"}))
            .await
            .status(),
        200
    );
    let r = m
        .http
        .delete(m.url("/api/delete"))
        .json(&json!({"model": "mine:v1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    let r = m
        .http
        .delete(m.url("/api/delete"))
        .json(&json!({"name": "mine:v1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"model 'mine:v1' not found"}"#
    );
    let r = m
        .post("/api/copy", json!({"source": "ghost", "destination": "x"}))
        .await;
    assert_eq!(r.status(), 404);

    // create FROM an existing model, then push it
    let lines = ndjson(
        &m.post(
            "/api/create",
            json!({"model": "me/custom", "from": "llama3.2", "system": "be brief"}),
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    assert_eq!(lines.last().unwrap()["status"], "success");
    let show: Value = m
        .post("/api/show", json!({"model": "me/custom"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show["details"]["family"], "llama");
    let lines = ndjson(
        &m.post("/api/push", json!({"model": "me/custom"}))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(lines.last().unwrap()["status"], "success");
}

#[tokio::test]
async fn blobs_are_hashed_while_streaming() {
    let m = spawn(&[]);
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{:x}", Sha256::digest(&data));
    let path = format!("/api/blobs/{digest}");
    assert_eq!(
        m.http.head(m.url(&path)).send().await.unwrap().status(),
        404
    );

    // chunked upload
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = m.http.post(m.url(&path)).body(body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        m.http.head(m.url(&path)).send().await.unwrap().status(),
        200
    );

    // mismatch
    let other = format!("/api/blobs/sha256:{}", "ab".repeat(32));
    let r = m
        .http
        .post(m.url(&other))
        .body(b"hello".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let want = format!(
        "digest mismatch, expected \"sha256:{}\", got \"sha256:{:x}\"",
        "ab".repeat(32),
        Sha256::digest(b"hello")
    );
    assert_eq!(v["error"], want);
    let r = m
        .http
        .post(m.url("/api/blobs/sha256:xyz"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Expect: 100-continue is honoured.
    let body = b"expect me";
    let d = format!("{:x}", Sha256::digest(body));
    let mut s = TcpStream::connect(("127.0.0.1", m.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /api/blobs/sha256:{d} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    s.write_all(body).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("HTTP/1.1 201") || interim.contains("HTTP/1.1 201"),
        "{interim}{rest}"
    );
    let log: Value = m.get("/mock/requests").await.json().await.unwrap();
    let e = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == path.as_str() && e["method"] == "POST")
        .unwrap();
    assert_eq!(e["body_len"], data.len());
    assert_eq!(
        format!("sha256:{}", e["body_sha256"].as_str().unwrap()),
        digest
    );
}

#[tokio::test]
async fn request_log_and_reset() {
    let m = spawn(&[]);
    let body = json!({"model": "llama3.2", "prompt": "hi", "stream": false}).to_string();
    let r = m
        .http
        .post(m.url("/api/generate?trace=1&x=%20y"))
        .header("Authorization", "Bearer secret")
        .header("X-Custom", "a")
        .header("User-Agent", "ollama-python/0.6.0")
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = m.get("/mock/stats").await; // never logged
    let log: Value = m.get("/mock/requests").await.json().await.unwrap();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 1);
    let e = &log[0];
    assert_eq!(e["method"], "POST");
    assert_eq!(e["path"], "/api/generate");
    assert_eq!(e["query"], "trace=1&x=%20y");
    assert_eq!(e["model"], "llama3.2");
    assert_eq!(e["body_len"], body.len());
    assert_eq!(
        e["body_sha256"],
        format!("{:x}", Sha256::digest(body.as_bytes()))
    );
    let headers = e["headers"].as_array().unwrap();
    let has = |k: &str, v: &str| headers.iter().any(|h| h[0] == k && h[1] == v);
    assert!(has("authorization", "Bearer secret"), "{headers:?}");
    assert!(has("x-custom", "a"));
    assert!(has("user-agent", "ollama-python/0.6.0"));
    assert!(has("host", &format!("127.0.0.1:{}", m.port)));

    let s = m.stats().await;
    assert_eq!(s["requests"]["/api/generate"], 1);
    assert_eq!(s["requests_by_method_path"]["POST /api/generate"], 1);
    assert!(s["requests"].get("/mock/stats").is_none());
    assert_eq!(s["pid"], m.child.id());

    // capacity 64
    for _ in 0..70 {
        m.get("/api/version").await;
    }
    let log: Value = m.get("/mock/requests").await.json().await.unwrap();
    assert_eq!(log.as_array().unwrap().len(), 64);

    assert_eq!(
        m.http
            .post(m.url("/mock/reset"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let log: Value = m.get("/mock/requests").await.json().await.unwrap();
    assert_eq!(log, json!([]));
    let s = m.stats().await;
    assert_eq!(s["requests"], json!({}));
    assert_eq!(s["peak_inference_in_flight"], 0);
}

/// Run `n` concurrent streaming chats and return the peak concurrency the mock saw.
async fn peak_with(num_parallel: &str, n: usize) -> (u64, Value) {
    let m = spawn(&[
        ("OLLAMA_NUM_PARALLEL", num_parallel),
        ("MOCK_TOKENS", "4"),
        ("MOCK_TOKEN_DELAY_MS", "15"),
    ]);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let http = m.http.clone();
        let url = m.url("/api/chat");
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            ndjson(&r.text().await.unwrap()).len()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 5);
    }
    let s = m.stats().await;
    (s["peak_inference_in_flight"].as_u64().unwrap(), s)
}

#[tokio::test]
async fn num_parallel_bounds_concurrency_per_model() {
    let (peak1, s1) = peak_with("1", 4).await;
    assert_eq!(peak1, 1, "{s1}");
    assert_eq!(s1["peak_by_model"]["llama3.2:latest"], 1);
    assert!(s1["peak_queued"].as_u64().unwrap() >= 1);
    assert_eq!(s1["completed_streams"], 4);
    let (peak2, s2) = peak_with("2", 4).await;
    assert_eq!(peak2, 2, "{s2}");
}

#[tokio::test]
async fn server_busy_beyond_max_queue() {
    let m = spawn(&[
        ("OLLAMA_NUM_PARALLEL", "1"),
        ("OLLAMA_MAX_QUEUE", "1"),
        ("MOCK_FIRST_TOKEN_DELAY_MS", "1000"),
    ]);
    let body = json!({"model": "llama3.2", "prompt": "x", "stream": false});
    let a = tokio::spawn(m.http.post(m.url("/api/generate")).json(&body).send());
    m.wait_stats("one in flight", |s| s["inference_in_flight"] == 1)
        .await;
    let b = tokio::spawn(m.http.post(m.url("/api/generate")).json(&body).send());
    m.wait_stats("one queued", |s| s["queued"] == 1).await;
    let r = m.post("/api/generate", body.clone()).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], BUSY);
    let r = m
        .post(
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["message"], BUSY);
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    assert_eq!(m.stats().await["queue_rejections"], 2);
}

#[tokio::test]
async fn injected_failures() {
    let m = spawn_with(&[], &["--fail-first", "1:500"]);
    let chat = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": false});
    let r = m.post("/api/chat", chat.clone()).await;
    assert_eq!(r.status(), 500);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(m.post("/api/chat", chat.clone()).await.status(), 200);
    // metadata routes are never failed
    let k = m.faults(json!({"fail_next": 2, "status": 503})).await;
    assert_eq!(k["fail_next"], 2);
    assert_eq!(m.get("/api/tags").await.status(), 200);
    let r = m.post("/api/chat", chat.clone()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), format!("{{\"error\":\"{BUSY}\"}}"));
    let r = m
        .post(
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "api_error"
    );
    assert_eq!(m.post("/api/chat", chat).await.status(), 200);
    assert_eq!(m.stats().await["injected_failures"], 3);
    let r = m.post("/mock/faults", json!({"bogus": 1})).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn close_after_chunks_and_in_band_errors() {
    let m = spawn_with(&[("MOCK_TOKENS", "6")], &["--close-after-chunks", "3"]);
    let chat = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]});
    let mut r = m.post("/api/chat", chat.clone()).await;
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    let mut failed = false;
    loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the stream must end abnormally");
    let text = String::from_utf8(got).unwrap();
    let lines = ndjson(&text);
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["done"] == false));
    let s = m.stats().await;
    assert_eq!(s["aborted_streams"], 1);
    assert_eq!(s["disconnects"], 0);
    assert_eq!(s["inference_in_flight"], 0);

    // switch to an in-band error after 2 chunks: status 200, last line {"error":...}
    m.faults(json!({"close_after_chunks": null, "error_after_chunks": 2}))
        .await;
    let lines = ndjson(
        &m.post("/api/chat", chat.clone())
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(lines.len(), 3);
    assert!(lines[2]["error"].is_string());
    let r = m
        .post(
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": true}),
        )
        .await;
    let events = sse(&r.text().await.unwrap());
    assert!(events.last().unwrap().contains("\"error\""));
    // "clear" restores the start-up knobs (here --close-after-chunks 3).
    let k = m.faults(json!({"clear": true})).await;
    assert_eq!(k["close_after_chunks"], 3);
    assert!(k["error_after_chunks"].is_null());
    m.faults(json!({"close_after_chunks": null})).await;
    assert_eq!(
        ndjson(&m.post("/api/chat", chat).await.text().await.unwrap()).len(),
        7
    );
}

#[tokio::test]
async fn client_disconnect_stops_the_stream() {
    let m = spawn(&[("MOCK_TOKENS", "1000"), ("MOCK_TOKEN_DELAY_MS", "5")]);
    let mut r = m
        .post(
            "/api/chat",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.ends_with(b"\n"));
    assert_eq!(m.stats().await["inference_in_flight"], 1);
    drop(r);
    let s = m
        .wait_stats("the disconnect", |s| {
            s["disconnects"] == 1 && s["inference_in_flight"] == 0
        })
        .await;
    assert_eq!(s["completed_streams"], 0);
}

#[tokio::test]
async fn clients_leaving_while_queued_or_waiting_are_counted() {
    let m = spawn(&[
        ("OLLAMA_NUM_PARALLEL", "1"),
        ("MOCK_FIRST_TOKEN_DELAY_MS", "3000"),
    ]);
    let body = json!({"model": "llama3.2", "prompt": "x", "stream": false});
    let a = tokio::spawn(m.http.post(m.url("/api/generate")).json(&body).send());
    m.wait_stats("one in flight", |s| s["inference_in_flight"] == 1)
        .await;
    // B waits in the queue and gives up.
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    assert!(impatient
        .post(m.url("/api/generate"))
        .json(&body)
        .send()
        .await
        .is_err());
    let s = m
        .wait_stats("the queue cancel", |s| {
            s["queue_cancels"] == 1 && s["queued"] == 0
        })
        .await;
    assert_eq!(s["disconnects"], 0);
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    // C gets the slot, then leaves before its non-streamed answer is ready.
    assert!(impatient
        .post(m.url("/api/generate"))
        .json(&body)
        .send()
        .await
        .is_err());
    m.wait_stats("the disconnect", |s| {
        s["disconnects"] == 1 && s["inference_in_flight"] == 0
    })
    .await;
}

#[tokio::test]
async fn hang_never_answers() {
    let m = spawn(&[]);
    m.faults(json!({"hang": true})).await;
    let http = client();
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        http.post(m.url("/api/chat"))
            .json(&json!({"model": "llama3.2", "messages": []}))
            .send(),
    )
    .await;
    assert!(r.is_err(), "a hanging mock must not answer");
    assert_eq!(m.get("/api/version").await.status(), 200);
    m.wait_stats("hanging gauge back to 0", |s| s["hanging"] == 0)
        .await;
}

#[tokio::test]
async fn crash_after_exits_with_code_2() {
    let mut m = spawn(&[("MOCK_CRASH_AFTER", "3")]);
    assert_eq!(m.get("/api/version").await.status(), 200);
    assert_eq!(m.get("/mock/stats").await.status(), 200); // not counted
    assert_eq!(m.get("/api/tags").await.status(), 200);
    assert!(m.http.get(m.url("/api/ps")).send().await.is_err());
    let st = m.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(2));
}

#[test]
fn process_lifecycle() {
    // SIGTERM: clean exit 0
    let mut m = spawn(&[]);
    assert!(m.stderr_line_contains("Listening on 127.0.0.1:"));
    unsafe {
        libc::kill(m.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(m.wait_exit(Duration::from_secs(5)).code(), Some(0));

    // port taken: exits non-zero with a one-line error
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let out = run_to_end(command(port, &[], &[]));
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("address already in use"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    drop(holder);

    // --exit-after-ms exits 1
    let mut m = spawn_with(&[("MOCK_EXIT_AFTER_MS", "200")], &[]);
    assert_eq!(m.wait_exit(Duration::from_secs(5)).code(), Some(1));

    // start delay: not listening at first, then serving
    let port = free_port();
    let delayed = Proc {
        child: command(port, &[("MOCK_START_DELAY_MS", "400")], &[])
            .spawn()
            .unwrap(),
    };
    std::thread::sleep(Duration::from_millis(100));
    let early = listens_on(delayed.pid(), port);
    let later = wait_until(Duration::from_secs(5), || listens_on(delayed.pid(), port));
    drop(delayed);
    assert!(!early, "must not listen during the start delay");
    assert!(later);

    // --help documents the knobs
    let mut help = Command::new(MOCK);
    help.arg("--help");
    let out = run_to_end(help);
    let help = String::from_utf8_lossy(&out.stdout);
    for k in [
        "MOCK_MODELS",
        "MOCK_TOKENS",
        "MOCK_TOKEN_DELAY_MS",
        "MOCK_LOAD_DELAY_MS",
        "MOCK_FIRST_TOKEN_DELAY_MS",
        "MOCK_FAIL_FIRST",
        "MOCK_CLOSE_AFTER_CHUNKS",
        "MOCK_CRASH_AFTER",
        "MOCK_HANG",
        "MOCK_EXIT_AFTER_MS",
        "MOCK_START_DELAY_MS",
        "/mock/faults",
    ] {
        assert!(help.contains(k), "--help lacks {k}");
    }
}

impl Mock {
    /// Read stderr lines (bounded by the read timeout of a helper thread) until one matches.
    fn stderr_line_contains(&mut self, needle: &str) -> bool {
        use std::io::BufRead;
        let Some(err) = self.child.stderr.take() else {
            return false;
        };
        let needle = needle.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(err);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains(&needle) {
                    let _ = tx.send(true);
                    return;
                }
                line.clear();
            }
            let _ = tx.send(false);
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
    }
}

#[tokio::test]
async fn load_delay_and_models_knob() {
    let m = spawn_with(
        &[("MOCK_MODELS", "a-model,b-model:7b")],
        &["--load-delay-ms", "150"],
    );
    let tags: Value = m.get("/api/tags").await.json().await.unwrap();
    assert_eq!(tags["models"][0]["name"], "a-model:latest");
    assert_eq!(tags["models"][1]["name"], "b-model:7b");
    let t = Instant::now();
    let v: Value = m
        .post(
            "/api/generate",
            json!({"model": "a-model", "prompt": "x", "stream": false}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert!(v["load_duration"].as_u64().unwrap() >= 150_000_000);
    let t = Instant::now();
    let v: Value = m
        .post(
            "/api/generate",
            json!({"model": "a-model", "prompt": "x", "stream": false}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(150), "already loaded");
    assert!(v["load_duration"].as_u64().unwrap() < 150_000_000);
}

// ---- Parsing like Ollama (issue 14): Go's net/http, gin v1.10 and encoding/json ----

/// A raw HTTP/1.1 request with a JSON body; the target is sent exactly as given.
fn raw_json(port: u16, method: &str, target: &str, body: &str) -> String {
    raw(
        port,
        &format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The body of a raw HTTP/1.1 response (the mock answers with Content-Length).
fn raw_body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn raw_header(resp: &str, name: &str) -> Option<String> {
    let head = resp.split_once("\r\n\r\n").map_or(resp, |(h, _)| h);
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// The log's entries; asserts that exactly `n` requests were logged since the last reset.
async fn log_entries(m: &Mock, n: usize) -> Vec<Value> {
    let log: Value = m.get("/mock/requests").await.json().await.unwrap();
    let log = log.as_array().unwrap().clone();
    assert_eq!(log.len(), n, "{log:#?}");
    log
}

async fn reset(m: &Mock) {
    let r = m.http.post(m.url("/mock/reset")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn percent_encoded_paths_route_like_go() {
    let m = spawn(&[]);
    let pull = r#"{"model":"llama3.2","stream":false}"#;
    // Go decodes every %XX into URL.Path and gin routes on it: /api/%70ull is a pull.
    let r = raw_json(m.port, "POST", "/api/%70ull", pull);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(raw_body(&r), r#"{"status":"success"}"#);
    // %2F too: /api%2Fpull is /api/pull for gin.
    let r = raw_json(m.port, "POST", "/api%2Fpull", pull);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Absolute-form targets are routed on their path.
    let r = raw_json(m.port, "POST", "http://localhost/api/%70ull", pull);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let log = log_entries(&m, 3).await;
    for (e, raw_path) in log
        .iter()
        .zip(["/api/%70ull", "/api%2Fpull", "/api/%70ull"])
    {
        assert_eq!(e["path"], raw_path);
        assert_eq!(e["decoded_path"], "/api/pull");
        assert_eq!(e["route"], "/api/pull");
        assert_eq!(e["outcome"], "handled");
        assert_eq!(e["model"], "llama3.2");
    }
    assert_eq!(
        m.stats().await["requests_by_method_path"]["POST /api/pull"],
        3
    );

    // Route names are case-sensitive (RedirectFixedPath is off): 404, no handler.
    reset(&m).await;
    let r = raw_json(m.port, "POST", "/API/pull", pull);
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert_eq!(raw_body(&r), "404 page not found");
    // A bad escape never reaches a handler: net/http answers 400 and closes.
    let r = raw_json(m.port, "POST", "/api/%zzpull", pull);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(raw_body(&r), "400 Bad Request");
    assert_eq!(raw_header(&r, "connection").as_deref(), Some("close"));
    let log = log_entries(&m, 2).await;
    assert_eq!(log[0]["outcome"], "not_found");
    assert_eq!(log[0]["route"], Value::Null);
    assert_eq!(log[0]["model"], Value::Null);
    assert_eq!(log[1]["outcome"], "bad_request");
    assert_eq!(log[1]["decoded_path"], Value::Null);
}

#[tokio::test]
async fn redirects_like_servemux_and_gin() {
    let m = spawn(&[]);
    // gin's trailing-slash redirect: 301 for GET, 307 for anything else, no body for POST.
    let r = raw_bare(m.port, "GET", "/api/tags/", Some("localhost"));
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    assert_eq!(raw_header(&r, "location").as_deref(), Some("/api/tags"));
    assert_eq!(
        raw_body(&r),
        "<a href=\"/api/tags\">Moved Permanently</a>.\n\n"
    );
    let r = raw_json(m.port, "POST", "/api/pull/?x=1", "{}");
    assert!(r.starts_with("HTTP/1.1 307"), "{r}");
    assert_eq!(raw_header(&r, "location").as_deref(), Some("/api/pull?x=1"));
    assert_eq!(raw_body(&r), "");
    let r = raw_bare(m.port, "HEAD", "/api/tags/", Some("localhost"));
    assert!(r.starts_with("HTTP/1.1 307"), "{r}");
    // A decoded %2F at the end is a trailing slash too.
    let r = raw_json(m.port, "POST", "/api/pull%2F", "{}");
    assert!(r.starts_with("HTTP/1.1 307"), "{r}");
    assert_eq!(raw_header(&r, "location").as_deref(), Some("/api/pull"));
    // DefaultServeMux sends every method to the cleaned path with a 301.
    let r = raw_json(m.port, "POST", "//api/pull", "{}");
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    assert_eq!(raw_header(&r, "location").as_deref(), Some("/api/pull"));
    let r = raw_json(m.port, "POST", "/api/./pull", "{}");
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    let r = raw_json(m.port, "POST", "/v1/../api/pull?a=b", "{}");
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    assert_eq!(raw_header(&r, "location").as_deref(), Some("/api/pull?a=b"));
    // An escaped dot-dot is not a path element for the mux; gin finds no route.
    let r = raw_json(m.port, "POST", "/v1/%2E%2E/api/pull", "{}");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let log = log_entries(&m, 8).await;
    for e in &log[..7] {
        assert_eq!(e["outcome"], "redirect", "{e}");
        assert_eq!(e["route"], Value::Null);
    }
    assert_eq!(log[7]["decoded_path"], "/v1/../api/pull");
    assert_eq!(log[7]["outcome"], "not_found");
}

#[tokio::test]
async fn method_not_allowed_lists_gin_trees_in_order() {
    let m = spawn(&[]);
    for (method, path, allow) in [
        ("POST", "/", "HEAD, GET"),
        ("GET", "/api/blobs/sha256:00", "HEAD, POST"),
        ("PUT", "/api/pull", "POST"),
        ("GET", "/api/user/keys/abc", "DELETE"),
    ] {
        let r = raw(
            m.port,
            &format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        assert!(r.starts_with("HTTP/1.1 405"), "{method} {path}: {r}");
        assert_eq!(
            raw_header(&r, "allow").as_deref(),
            Some(allow),
            "{method} {path}"
        );
        assert_eq!(raw_body(&r), "405 method not allowed");
    }
    for e in log_entries(&m, 4).await {
        assert_eq!(e["outcome"], "method_not_allowed");
    }
}

#[tokio::test]
async fn bodies_bind_like_go_encoding_json() {
    let m = spawn(&[]);
    let gen = |body: &str| raw_json(m.port, "POST", "/api/generate", body);
    // Field names match case-insensitively: {"Model":...} names a model.
    let r = gen(r#"{"Model":"llama3.2","prompt":"hi","stream":false}"#);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let v: Value = serde_json::from_str(raw_body(&r)).unwrap();
    assert_eq!(v["model"], "llama3.2");
    // The last matching key wins.
    let r = raw_json(
        m.port,
        "POST",
        "/api/chat",
        r#"{"model":"qwen2.5:0.5b","MODEL":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
    );
    let v: Value = serde_json::from_str(raw_body(&r)).unwrap();
    assert_eq!(v["model"], "llama3.2", "{r}");
    // null into a string field changes nothing.
    let r = gen(r#"{"model":"llama3.2","MODEL":null,"prompt":"hi","stream":false}"#);
    let v: Value = serde_json::from_str(raw_body(&r)).unwrap();
    assert_eq!(v["model"], "llama3.2", "{r}");
    // U+017F (long s) folds to S: "ſtream" is "stream", so one JSON answer, not NDJSON.
    let r = gen("{\"model\":\"llama3.2\",\"prompt\":\"hi\",\"\u{17f}tream\":false}");
    assert!(r.contains("application/json"), "{r}");
    assert!(!r.contains("application/x-ndjson"), "{r}");
    // The Kelvin sign folds to K: "\u{212a}eep_alive":0 with no prompt unloads.
    let r = gen("{\"model\":\"llama3.2\",\"\u{212a}eep_alive\":0}");
    assert!(raw_body(&r).contains(r#""done_reason":"unload""#), "{r}");
    // U+0130 and U+0131 fold only to themselves: "keep_al\u{131}ve" is no field, so the
    // same request loads the model instead.
    for odd in ['\u{131}', '\u{130}'] {
        let r = gen(&format!("{{\"model\":\"llama3.2\",\"keep_al{odd}ve\":0}}"));
        assert!(
            raw_body(&r).contains(r#""done_reason":"load""#),
            "{odd}: {r}"
        );
    }
    // Only the first value is read; what follows it is ignored.
    let r = gen(r#"{"model":"llama3.2","prompt":"hi","stream":false} {"model":"qwen2.5:0.5b"}"#);
    let v: Value = serde_json::from_str(raw_body(&r)).unwrap();
    assert_eq!(v["model"], "llama3.2");
    let log = log_entries(&m, 8).await;
    let models: Vec<&str> = log.iter().map(|e| e["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["llama3.2"; 8]);
    assert!(log.iter().all(|e| e["outcome"] == "handled"));
    assert_eq!(log[1]["route"], "/api/chat");
}

#[tokio::test]
async fn bind_errors_answer_what_ollama_answers() {
    let m = spawn(&[]);
    for (path, body, status, want) in [
        (
            "/api/pull",
            r#"{"model":1}"#,
            400,
            r#"{"error":"json: cannot unmarshal number into Go struct field PullRequest.model of type string"}"#,
        ),
        ("/api/pull", "", 400, r#"{"error":"missing request body"}"#),
        (
            "/api/show",
            r#"{"model":"#,
            400,
            r#"{"error":"unexpected EOF"}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"llama3.2","keep_alive":"soon"}"#,
            400,
            r#"{"error":"time: invalid duration \"soon\""}"#,
        ),
        (
            "/api/chat",
            "{model}",
            400,
            r#"{"error":"invalid character 'm' looking for beginning of object key string"}"#,
        ),
    ] {
        let r = raw_json(m.port, "POST", path, body);
        assert!(
            r.starts_with(&format!("HTTP/1.1 {status}")),
            "{path} {body}: {r}"
        );
        assert_eq!(raw_body(&r), want, "{path} {body}");
    }
    let log = log_entries(&m, 5).await;
    assert!(log.iter().all(|e| e["outcome"] == "bind_error"), "{log:#?}");
    // The model the struct held when the error came is logged.
    assert_eq!(log[3]["model"], "llama3.2");
    assert_eq!(log[0]["model"], Value::Null);
}

#[tokio::test]
async fn copy_and_blobs_bind_their_names_like_ollama() {
    let m = spawn(&[]);
    let r = raw_json(
        m.port,
        "POST",
        "/api/copy",
        r#"{"SOURCE":"llama3.2","Destination":"mine:v1","destination":"mine:v2"}"#,
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let tags: Value = m.get("/api/tags").await.json().await.unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"mine:v2"), "{names:?}");
    assert!(!names.contains(&"mine:v1"), "{names:?}");

    // The digest param is decoded: sha256%3A... is sha256:...
    let data = b"blob bytes";
    let digest = format!("{:x}", Sha256::digest(data));
    let head = |target: String| raw_bare(m.port, "HEAD", &target, Some("localhost"));
    assert!(head(format!("/api/blobs/sha256%3A{digest}")).starts_with("HTTP/1.1 404"));
    let r = raw(
        m.port,
        &format!(
            "POST /api/blobs/sha256%3A{digest} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\nblob bytes",
            data.len()
        ),
    );
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");
    assert!(head(format!("/api/blobs/sha256:{digest}")).starts_with("HTTP/1.1 200"));
    // A %2F splits the param: no route.
    assert!(head(format!("/api/blobs/sha256%2F{digest}")).starts_with("HTTP/1.1 404"));

    let log = log_entries(&m, 6).await;
    assert_eq!(log[0]["model"], "llama3.2");
    assert_eq!(log[0]["destination"], "mine:v2");
    assert_eq!(log[0]["route"], "/api/copy");
    for e in &log[2..5] {
        assert_eq!(e["route"], "/api/blobs/:digest");
        assert_eq!(e["decoded_path"], format!("/api/blobs/sha256:{digest}"));
    }
    assert_eq!(log[5]["outcome"], "not_found");
}

/// A raw request without a body; `host` None sends no Host header.
fn raw_bare(port: u16, method: &str, target: &str, host: Option<&str>) -> String {
    let host = host.map_or(String::new(), |h| format!("Host: {h}\r\n"));
    raw(
        port,
        &format!("{method} {target} HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
    )
}

#[tokio::test]
async fn every_request_is_logged_once_whatever_its_outcome() {
    let m = spawn(&[]);
    // Ollama's Host check (a gin middleware) rejects before the handler: no route ran.
    let r = raw_bare(m.port, "POST", "/api/pull", Some("evil.example.com"));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // HTTP/1.1 without Host: net/http refuses it before routing.
    let r = raw_bare(m.port, "GET", "/api/tags", None);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(
        raw_body(&r),
        "400 Bad Request: missing required Host header"
    );
    // `OPTIONS *` is net/http's own empty 200; any other `*` is a 400.
    let r = raw_bare(m.port, "OPTIONS", "*", Some("localhost"));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw_bare(m.port, "GET", "*", Some("localhost"));
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let log = log_entries(&m, 4).await;
    let outcomes: Vec<&str> = log.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(
        outcomes,
        ["forbidden", "bad_request", "handled", "bad_request"]
    );
    assert!(log.iter().all(|e| e["route"].is_null()), "{log:#?}");
    assert_eq!(log[0]["decoded_path"], "/api/pull");
}
