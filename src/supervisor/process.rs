//! Starting, signalling and reaping one `ollama serve`.
//!
//! Every instance runs in its own process group (its pid is the group id), so a signal reaches
//! Ollama's runner processes too. A child never outlives the sidecar:
//! - `kill_on_drop(true)`: a dropped `Child` (a task aborted when its runtime shuts down) is
//!   killed, and tokio reaps it in the background;
//! - `PR_SET_PDEATHSIG(SIGKILL)` set between fork and exec: the kernel kills the child when
//!   its parent dies, even by SIGKILL. The signal fires when the *thread* that forked exits,
//!   not the process: children are spawned from the supervisor's tokio worker threads, which
//!   live as long as the Pingora service runtime, i.e. until the process exits after `stop()`.
//!   (Never spawn from `spawn_blocking`: those threads come and go.) A `getppid()` check after
//!   the `prctl` closes the race where the sidecar died before the child set it up.

use crate::config::SupervisedSpec;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long to wait for a process to be reaped after SIGKILL before giving up on it (a process
/// stuck in uninterruptible sleep, e.g. in a GPU driver, cannot die until the kernel lets it).
pub const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// The environment the sidecar sets for an instance, applied after the inherited environment
/// and the configured `env` (so these always win).
pub fn sidecar_env(spec: &SupervisedSpec) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("OLLAMA_HOST", format!("127.0.0.1:{}", spec.port)),
        ("OLLAMA_NUM_PARALLEL", spec.num_parallel.to_string()),
        ("OLLAMA_MAX_QUEUE", spec.max_queue.to_string()),
    ];
    if let Some(dir) = &spec.models_dir {
        env.push(("OLLAMA_MODELS", dir.display().to_string()));
    }
    if let Some(gpus) = &spec.gpus {
        env.push(("CUDA_VISIBLE_DEVICES", gpus.clone()));
    }
    if let Some(keep_alive) = &spec.keep_alive {
        env.push(("OLLAMA_KEEP_ALIVE", keep_alive.clone()));
    }
    env
}

/// Builds the command: `program args`, the sidecar's environment, then `env` from the
/// configuration, then the sidecar's own settings; stdin closed, stdout and stderr piped.
pub fn command(program: &Path, spec: &SupervisedSpec) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .envs(sidecar_env(spec))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (two syscalls); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// Sends `signal` to the process group `pgid`; false when it no longer exists.
pub fn signal_group(pgid: u32, signal: libc::c_int) -> bool {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return false;
    };
    if pgid <= 1 {
        return false;
    }
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe { libc::killpg(pgid, signal) == 0 }
}

/// Stops a running instance: SIGTERM to its group, up to `grace` for the leader to exit, then
/// SIGKILL to the group, and reaps the leader. Returns its exit status (`None`: not reaped
/// within `REAP_AFTER_KILL` of SIGKILL, or waiting failed).
pub async fn terminate(child: &mut Child, pgid: u32, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        kill_leftovers(pgid);
        return Some(status);
    }
    signal_group(pgid, libc::SIGTERM);
    if let Ok(r) = tokio::time::timeout(grace, child.wait()).await {
        kill_leftovers(pgid);
        return r.ok();
    }
    signal_group(pgid, libc::SIGKILL);
    match tokio::time::timeout(REAP_AFTER_KILL, child.wait()).await {
        Ok(r) => r.ok(),
        Err(_) => {
            tracing::error!(
                pid = pgid,
                "process did not die within {}s of SIGKILL",
                REAP_AFTER_KILL.as_secs()
            );
            None
        }
    }
}

/// After the group leader is gone, SIGKILL whatever is left in its group (runners it did not
/// stop). The group id cannot be reused while any member is alive, so this reaches only our
/// processes; with no member left it fails harmlessly (ESRCH).
pub fn kill_leftovers(pgid: u32) {
    if signal_group(pgid, libc::SIGKILL) {
        tracing::debug!(
            pgid,
            "killed processes left in the instance's process group"
        );
    }
}

/// `exit code 1`, `signal 9 (SIGKILL)`.
pub fn describe_exit(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match signal_name(sig) {
            Some(name) => format!("signal {sig} ({name})"),
            None => format!("signal {sig}"),
        }
    } else {
        status.to_string()
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RestartConfig;
    use std::collections::BTreeMap;

    fn spec() -> SupervisedSpec {
        SupervisedSpec {
            command: "sh".into(),
            args: vec![],
            port: 11501,
            env: BTreeMap::from([
                ("OLLAMA_HOST".to_string(), "0.0.0.0:1".to_string()),
                ("MINE".to_string(), "x".to_string()),
            ]),
            num_parallel: 3,
            max_queue: 4,
            models_dir: Some("/m".into()),
            gpus: Some("0,1".into()),
            keep_alive: None,
            warmup: vec![],
            log_file: None,
            start_timeout: Duration::from_secs(5),
            stop_grace: Duration::from_secs(1),
            restart: RestartConfig::default(),
        }
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(describe_exit(&ExitStatus::from_raw(1 << 8)), "exit code 1");
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(9)),
            "signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(15)),
            "signal 15 (SIGTERM)"
        );
    }

    #[tokio::test]
    async fn environment_layers_and_group() {
        let mut s = spec();
        s.args = vec![
            "-c".into(),
            "echo $OLLAMA_HOST $OLLAMA_NUM_PARALLEL $OLLAMA_MAX_QUEUE $OLLAMA_MODELS $CUDA_VISIBLE_DEVICES $MINE ${OLLAMA_KEEP_ALIVE-unset} $$ $(cut -d' ' -f5 /proc/$$/stat)".into(),
        ];
        let mut cmd = command(Path::new("/bin/sh"), &s);
        cmd.env_remove("OLLAMA_KEEP_ALIVE");
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            &fields[..7],
            ["127.0.0.1:11501", "3", "4", "/m", "0,1", "x", "unset"],
            "{text}"
        );
        // Its own process group.
        assert_eq!(fields[7], fields[8], "{text}");
    }

    #[tokio::test]
    async fn terminate_escalates_to_sigkill() {
        let mut s = spec();
        s.args = vec!["-c".into(), "trap '' TERM; sleep 30 & wait".into()];
        let mut child = command(Path::new("/bin/sh"), &s).spawn().unwrap();
        let pid = child.id().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let status = terminate(&mut child, pid, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(describe_exit(&status), "signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn terminate_is_graceful_when_possible() {
        let mut s = spec();
        s.args = vec!["-c".into(), "exec sleep 30".into()];
        let mut child = command(Path::new("/bin/sh"), &s).spawn().unwrap();
        let pid = child.id().unwrap();
        let status = terminate(&mut child, pid, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(describe_exit(&status), "signal 15 (SIGTERM)");
    }
}
