//! The admin listener through the real binary: `/healthz`, `/readyz`, `/status`, unknown paths.
//! Every wait is bounded; every process started here is killed by a guard.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

fn admin(sc: &Sidecar, path: &str) -> (u16, String, String) {
    let resp = client()
        .get(format!("http://127.0.0.1:{}{path}", sc.admin_port))
        .send()
        .expect("admin request");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ctype, resp.text().expect("body"))
}

fn admin_json(sc: &Sidecar, path: &str) -> (u16, Value) {
    let (status, ctype, body) = admin(sc, path);
    assert_eq!(ctype, "application/json", "{path}: {body}");
    (status, serde_json::from_str(&body).expect("JSON body"))
}

/// One chat through the proxy, answered 200 and read to its end.
fn chat_once(sc: &Sidecar) {
    let chat = client()
        .post(sc.url("/api/chat"))
        .body(r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .expect("chat");
    assert_eq!(chat.status(), 200);
    let _ = chat.text();
}

fn wait_admin(sc: &Sidecar) {
    assert!(
        wait_until(Duration::from_secs(10), || port_open(sc.admin_port)),
        "admin port did not open; log:\n{}",
        sc.log_text()
    );
}

#[test]
fn healthz_readyz_status_and_unknown_paths() {
    let mock = Mock::start(&[]);
    let sc = Sidecar::start(&external_instances(&[&mock], 3));
    wait_admin(&sc);

    let (status, ctype, body) = admin(&sc, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    assert!(ctype.starts_with("text/plain"));

    let (status, ready) = admin_json(&sc, "/readyz");
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["instances"]["m0"], "healthy");

    // Some traffic, so the status has something to say.
    chat_once(&sc);

    let (status, s) = admin_json(&sc, "/status");
    assert_eq!(status, 200);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].as_f64().is_some_and(|u| u >= 0.0));
    assert_eq!(s["ready"], true);
    assert_eq!(s["draining"], false);
    let inst = &s["instances"][0];
    assert_eq!(inst["name"], "m0");
    assert_eq!(inst["url"], format!("http://127.0.0.1:{}", mock.port));
    assert_eq!(inst["kind"], "external");
    assert_eq!(inst["state"], "ready");
    assert_eq!(inst["health"], "healthy");
    assert!(inst["state_age_seconds"].as_f64().is_some());
    assert_eq!(inst["slots"], 3);
    assert_eq!(inst["busy_slots"], 0);
    assert_eq!(inst["in_flight"], 0);
    // The mock reports what it has loaded, with sizes, in /api/ps.
    let loaded = inst["loaded_models"].as_array().expect("loaded models");
    assert!(
        loaded
            .iter()
            .any(|m| m["name"] == "llama3.2:latest" && m["vram_bytes"].as_u64().is_some()),
        "{inst}"
    );
    // External instances have no process facts.
    assert!(inst.get("pid").is_none());
    let q = &s["queue"];
    for key in [
        "queued",
        "queued_bytes",
        "clients_queued",
        "oldest_wait_seconds",
        "counters",
    ] {
        assert!(q.get(key).is_some(), "queue.{key} in {q}");
    }
    assert_eq!(q["queued"], 0);
    assert_eq!(q["counters"]["admitted"], 1);
    assert_eq!(q["counters"]["released"], 1);

    let (status, body) = admin_json(&sc, "/nope");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("/nope")));

    let post = client()
        .post(format!("http://127.0.0.1:{}/status", sc.admin_port))
        .send()
        .expect("post");
    assert_eq!(post.status(), 405);
    assert_eq!(
        post.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );

    let head = client()
        .head(format!("http://127.0.0.1:{}/metrics", sc.admin_port))
        .send()
        .expect("head");
    assert_eq!(head.status(), 200);

    // The admin port is not the proxy: the proxy passes /healthz to Ollama (which has none).
    let proxied = client().get(sc.url("/healthz")).send().expect("proxy");
    assert_eq!(proxied.status(), 404);
}

#[test]
fn readyz_is_503_until_a_supervised_instance_is_ready() {
    let port = free_port();
    let mut sc = Sidecar::start(&format!(
        "shutdown:\n  drain_timeout: 1s\ninstances:\n  - name: gpu0\n    command: {MOCK}\n    port: {port}\n    stop_grace: 2s\n    env:\n      MOCK_START_DELAY_MS: \"2500\"\n"
    ));
    wait_admin(&sc);

    let (status, body) = admin_json(&sc, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("gpu0"), "{reason}");
    let (status, s) = admin_json(&sc, "/status");
    assert_eq!(status, 200);
    assert_eq!(s["ready"], false);
    assert_eq!(s["instances"][0]["kind"], "supervised");
    assert_ne!(s["instances"][0]["state"], "ready");
    // Liveness does not depend on the instances.
    assert_eq!(admin(&sc, "/healthz").0, 200);

    let ready = wait_until(Duration::from_secs(30), || admin(&sc, "/readyz").0 == 200);
    assert!(ready, "never ready; log:\n{}", sc.log_text());

    let (_, s) = admin_json(&sc, "/status");
    let inst = &s["instances"][0];
    assert_eq!(inst["state"], "ready");
    assert_eq!(inst["url"], format!("http://127.0.0.1:{port}"));
    let pid = inst["pid"].as_u64().expect("pid") as u32;
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} runs"
    );
    assert_eq!(inst["restarts"], 0);
    assert!(inst.get("last_exit").is_some());
    assert!(inst.get("cpu_percent").is_some());
    // The sampler fills in memory after its first round.
    let sampled = wait_until(Duration::from_secs(15), || {
        admin_json(&sc, "/status").1["instances"][0]["memory_bytes"]
            .as_u64()
            .is_some_and(|m| m > 0)
    });
    assert!(
        sampled,
        "no memory sample: {}",
        admin_json(&sc, "/status").1
    );
    let metrics = admin(&sc, "/metrics").2;
    assert!(metrics.contains("ollama_sidecar_instance_up{instance=\"gpu0\"} 1"));
    assert!(metrics.contains("ollama_sidecar_instance_state{instance=\"gpu0\",state=\"ready\"} 1"));
    assert!(metrics.contains("ollama_sidecar_instance_restarts_total{instance=\"gpu0\"} 0"));
    assert!(metrics.contains("ollama_sidecar_instance_resident_memory_bytes{instance=\"gpu0\"}"));
    assert!(metrics.contains("ollama_sidecar_instance_cpu_seconds_total{instance=\"gpu0\"}"));

    // A clean stop takes the instance down with the sidecar.
    sc.proc.signal(libc::SIGTERM);
    assert!(sc.proc.wait_exit(Duration::from_secs(15)).is_some());
    let gone = wait_until(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    if !gone {
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        panic!("instance {pid} outlived the sidecar");
    }
}

fn admin_with_token(sc: &Sidecar, path: &str, token: Option<&str>) -> reqwest::blocking::Response {
    let req = client().get(format!("http://127.0.0.1:{}{path}", sc.admin_port));
    let req = match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    req.send().expect("admin request")
}

/// A streamed chat on its own thread (it holds its slot while the mock streams).
fn chat_in_background(
    port: u16,
    headers: Vec<(&'static str, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut req = client()
            .post(format!("http://127.0.0.1:{port}/api/chat"))
            .body(r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Ok(r) = req.send() {
            let _ = r.text();
        }
    })
}

/// Issue 20: `/status` names who waits (the `X-Client-Id` of each queued request, its model,
/// position and wait), keeps recent refusals with their reason, and the page's history fills.
#[test]
fn status_names_waiting_clients_and_recent_refusals() {
    let mock = Mock::start(&[("MOCK_TOKENS", "600"), ("MOCK_TOKEN_DELAY_MS", "50")]);
    let sc = Sidecar::start(&format!(
        "admission:\n  client_id_header: X-Client-Id\n{}",
        external_instances(&[&mock], 1)
    ));
    wait_admin(&sc);
    let holder = chat_in_background(sc.port, vec![("X-Client-Id", "holder".into())]);
    assert!(wait_until(Duration::from_secs(10), || {
        sc.status()["instances"][0]["busy_slots"] == 1
    }));
    let waiters: Vec<_> = ["laptop-7", "laptop-7", "ci-runner"]
        .into_iter()
        .map(|id| {
            let t = chat_in_background(sc.port, vec![("X-Client-Id", id.into())]);
            // Arrival order is part of what is checked.
            assert!(wait_until(Duration::from_secs(5), || {
                sc.status()["queue"]["waiting"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|x| x["client"] == id))
            }));
            std::thread::sleep(Duration::from_millis(50));
            t
        })
        .collect();
    let s = sc.status();
    let waiting = s["queue"]["waiting"].as_array().expect("waiting").clone();
    let order: Vec<(u64, &str)> = waiting
        .iter()
        .map(|w| {
            (
                w["position"].as_u64().unwrap_or(0),
                w["client"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // Round robin between clients: ci-runner goes before laptop-7's second request.
    assert_eq!(
        order,
        vec![(1, "laptop-7"), (2, "ci-runner"), (3, "laptop-7")],
        "{s}"
    );
    for w in &waiting {
        assert_eq!(w["model"], "llama3.2:latest");
        assert_eq!(w["key"], Value::Null, "no keys configured");
        assert!(w["waited_seconds"].as_f64().is_some_and(|t| t > 0.0));
        assert!(w["since"].as_f64().is_some_and(|t| t > 1.7e9));
    }
    assert_eq!(s["queue"]["client_id_header"], "X-Client-Id");

    // A refused request stays in the recent refusals with its reason.
    let bad = client()
        .post(sc.url("/api/chat"))
        .header("X-Client-Id", "typo-bot")
        .body("{not json")
        .send()
        .expect("post");
    assert_eq!(bad.status(), 400);
    let s = sc.status();
    let refusal = &s["recent_refusals"][0];
    assert_eq!(refusal["status"], 400, "{s}");
    assert_eq!(refusal["reason"], "invalid_body");
    assert_eq!(refusal["route"], "/api/chat");
    assert_eq!(refusal["method"], "POST");
    assert!(refusal["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));

    // The charts' history has its first sample (taken at start, then every 5 s).
    let history: Value = admin_with_token(&sc, "/status/history", None)
        .json()
        .expect("history");
    assert_eq!(history["max_samples"], 180);
    let samples = history["samples"].as_array().expect("samples");
    assert!(!samples.is_empty(), "{history}");
    assert!(samples[0]["queued"].as_u64().is_some());

    drop(sc);
    for t in waiters.into_iter().chain([holder]) {
        let _ = t.join();
    }
}

/// Issue 20: with API keys the key is the client. The queue metric carries a bounded `key`
/// label (every configured key, nothing for anonymous requests), `/status` shows each key's use
/// against its limits, and `admission.client_id_header` is not silently ignored: the sidecar
/// says at startup that it applies only to requests without a key.
#[test]
fn keys_label_the_queue_and_client_id_header_is_not_silently_ignored() {
    let mock = Mock::start(&[("MOCK_TOKENS", "600"), ("MOCK_TOKEN_DELAY_MS", "50")]);
    let sc = Sidecar::start_with_env(
        &format!(
            "admission:\n  client_id_header: X-Client-Id\nauth:\n  keys:\n    - name: alice\n      key_env: ADM_ALICE\n      requests_per_minute: 50\n    - name: bob\n      key_env: ADM_BOB\n{}",
            external_instances(&[&mock], 1)
        ),
        &[
            ("ADM_ALICE", "alice-secret-0123456789"),
            ("ADM_BOB", "bob-secret-0123456789ab"),
        ],
    );
    wait_admin(&sc);
    assert!(
        wait_until(Duration::from_secs(5), || sc.log_text().contains(
            "admission.client_id_header names only requests without an API key"
        )),
        "no startup warning: {}",
        sc.log_text()
    );
    let alice = || {
        vec![
            (
                "Authorization",
                "Bearer alice-secret-0123456789".to_string(),
            ),
            ("X-Client-Id", "laptop-7".to_string()),
        ]
    };
    let holder = chat_in_background(sc.port, alice());
    assert!(wait_until(Duration::from_secs(10), || {
        sc.status()["instances"][0]["busy_slots"] == 1
    }));
    let waiter = chat_in_background(sc.port, alice());
    assert!(wait_until(Duration::from_secs(10), || {
        sc.status()["queue"]["queued"] == 1
    }));
    let s = sc.status();
    assert_eq!(s["queue"]["client_is"], "key");
    let w = &s["queue"]["waiting"][0];
    assert_eq!(
        (&w["client"], &w["key"]),
        (&json_str("alice"), &json_str("alice"))
    );
    let keys = s["keys"].as_array().expect("keys");
    let a = keys.iter().find(|k| k["name"] == "alice").expect("alice");
    assert_eq!(a["queued"], 1);
    assert_eq!(a["limits"]["requests_per_minute"], 50);
    let metrics = admin(&sc, "/metrics").2;
    assert!(
        metrics.contains("ollama_sidecar_key_queue_requests{key=\"alice\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ollama_sidecar_key_queue_requests{key=\"bob\"} 0"));
    assert_eq!(
        metrics
            .matches("ollama_sidecar_key_queue_requests{")
            .count(),
        2,
        "one series per configured key"
    );
    drop(sc);
    let _ = holder.join();
    let _ = waiter.join();
}

fn json_str(s: &str) -> Value {
    Value::String(s.to_string())
}

/// An instance that answers every request with `status` and `body` (one connection at a time,
/// for at most `life`).
fn fixed_http_server(status: u16, body: &'static str, life: Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + life;
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    use std::io::{Read, Write};
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status} Oops\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    port
}

/// Issue 20: a failing health check keeps its cause (refused; a status with its body) in
/// `/status` (`last_check.error`), in the log, and a dead instance's loaded models are no longer
/// listed while its installed list stays.
#[test]
fn health_failures_keep_their_cause() {
    let mock = Mock::start(&[]);
    let sick = fixed_http_server(
        503,
        "{\"error\":\"overloaded: try later\"}",
        Duration::from_secs(60),
    );
    let sc = Sidecar::start(&format!(
        "health:\n  interval: 200ms\n  timeout: 300ms\n  fall: 1\n  rise: 1\n  models_interval: 200ms\n{}  - name: sick\n    url: http://127.0.0.1:{sick}\n",
        external_instances(&[&mock], 2)
    ));
    wait_admin(&sc);
    // Traffic loads a model on m0, so it has one to lose.
    chat_once(&sc);
    assert!(wait_until(Duration::from_secs(10), || {
        let s = sc.status();
        !s["instances"][0]["loaded_models"]
            .as_array()
            .is_none_or(|m| m.is_empty())
            && !s["instances"][0]["installed_models"]
                .as_array()
                .is_none_or(|m| m.is_empty())
    }));

    let s = sc.status();
    let check = &s["instances"][1]["last_check"];
    assert_eq!(check["result"], "failure", "{s}");
    let error = check["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("answered 503") && error.contains("overloaded: try later"),
        "{error}"
    );
    assert!(check["at"].as_f64().is_some_and(|t| t > 1.7e9));
    assert_eq!(s["instances"][0]["last_check"]["result"], "success");
    assert_eq!(s["instances"][0]["last_check"]["error"], Value::Null);

    let port = mock.port;
    drop(mock);
    let refused = wait_until(Duration::from_secs(10), || {
        sc.status()["instances"][0]["last_check"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection refused"))
    });
    assert!(refused, "{}", sc.status());
    let s = sc.status();
    let m0 = &s["instances"][0];
    assert_eq!(m0["health"], "unhealthy");
    assert_eq!(m0["loaded_models"], serde_json::json!([]), "{m0}");
    assert!(
        m0["installed_models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|n| n == "llama3.2:latest")),
        "{m0}"
    );
    let log = sc.log_text();
    assert!(
        log.lines().any(|l| l.contains("instance out of rotation")
            && l.contains("m0")
            && l.contains(&format!("127.0.0.1:{port}: connection refused"))),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("health check failed")
            && l.contains("sick")
            && l.contains("answered 503")),
        "{log}"
    );
}

/// Issue 20: the status page is served from the binary (no other origin), its data needs the
/// admin token when one is set, the shell does not.
#[test]
fn status_page_is_served_and_its_data_needs_the_token() {
    let mock = Mock::start(&[]);
    let token = "page-admin-token-0123456789";
    let sc = Sidecar::start_with_env(
        &format!(
            "  token_env: PAGE_TOKEN\n{}",
            external_instances(&[&mock], 1)
        ),
        &[("PAGE_TOKEN", token)],
    );
    wait_admin(&sc);
    let page = admin_with_token(&sc, "/", None);
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = page.text().expect("html");
    assert!(html.contains("<script src=\"/status.js\""));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    for asset in ["/status.js", "/status.css"] {
        let r = admin_with_token(&sc, asset, None);
        assert_eq!(r.status(), 200, "{asset}");
        let text = r.text().expect("asset");
        assert!(
            !text.contains("https://"),
            "{asset} loads nothing from elsewhere"
        );
    }
    for path in ["/status", "/status/history"] {
        assert_eq!(admin_with_token(&sc, path, None).status(), 401, "{path}");
        assert_eq!(
            admin_with_token(&sc, path, Some(token)).status(),
            200,
            "{path}"
        );
    }
}
