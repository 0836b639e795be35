//! `ollama-sidecar health`: its exit status against a tiny std HTTP server run by each test on
//! 127.0.0.1 (answers 200, answers 503, accepts and says nothing) and against a closed port.
//! Every loop and wait is bounded in time.

mod common;

use common::{run_to_end, sidecar_command};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest any fake server waits for its one client.
const SERVER_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
enum Reply {
    Status(u16, &'static str),
    /// Read the request, then say nothing until the client gives up.
    Silence,
}

/// A one-connection HTTP server on 127.0.0.1; the handle yields the request head it read.
fn serve_once(reply: Reply) -> (u16, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + SERVER_LIMIT;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return String::new();
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        match reply {
            Reply::Status(status, body) => {
                let reason = if status == 200 {
                    "OK"
                } else {
                    "Service Unavailable"
                };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).unwrap();
            }
            Reply::Silence => {
                // Hold the connection open until the client closes it (read returns 0).
                while Instant::now() < deadline {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        _ => continue,
                    }
                }
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    });
    (port, handle)
}

fn health(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = sidecar_command();
    cmd.arg("health").args(args).envs(env.iter().copied());
    let started = Instant::now();
    let out = run_to_end(cmd);
    (out, started.elapsed())
}

/// A configuration file in a temporary directory (kept while the directory lives).
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path.display().to_string())
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn ready_exits_0() {
    let (port, server) = serve_once(Reply::Status(200, "ready\n"));
    let url = format!("http://127.0.0.1:{port}");
    let (out, _) = health(&["--url", &url], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let request = server.join().unwrap();
    assert!(request.starts_with("GET /readyz HTTP/1.1\r\n"), "{request}");
    assert!(
        request.contains(&format!("Host: 127.0.0.1:{port}\r\n")),
        "{request}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("200 ready"));
}

#[test]
fn not_ready_exits_1_and_prints_the_body() {
    let (port, server) = serve_once(Reply::Status(503, "no instance can serve"));
    let url = format!("http://127.0.0.1:{port}/readyz");
    let (out, _) = health(&["--url", &url], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("503 no instance can serve"),
        "{}",
        text(&out)
    );
    server.join().unwrap();
}

#[test]
fn silence_exits_2_within_the_timeout() {
    let (port, server) = serve_once(Reply::Silence);
    let url = format!("127.0.0.1:{port}");
    let (out, took) = health(&["--url", &url, "--timeout", "400ms"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "{}",
        text(&out)
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // The server saw the request, so the timeout was the read's, not the connect's.
    assert!(server.join().unwrap().starts_with("GET /readyz "));
}

#[test]
fn closed_port_exits_2() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (out, took) = health(&["--url", &url], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out)
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn config_admin_listen_wildcard_is_asked_on_loopback() {
    let (port, server) = serve_once(Reply::Status(200, "ready"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 0.0.0.0:1\nadmin:\n  listen: 0.0.0.0:{port}\ninstances:\n  - name: ollama\n    url: http://ollama:11434\n"
        ),
    )
    .unwrap();
    let (out, _) = health(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(server.join().unwrap().starts_with("GET /readyz "));

    // The same file through OLLAMA_SIDECAR_CONFIG.
    let (port, server) = serve_once(Reply::Status(503, "draining"));
    std::fs::write(
        &path,
        format!("admin:\n  listen: 0.0.0.0:{port}\ninstances:\n  - name: a\n    url: http://a:1\n"),
    )
    .unwrap();
    let (out, _) = health(&[], &[("OLLAMA_SIDECAR_CONFIG", path.to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    server.join().unwrap();
}

#[test]
fn admin_listen_env_wins_and_needs_no_file() {
    let (port, server) = serve_once(Reply::Status(200, "ready"));
    let listen = format!("0.0.0.0:{port}");
    let (out, _) = health(
        &["--config", "/nonexistent/sidecar.yaml"],
        &[("OLLAMA_SIDECAR_ADMIN_LISTEN", &listen)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    server.join().unwrap();

    // --url wins over the environment, and an unreadable configuration is exit 2 with the reason.
    let (out, _) = health(
        &["--url", "http://127.0.0.1:1", "--timeout", "300ms"],
        &[("OLLAMA_SIDECAR_CONFIG", "/nonexistent/sidecar.yaml")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let (out, _) = health(&["--config", "/nonexistent/sidecar.yaml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read"),
        "{}",
        text(&out)
    );
}

/// The configurations the images and the Kubernetes manifest ship pass `ollama-sidecar check`.
#[test]
fn deployment_configurations_are_valid() {
    use serde::Deserialize;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(root.join("docker/kubernetes/ollama-sidecar.yaml"))
        .expect("docker/kubernetes/ollama-sidecar.yaml");
    let mut from_configmap = None;
    for doc in yaml_serde::Deserializer::from_str(&manifest) {
        let value = yaml_serde::Value::deserialize(doc).expect("a YAML document");
        if value["kind"].as_str() == Some("ConfigMap") {
            let text = value["data"]["sidecar.yaml"]
                .as_str()
                .expect("data.sidecar.yaml");
            let path = dir.path().join("k8s-sidecar.yaml");
            std::fs::write(&path, text).unwrap();
            from_configmap = Some(path);
        }
    }
    let from_configmap = from_configmap.expect("a ConfigMap in the Kubernetes manifest");
    for path in [
        root.join("conf/docker.yaml"),
        root.join("conf/docker-supervised.yaml"),
        from_configmap,
    ] {
        let mut cmd = sidecar_command();
        cmd.arg("check").arg("--config").arg(&path);
        let out = run_to_end(cmd);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            text(&out)
        );
        let effective = String::from_utf8_lossy(&out.stdout);
        assert!(
            effective.contains("listen: 0.0.0.0:11434")
                && effective.contains("listen: 0.0.0.0:11435"),
            "{}: {effective}",
            path.display()
        );
    }
}

/// `health` reads only `admin.listen`: an unset key variable, an unreadable key file, an
/// instance list it does not need, or a mistake elsewhere in the file do not make it fail.
#[test]
fn health_reads_only_the_admin_address() {
    let (port, server) = serve_once(Reply::Status(200, "ready"));
    let (_dir, path) = config_file(&format!(
        "admin:\n  listen: 127.0.0.1:{port}\n  token_env: G_HEALTH_UNSET_TOKEN\nauth:\n  keys:\n    - name: a\n      key_env: G_HEALTH_UNSET_KEY\n    - name: b\n      key_file: /nonexistent/key\nlog:\n  level: infoo\n"
    ));
    let (out, _) = health(&["--config", &path], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(server.join().unwrap().starts_with("GET /readyz "));
}

/// `localhost` in `admin.listen` is asked on 127.0.0.1, as `run` binds it.
#[test]
fn localhost_admin_listen_is_asked_on_loopback() {
    let (port, server) = serve_once(Reply::Status(200, "ready"));
    let (_dir, path) = config_file(&format!("admin:\n  listen: localhost:{port}\n"));
    let (out, _) = health(&["--config", &path], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("http://127.0.0.1:{port}/readyz: 200 ready\n")
    );
    server.join().unwrap();
}

/// What `health` does need is still checked: one line, exit 2, naming the key or variable.
#[test]
fn a_bad_admin_address_is_exit_2_naming_where_it_came_from() {
    let (_dir, shown) = config_file("admin:\n  listen: gpu-box:11435\n");
    let (out, _) = health(&["--config", &shown], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("ollama-sidecar health: {shown}: admin.listen: `gpu-box:11435`: `gpu-box` is a host name; a listener takes an IP address (`127.0.0.1:11435` for this host only, `0.0.0.0:11435` for every interface; `localhost` means 127.0.0.1)\n")
    );
    let (out, _) = health(
        &["--config", &shown],
        &[("OLLAMA_SIDECAR_ADMIN_LISTEN", "nowhere")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("ollama-sidecar health: OLLAMA_SIDECAR_ADMIN_LISTEN: expected an address like `127.0.0.1:11434` or `[::1]:11434`, got `nowhere` (it overrides `admin.listen` of {shown})\n")
    );
    std::fs::write(&shown, "admin:\n\tlisten: 127.0.0.1:1\n").unwrap();
    let (out, _) = health(&["--config", &shown], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("ollama-sidecar health: {shown}: admin: line 2 holds a tab character; YAML indents with spaces only\n")
    );
}
