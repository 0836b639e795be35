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
    let chat = client()
        .post(sc.url("/api/chat"))
        .body(r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .expect("chat");
    assert_eq!(chat.status(), 200);
    let _ = chat.text();

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
