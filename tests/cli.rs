//! The command line as scripts use it: `check`, environment overrides, exit codes, and one
//! clear line for each startup error.

mod common;

use common::*;
use std::io::Write;

fn config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = sidecar_command();
    cmd.args(args).envs(env.iter().copied());
    let out = run_to_end(cmd);
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

/// Asserts that `check --config FILE` (plus `extra` arguments, with the environment given)
/// refuses the configuration `text` with exit 2 and exactly one stderr line, the `expected`
/// message for the file's path after the usual prefix.
fn assert_refused(
    text: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    expected: impl Fn(&str) -> String,
) {
    let f = config(text);
    let path = f.path().to_str().unwrap().to_string();
    let mut args = vec!["check", "--config", &path];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args, env);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert_eq!(
        err,
        format!(
            "ollama-sidecar: invalid configuration: {}\n",
            expected(&path)
        )
    );
}

const ONE_INSTANCE: &str = "instances:\n  - name: a\n    url: http://127.0.0.1:11500\n";
const UNITS: &str = "units: ms, s, m (minutes), h, d; e.g. `500ms`, `30s`, `2m`, `1h 30m`";

#[test]
fn a_wildcard_admin_listener_on_the_proxy_port_is_refused() {
    let port = free_port();
    assert_refused(
        &format!("listen: 127.0.0.1:{port}\nadmin:\n  listen: 0.0.0.0:{port}\n{ONE_INSTANCE}"),
        &[],
        &[],
        |path| {
            format!("{path}: admin.listen: 0.0.0.0:{port} overlaps `listen` (127.0.0.1:{port}): a wildcard address takes port {port} on every address; give the two listeners different ports")
        },
    );
    // The same when `listen` comes from the command line: the flag is named.
    assert_refused(
        &format!("admin:\n  listen: 127.0.0.1:{port}\n{ONE_INSTANCE}"),
        &["--listen", &format!("[::]:{port}")],
        &[],
        |path| {
            format!("{path}: admin.listen: 127.0.0.1:{port} overlaps `listen` ([::]:{port}, from --listen): a wildcard address takes port {port} on every address; give the two listeners different ports")
        },
    );
}

#[test]
fn a_log_level_that_is_not_a_level_is_refused() {
    assert_refused(
        &format!("log:\n  level: infoo\n{ONE_INSTANCE}"),
        &[],
        &[],
        |path| {
            format!("{path}: log.level: `infoo` in `infoo` is not a level; expected one of trace, debug, info, warn, error, off, or `target=level` such as `ollama_sidecar=debug`")
        },
    );
    assert_refused(
        &format!("log:\n  level: info,ollama_sidecar=verbose\n{ONE_INSTANCE}"),
        &[],
        &[],
        |path| {
            format!("{path}: log.level: `verbose` in `info,ollama_sidecar=verbose` is not a level; expected one of trace, debug, info, warn, error, off, or `target=level` such as `ollama_sidecar=debug`")
        },
    );
    // Real filters still pass.
    let f = config(&format!(
        "log:\n  level: WARN,ollama_sidecar=debug,pingora_core::server=off\n{ONE_INSTANCE}"
    ));
    let (code, _, err) = run(&["check", "--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn duration_errors_list_units_and_months_are_refused() {
    let cases = [
        (
            "admission:\n  max_wait: 10M\n",
            format!("admission.max_wait: `10M`: `M` is a month or year unit, refused here (minutes are `m`; {UNITS}) at line 2 column 13"),
        ),
        (
            "timeouts:\n  response_header: 1 year\n",
            format!("timeouts.response_header: `1 year`: `year` is a month or year unit, refused here (minutes are `m`; {UNITS}) at line 2 column 20"),
        ),
        (
            "admission:\n  max_wait: soon\n",
            format!("admission.max_wait: expected a duration, got `soon` ({UNITS}) at line 2 column 13"),
        ),
        (
            "timeouts:\n  idle: 30\n",
            format!("timeouts.idle: expected a duration like `30s` ({UNITS}), got the number 30 at line 2 column 9"),
        ),
    ];
    for (text, message) in cases {
        assert_refused(&format!("{text}{ONE_INSTANCE}"), &[], &[], |path| {
            format!("{path}: {message}")
        });
    }
    // `health --timeout` reads durations the same way.
    let (code, _, err) = run(&["health", "--timeout", "1M"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!(
            "`1M`: `M` is a month or year unit, refused here (minutes are `m`; {UNITS})"
        )),
        "{err}"
    );
}

#[test]
fn the_same_instance_url_under_two_names_is_refused() {
    assert_refused(
        &format!("{ONE_INSTANCE}  - name: b\n    url: HTTP://127.0.0.1:11500/\n"),
        &[],
        &[],
        |path| {
            format!("{path}: instances[1].url: http://127.0.0.1:11500 is already instances[0] (`a`): listed twice, its slots would count twice; list it once")
        },
    );
    // A supervised instance and an external URL to its port are the same Ollama too.
    assert_refused(
        "instances:\n  - name: gpu0\n    port: 11600\n  - name: again\n    url: 127.0.0.1:11600\n",
        &[],
        &[],
        |path| {
            format!("{path}: instances[1].url: http://127.0.0.1:11600 is already instances[0] (`gpu0`): listed twice, its slots would count twice; list it once")
        },
    );
}

#[test]
fn localhost_listens_on_loopback_and_other_host_names_are_refused() {
    assert_refused(
        &format!("listen: gpu-box:11434\n{ONE_INSTANCE}"),
        &[],
        &[],
        |path| {
            format!("{path}: listen: `gpu-box:11434`: `gpu-box` is a host name; a listener takes an IP address (`127.0.0.1:11434` for this host only, `0.0.0.0:11434` for every interface; `localhost` means 127.0.0.1)")
        },
    );
    // `localhost` runs: both listeners answer on 127.0.0.1.
    let sidecar = SidecarCmd::config(|p| {
        format!(
            "listen: localhost:{}\nadmin:\n  listen: LOCALHOST:{}\n{ONE_INSTANCE}",
            p.proxy, p.admin
        )
    })
    .start();
    let (port, admin_port) = (sidecar.port, sidecar.admin_port);
    assert!(
        wait_until(std::time::Duration::from_secs(15), || port_open(port)
            && port_open(admin_port)),
        "the sidecar listens on 127.0.0.1:{port} and 127.0.0.1:{admin_port}"
    );
    let healthz = client()
        .get(format!("http://127.0.0.1:{admin_port}/healthz"))
        .send()
        .unwrap();
    assert_eq!(healthz.status(), 200);
}

#[test]
fn listen_errors_name_the_flag_or_variable_they_came_from() {
    /// Arguments, environment, where the value came from, the key it overrides.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 3] = [
        (&["--listen", "nowhere"], &[], "--listen", "listen"),
        (
            &[],
            &[("OLLAMA_SIDECAR_LISTEN", "nowhere")],
            "OLLAMA_SIDECAR_LISTEN",
            "listen",
        ),
        (
            &["--admin-listen", "nowhere"],
            &[("OLLAMA_SIDECAR_ADMIN_LISTEN", "127.0.0.1:1")],
            "--admin-listen",
            "admin.listen",
        ),
    ];
    for (args, env, origin, key) in cases {
        assert_refused(ONE_INSTANCE, args, env, |path| {
            format!("{origin}: expected an address like `127.0.0.1:11434` or `[::1]:11434`, got `nowhere` (it overrides `{key}` of {path})")
        });
    }
}

#[test]
fn a_tab_is_named_as_a_tab() {
    assert_refused("instances:\n\t- name: a\n", &[], &[], |path| {
        format!("{path}: instances: line 2 holds a tab character; YAML indents with spaces only")
    });
}

#[test]
fn type_errors_are_in_an_operators_words() {
    let cases = [
        (
            format!("threads: many\n{ONE_INSTANCE}"),
            "threads: expected a whole number (0 or more), got `many` at line 1 column 10",
        ),
        (
            "instances:\n  - name: a\n    port: 99999\n".to_string(),
            "instances[0].port: expected a whole number from 0 to 65535, got the number 99999 at line 3 column 11",
        ),
        (
            format!("retries:\n  budget_ratio: lots\n{ONE_INSTANCE}"),
            "retries.budget_ratio: expected a number such as `0.2`, got `lots` at line 2 column 17",
        ),
        (
            format!("admission:\n  max_wait:\n{ONE_INSTANCE}"),
            "admission.max_wait: expected a duration like `30s` (units: ms, s, m (minutes), h, d; e.g. `500ms`, `30s`, `2m`, `1h 30m`), got nothing (`null` or an empty value) at line 2 column 12",
        ),
        (
            format!("log:\n  access: yes please\n{ONE_INSTANCE}"),
            "log.access: expected `true` or `false`, got `yes please` at line 2 column 11",
        ),
    ];
    for (text, message) in cases {
        assert_refused(&text, &[], &[], |path| format!("{path}: {message}"));
    }
}

#[test]
fn check_prints_empty_keys_and_its_output_is_a_valid_configuration() {
    let f = config(ONE_INSTANCE);
    let (code, out, err) = run(&["check", "--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    for key in [
        "\n  token_env: null\n",
        "\n  idle: null\n",
        "\n  client_id_header: null\n",
        "\n  priorities: {}\n",
        "\n  keys: []\n",
        "\n  models: []\n",
        "\n  origins: []\n",
    ] {
        assert!(out.contains(key), "`check` prints {key:?}: {out}");
    }
    let again = config(&out);
    let (code, _, err) = run(&["check", "--config", again.path().to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn check_no_secrets_validates_without_the_keys() {
    let text = format!(
        "admin:\n  token_env: G_CLI_UNSET_TOKEN\nauth:\n  keys:\n    - name: a\n      key_env: G_CLI_UNSET_KEY\n    - name: b\n      key_file: /nonexistent/key\n{ONE_INSTANCE}"
    );
    assert_refused(&text, &[], &[], |path| {
        format!("{path}: auth.keys[0].key_env: environment variable `G_CLI_UNSET_KEY` is not set; expected the key")
    });
    let f = config(&text);
    let path = f.path().to_str().unwrap();
    let (code, out, err) = run(&["check", "--no-secrets", "--config", path], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.lines().next(),
        Some(format!("# {path}: valid (secrets not read); effective configuration:").as_str())
    );
    // The form of each secret's source is still checked.
    assert_refused(
        &format!("auth:\n  keys:\n    - name: a\n      key_env: \"A=B\"\n{ONE_INSTANCE}"),
        &["--no-secrets"],
        &[],
        |path| {
            format!("{path}: auth.keys[0].key_env: `A=B` is not a valid environment variable name or path")
        },
    );
}

#[test]
fn help_shows_the_variable_without_a_value() {
    for env in [
        &[][..],
        &[("OLLAMA_SIDECAR_CONFIG", "/secret/path.yaml")][..],
    ] {
        let (code, out, _) = run(&["--help"], env);
        assert_eq!(code, Some(0));
        assert!(out.contains("[env: OLLAMA_SIDECAR_CONFIG]"), "{out}");
        assert!(!out.contains("OLLAMA_SIDECAR_CONFIG="), "{out}");
    }
}

#[test]
fn the_default_configuration_is_the_checkouts_then_the_systems() {
    let dir = tempfile::tempdir().unwrap();
    let in_dir = |args: &[&str]| {
        let mut cmd = sidecar_command();
        cmd.args(args).current_dir(dir.path());
        let out = run_to_end(cmd);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let system = "/etc/ollama-sidecar/sidecar.yaml";
    let (code, out, err) = in_dir(&["check"]);
    if std::path::Path::new(system).exists() {
        assert!(out.starts_with(&format!("# {system}: ")) || err.contains(system));
    } else {
        assert_eq!(code, Some(2));
        assert_eq!(
            err,
            format!("ollama-sidecar: invalid configuration: {system}: cannot read the configuration file: No such file or directory (os error 2) (the default; name a file with --config or OLLAMA_SIDECAR_CONFIG)\n")
        );
    }
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    std::fs::write(dir.path().join("conf/sidecar.yaml"), ONE_INSTANCE).unwrap();
    let (code, out, err) = in_dir(&["check"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("# conf/sidecar.yaml: valid; effective configuration:\n"),
        "{out}"
    );
}
