//! The command line as scripts use it: `check`, environment overrides, exit codes, and one
//! clear line for each startup error.

mod common;

use common::*;
use std::io::Write;
use std::process::Command;

fn config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(SIDECAR);
    cmd.args(args)
        .env_remove("OLLAMA_SIDECAR_LISTEN")
        .env_remove("OLLAMA_SIDECAR_ADMIN_LISTEN")
        .env_remove("OLLAMA_SIDECAR_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_effective_configuration_with_overrides() {
    let f = config("instances:\n  - name: a\n    url: http://127.0.0.1:11500\n");
    let path = f.path().to_str().unwrap();
    let (code, out, _) = run(
        &["check", "--config", path],
        &[("OLLAMA_SIDECAR_LISTEN", "0.0.0.0:9999")],
    );
    assert_eq!(code, Some(0));
    assert!(out.contains("listen: 0.0.0.0:9999"), "{out}");
    assert!(
        out.contains("max_queued: 1024"),
        "defaults are printed: {out}"
    );
    assert!(out.contains("url: http://127.0.0.1:11500"));
    // A flag wins over the environment; OLLAMA_SIDECAR_CONFIG names the file.
    let (code, out, _) = run(
        &["check", "--listen", "127.0.0.1:8888"],
        &[
            ("OLLAMA_SIDECAR_LISTEN", "0.0.0.0:9999"),
            ("OLLAMA_SIDECAR_CONFIG", path),
        ],
    );
    assert_eq!(code, Some(0));
    assert!(out.contains("listen: 127.0.0.1:8888"), "{out}");
}

#[test]
fn invalid_configurations_are_one_line_naming_file_and_key() {
    let cases = [
        (
            "instances:\n  - name: a\n    port: abc\n",
            "instances[0].port",
        ),
        (
            "instances:\n  - name: a\n    url: http://x:1\n    colour: red\n",
            "instances[0].colour",
        ),
        (
            "listen: nowhere\ninstances:\n  - name: a\n    url: x:1\n",
            "listen",
        ),
        (
            "instances:\n  - name: a\n    port: 11600\n    env:\n      \"A=B\": x\n",
            "instances[0].env.A=B",
        ),
        (
            "admission:\n  max_wait: soon\ninstances:\n  - name: a\n    url: x:1\n",
            "admission.max_wait",
        ),
        ("instances: []\n", "instances"),
    ];
    for (text, key) in cases {
        let f = config(text);
        let path = f.path().to_str().unwrap().to_string();
        for args in [vec!["check", "--config", &path], vec!["--config", &path]] {
            let (code, out, err) = run(&args, &[]);
            assert_eq!(code, Some(2), "{args:?} {text:?}: {err}");
            assert!(out.is_empty(), "nothing on stdout: {out}");
            let line = err.trim();
            assert_eq!(line.lines().count(), 1, "one line: {err}");
            assert!(line.contains(&path), "names the file: {line}");
            assert!(line.contains(key), "names the key {key}: {line}");
        }
    }
    let (code, _, err) = run(&["--config", "/nonexistent/sidecar.yaml"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("/nonexistent/sidecar.yaml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn a_taken_listen_port_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let f = config(&format!(
        "listen: 127.0.0.1:{port}\nadmin:\n  listen: 127.0.0.1:{}\ninstances:\n  - name: a\n    url: http://127.0.0.1:1\n",
        free_port()
    ));
    let (code, _, err) = run(&["--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port} (listen)")),
        "{err}"
    );
}
