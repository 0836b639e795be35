//! Test support: the real `ollama-sidecar` and `mock-ollama` binaries on ephemeral loopback ports,
//! stopped on drop. Every wait is bounded in time.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SIDECAR: &str = env!("CARGO_BIN_EXE_ollama-sidecar");
pub const MOCK: &str = env!("CARGO_BIN_EXE_mock-ollama");

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether process `pid` holds a listening TCP socket on `port` (any address). Answers the
/// question `port_open` cannot: `free_port` releases its port before the child binds it, so a
/// parallel test may take it first, and then `port_open` would see that other process.
pub fn listens_on(pid: u32, port: u16) -> bool {
    // The process's sockets first (a few descriptors), then only the lines of the kernel's
    // tables that mention the port: a busy machine's table has thousands of lines, and parsing
    // each one took 70-100 ms per call in a debug build, longer than a short-lived child lives.
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let sockets: Vec<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    if sockets.is_empty() {
        return false;
    }
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .any(|text| {
            text.lines()
                .skip(1)
                .filter(|l| l.contains(&local))
                .any(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let on_port = cols.get(1).is_some_and(|a| a.ends_with(&local));
                    let listening = cols.get(3) == Some(&"0A");
                    let ours = cols.get(9).is_some_and(|i| sockets.iter().any(|s| s == i));
                    on_port && listening && ours
                })
        })
}

/// How many times a test child is started on fresh ports when another process took its port
/// between `free_port` and the child's bind.
const PORT_ATTEMPTS: usize = 5;

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for exit up to `limit`; `None` when still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Whether something accepts TCP connections on the port.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The variables that override the sidecar's configuration.
const OVERRIDE_VARS: [&str; 3] = [
    "OLLAMA_SIDECAR_CONFIG",
    "OLLAMA_SIDECAR_LISTEN",
    "OLLAMA_SIDECAR_ADMIN_LISTEN",
];

/// The sidecar's command with the variables that override its configuration removed from the
/// environment it inherits (a developer's shell may set them).
pub fn sidecar_command() -> Command {
    let mut cmd = Command::new(SIDECAR);
    for var in OVERRIDE_VARS {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// How long a command run to its end ([`run_to_end`]) may take.
pub const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Runs a short-lived command (`check`, `health`, a startup failure) to its end and collects its
/// output, killing it after `limit`.
pub fn run_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut proc = Proc {
        child: cmd.spawn().expect("spawn the command"),
    };
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(proc.child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(proc.child.stderr.take().map(|p| Box::new(p) as _));
    let Some(status) = proc.wait_exit(limit) else {
        panic!("{cmd:?} did not end within {limit:?}");
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// [`run_within`] [`RUN_LIMIT`].
pub fn run_to_end(cmd: Command) -> std::process::Output {
    run_within(cmd, RUN_LIMIT)
}

/// A mock Ollama on its own port.
pub struct Mock {
    /// The loopback address it listens on (`127.0.0.1` unless [`MockCmd::host`] said otherwise).
    pub host: String,
    pub port: u16,
    pub proc: Proc,
}

/// A mock's process: its pid, signals, exit.
impl std::ops::Deref for Mock {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Mock {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Mock {
    /// A mock on a free port; started again on another port if a parallel test took this one.
    pub fn start(env: &[(&str, &str)]) -> Mock {
        MockCmd::new().envs(env).start()
    }

    /// A mock on a given port (to bring an instance back where it was).
    pub fn start_on(port: u16, env: &[(&str, &str)]) -> Mock {
        MockCmd::new().envs(env).start_on(port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host, self.port)
    }
}

/// How a mock is run: its environment, arguments and address. Every mock of the tests starts
/// through [`MockCmd::start`] or [`MockCmd::start_on`], which count it as started only once it
/// holds its port ([`listens_on`]).
#[derive(Clone, Debug)]
pub struct MockCmd {
    host: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    capture_stderr: bool,
}

impl Default for MockCmd {
    fn default() -> Self {
        MockCmd {
            host: "127.0.0.1".to_string(),
            env: Vec::new(),
            args: Vec::new(),
            capture_stderr: false,
        }
    }
}

impl MockCmd {
    pub fn new() -> MockCmd {
        MockCmd::default()
    }

    pub fn env(mut self, name: &str, value: &str) -> MockCmd {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn envs(self, env: &[(&str, &str)]) -> MockCmd {
        env.iter().fold(self, |cmd, (k, v)| cmd.env(k, v))
    }

    /// Arguments after `serve`.
    pub fn args(mut self, args: &[&str]) -> MockCmd {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Another loopback address to listen on (`127.0.0.2`, `[::1]`).
    pub fn host(mut self, host: &str) -> MockCmd {
        self.host = host.to_string();
        self
    }

    /// Keeps the mock's stderr readable (`proc.child.stderr`) instead of discarding it.
    pub fn capture_stderr(mut self) -> MockCmd {
        self.capture_stderr = true;
        self
    }

    /// The command for a mock on `port`, not started: for tests of how it starts (a taken port,
    /// a start delay).
    pub fn command(&self, port: u16) -> Command {
        let mut cmd = Command::new(MOCK);
        cmd.arg("serve")
            .args(&self.args)
            .env("OLLAMA_HOST", format!("{}:{port}", self.host))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if self.capture_stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        cmd
    }

    /// A mock on a free port; started again on another port if a parallel test took this one.
    pub fn start(&self) -> Mock {
        for _ in 1..PORT_ATTEMPTS {
            if let Some(mock) = self.try_start_on(free_port()) {
                return mock;
            }
        }
        self.start_on(free_port())
    }

    /// A mock on a given port (to bring an instance back where it was).
    pub fn start_on(&self, port: u16) -> Mock {
        match self.try_start_on(port) {
            Some(mock) => mock,
            None => panic!(
                "mock-ollama did not start listening on {}:{port}",
                self.host
            ),
        }
    }

    /// Starts a mock and waits until it (not another process) listens on `port`; `None` when it
    /// exits or does not listen within 10 s.
    fn try_start_on(&self, port: u16) -> Option<Mock> {
        let child = self.command(port).spawn().expect("spawn mock-ollama");
        let mut mock = Mock {
            host: self.host.clone(),
            port,
            proc: Proc { child },
        };
        let pid = mock.proc.pid();
        wait_until(Duration::from_secs(10), || {
            listens_on(pid, port) || matches!(mock.proc.child.try_wait(), Ok(Some(_)))
        });
        listens_on(pid, port).then_some(mock)
    }
}

/// The ports of one start attempt: the proxy's, the admin listener's, and those the
/// configuration asks for by name (supervised instances). Every attempt draws fresh ones.
#[derive(Clone, Debug)]
pub struct Ports {
    pub proxy: u16,
    pub admin: u16,
    named: Vec<(String, u16)>,
}

impl Ports {
    pub fn fresh() -> Ports {
        Ports {
            proxy: free_port(),
            admin: free_port(),
            named: Vec::new(),
        }
    }

    /// The port called `name` in this attempt, drawn on first use.
    pub fn port(&mut self, name: &str) -> u16 {
        if let Some((_, port)) = self.named.iter().find(|(n, _)| n == name) {
            return *port;
        }
        let port = free_port();
        self.named.push((name.to_string(), port));
        port
    }

    /// A port drawn by [`Ports::port`].
    pub fn of(&self, name: &str) -> u16 {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, port)| *port)
            .unwrap_or_else(|| panic!("no port called {name}"))
    }
}

type ConfigFn = Box<dyn FnMut(&mut Ports) -> String>;
type WrapFn = Box<dyn FnMut(&std::path::Path) -> Command>;

/// How a sidecar is run: its configuration (written from each attempt's [`Ports`]), its
/// environment, and an optional wrapper command. Every sidecar of the tests starts through
/// [`SidecarCmd::start`]: on fresh ports, again when another process took one of them.
pub struct SidecarCmd {
    config: ConfigFn,
    env: Vec<(String, String)>,
    wrap: Option<WrapFn>,
    args: Vec<String>,
}

impl SidecarCmd {
    /// `body` after generated `listen` and `admin.listen` lines.
    pub fn new(body: &str) -> SidecarCmd {
        let body = body.to_string();
        SidecarCmd::config(move |p| {
            format!(
                "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n{body}",
                p.proxy, p.admin
            )
        })
    }

    /// The whole configuration, written from each attempt's ports (the sidecar must listen on
    /// `proxy` and `admin`).
    pub fn config(config: impl FnMut(&mut Ports) -> String + 'static) -> SidecarCmd {
        SidecarCmd {
            config: Box::new(config),
            env: vec![("RUST_LOG".to_string(), "info".to_string())],
            wrap: None,
            args: Vec::new(),
        }
    }

    /// Command-line arguments after `--config FILE` (not passed to a wrapper).
    pub fn args(mut self, args: &[&str]) -> SidecarCmd {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> SidecarCmd {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn envs(self, env: &[(&str, &str)]) -> SidecarCmd {
        env.iter().fold(self, |cmd, (k, v)| cmd.env(k, v))
    }

    /// Runs the sidecar under a wrapper such as `unshare`: `wrap` makes the command from the
    /// configuration file's path, and must end by exec-ing [`SIDECAR`], so the child is the
    /// sidecar. The environment is applied to the wrapper, which passes it on.
    pub fn wrapped(mut self, wrap: impl FnMut(&std::path::Path) -> Command + 'static) -> Self {
        self.wrap = Some(Box::new(wrap));
        self
    }

    /// Starts the sidecar and waits until its proxy and admin ports are its own; on fresh ports
    /// again when it exited (another process took a port) or did not listen within 15 s.
    pub fn start(mut self) -> Sidecar {
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match self.try_start() {
                Ok(sidecar) => return sidecar,
                Err(log) => last_log = log,
            }
        }
        panic!("sidecar did not start; log:\n{last_log}")
    }

    /// The command for `config`, not started (env and wrapper applied).
    fn command(&mut self, config: &std::path::Path) -> Command {
        let mut cmd = match &mut self.wrap {
            Some(wrap) => wrap(config),
            None => {
                let mut cmd = Command::new(SIDECAR);
                cmd.arg("--config").arg(config).args(&self.args);
                cmd
            }
        };
        for var in OVERRIDE_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// One start on fresh ports: the sidecar once its proxy and admin ports are its own, or its log
    /// when it exited or another process holds a port.
    fn try_start(&mut self) -> Result<Sidecar, String> {
        let mut ports = Ports::fresh();
        let text = (self.config)(&mut ports);
        let mut sidecar = spawn_sidecar(ports, &text, |config| self.command(config));
        let pid = sidecar.proc.pid();
        let (port, admin_port) = (sidecar.port, sidecar.admin_port);
        let owns_ports = || listens_on(pid, port) && listens_on(pid, admin_port);
        wait_until(Duration::from_secs(15), || {
            owns_ports() || matches!(sidecar.proc.child.try_wait(), Ok(Some(_)))
        });
        if owns_ports() {
            Ok(sidecar)
        } else {
            Err(sidecar.log_text())
        }
    }
}

/// Writes `text` to a configuration file, spawns the command `command` makes from its path
/// (output to a log file of its own), and returns it as a [`Sidecar`] on `ports`, at once.
fn spawn_sidecar(
    ports: Ports,
    text: &str,
    command: impl FnOnce(&std::path::Path) -> Command,
) -> Sidecar {
    let mut config = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp config");
    config.write_all(text.as_bytes()).expect("write config");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("sidecar.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut cmd = command(config.path());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn ollama-sidecar");
    Sidecar {
        port: ports.proxy,
        admin_port: ports.admin,
        ports,
        started,
        pids: Vec::new(),
        proc: Proc { child },
        config,
        log,
        _dir: dir,
    }
}

/// A running sidecar with its configuration file.
pub struct Sidecar {
    pub port: u16,
    pub admin_port: u16,
    /// Every port its configuration was written with.
    pub ports: Ports,
    /// When the process was spawned (before it listened).
    pub started: Instant,
    /// Supervised mock instances the test saw: killed on drop in case the sidecar failed to.
    pub pids: Vec<u32>,
    pub proc: Proc,
    pub config: tempfile::NamedTempFile,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The sidecar's process: its pid, signals, exit.
impl std::ops::Deref for Sidecar {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Sidecar {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        // Only a pid that still runs the mock: a pid the system reused is not ours to kill.
        let mock = std::fs::canonicalize(MOCK).ok();
        for &pid in &self.pids {
            if std::fs::read_link(format!("/proc/{pid}/exe")).ok() == mock {
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("--- sidecar log ---\n{}", self.log_text());
        }
    }
}

impl Sidecar {
    /// Starts the sidecar with `body` appended to generated `listen`/`admin` keys, and waits
    /// until the proxy port accepts connections.
    pub fn start(body: &str) -> Sidecar {
        SidecarCmd::new(body).start()
    }

    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Sidecar {
        SidecarCmd::new(body).envs(env).start()
    }

    /// Starts the sidecar with the command `command` makes from the configuration file's path
    /// (see [`SidecarCmd::wrapped`]).
    pub fn start_with_command(
        body: &str,
        command: impl FnMut(&std::path::Path) -> Command + 'static,
    ) -> Sidecar {
        SidecarCmd::new(body).wrapped(command).start()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The admin listener's `/status` document.
    pub fn status(&self) -> serde_json::Value {
        client()
            .get(format!("http://127.0.0.1:{}/status", self.admin_port))
            .send()
            .and_then(|r| r.json())
            .expect("admin /status")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory of the sidecar process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The port called `name` in its configuration ([`Ports::port`]).
    pub fn port_of(&self, name: &str) -> u16 {
        self.ports.of(name)
    }

    /// Starts a second sidecar on a copy of this one's configuration (same ports), with `args`
    /// after `--config FILE` and `env` (e.g. a binary upgrade: `--upgrade`), without waiting
    /// for it to listen.
    pub fn spawn_successor(&self, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let text = std::fs::read_to_string(self.config.path()).expect("read config");
        spawn_sidecar(self.ports.clone(), &text, |config| {
            let mut cmd = Command::new(SIDECAR);
            cmd.arg("--config").arg(config).args(args);
            for var in OVERRIDE_VARS {
                cmd.env_remove(var);
            }
            cmd.env("RUST_LOG", "info").envs(env.iter().copied());
            cmd
        })
    }
}

/// Processes running `exe` whose /proc/PID/`file` (`environ`, `cmdline`: NUL-separated) holds
/// the entry `entry`.
fn processes_with(exe: &str, file: &str, entry: &str) -> Vec<u32> {
    let exe = std::fs::canonicalize(exe).ok();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok() == exe)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/{file}"))
                .map(|v| v.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Processes running `exe` whose environment holds `entry` (e.g. `OLLAMA_HOST=127.0.0.1:PORT`
/// for the supervised mock of one test).
pub fn processes_with_env(exe: &str, entry: &str) -> Vec<u32> {
    processes_with(exe, "environ", entry)
}

/// Processes running `exe` with `arg` among their arguments.
pub fn processes_with_arg(exe: &str, arg: &str) -> Vec<u32> {
    processes_with(exe, "cmdline", arg)
}

/// The parent pid of `pid`, from /proc (None when it is gone).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (in parentheses) may hold spaces: the fields after it are plain.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A configuration body with one external instance per mock.
pub fn external_instances(mocks: &[&Mock], num_parallel: usize) -> String {
    let mut s = String::from("instances:\n");
    for (i, m) in mocks.iter().enumerate() {
        s.push_str(&format!(
            "  - name: m{i}\n    url: http://127.0.0.1:{}\n    num_parallel: {num_parallel}\n",
            m.port
        ));
    }
    s
}

/// A blocking HTTP client with no proxy and generous timeouts.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// The mock's request log (`GET /mock/requests`).
pub fn mock_requests(mock: &Mock) -> Vec<serde_json::Value> {
    let v: serde_json::Value = client()
        .get(mock.url("/mock/requests"))
        .send()
        .and_then(|r| r.json())
        .expect("mock requests");
    match v {
        serde_json::Value::Array(a) => a,
        other => other
            .get("requests")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default(),
    }
}

pub fn mock_stats(mock: &Mock) -> serde_json::Value {
    client()
        .get(mock.url("/mock/stats"))
        .send()
        .and_then(|r| r.json())
        .expect("mock stats")
}

/// A header value from a logged request (names compared case-insensitively).
pub fn logged_header(req: &serde_json::Value, name: &str) -> Option<String> {
    let headers = req.get("headers")?;
    let find = |k: &str, v: &serde_json::Value| -> Option<String> {
        if k.eq_ignore_ascii_case(name) {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(a) => a.first().and_then(|x| x.as_str()).map(String::from),
                _ => None,
            }
        } else {
            None
        }
    };
    match headers {
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| find(k, v)),
        serde_json::Value::Array(pairs) => pairs.iter().find_map(|p| {
            let k = p.get(0).or_else(|| p.get("name"))?.as_str()?;
            let v = p.get(1).or_else(|| p.get("value"))?;
            find(k, v)
        }),
        _ => None,
    }
}

/// Sends `POST path` with a JSON body (and extra header lines, each ending in `\r\n`) on a raw
/// connection that closes after the response; returns the reader.
pub fn post_raw(
    port: u16,
    path: &str,
    body: &str,
    extra_headers: &str,
) -> std::io::BufReader<std::net::TcpStream> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .expect("write request");
    std::io::BufReader::new(s)
}

/// Reads a raw response line by line for at most `bound`, calling `each` with every line that
/// is a JSON object (stream chunks; status, headers and chunk sizes are skipped) and the moment
/// it arrived; `each` returns false to stop. Returns whether the connection ended.
pub fn for_each_json_line(
    reader: &mut std::io::BufReader<std::net::TcpStream>,
    bound: Duration,
    mut each: impl FnMut(serde_json::Value, std::time::SystemTime) -> bool,
) -> bool {
    use std::io::BufRead;
    let mut line = String::new();
    let started = Instant::now();
    while started.elapsed() < bound {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return true,
            Err(_) => return false,
            Ok(_) => {}
        }
        let at = std::time::SystemTime::now();
        if let Ok(v @ serde_json::Value::Object(_)) =
            serde_json::from_str::<serde_json::Value>(line.trim())
        {
            if !each(v, at) {
                return false;
            }
        }
    }
    false
}

/// All JSON-object lines of a raw response, and whether the connection ended within `bound`.
pub fn read_json_lines(
    reader: &mut std::io::BufReader<std::net::TcpStream>,
    bound: Duration,
) -> (Vec<serde_json::Value>, bool) {
    let mut objects = Vec::new();
    let ended = for_each_json_line(reader, bound, |v, _| {
        objects.push(v);
        true
    });
    (objects, ended)
}

/// The pid a mock reports on `/mock/stats`.
pub fn mock_pid_on(port: u16) -> u32 {
    client()
        .get(format!("http://127.0.0.1:{port}/mock/stats"))
        .send()
        .and_then(|r| r.json::<serde_json::Value>())
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .expect("mock pid") as u32
}

/// Requests from clients the mock has seen: the sidecar's own calls (health checks, model
/// polls) say who they are in their User-Agent and are not counted, so a count taken before and
/// after a test step is not raced by them.
pub fn client_requests(mock: &Mock) -> u64 {
    mock_stats(mock)["client_requests"]
        .as_u64()
        .expect("mock stats count client requests")
}

/// One response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive client connection that sends requests byte for byte (no URL normalisation, as
/// reqwest's `url` would do) and reads one response per request. It reconnects when the
/// server closed the connection. Every read is bounded by a 20 s timeout.
pub struct RawConn {
    port: u16,
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

/// A request with exactly this method, target and body (plus `Host` and `Content-Length`).
pub fn raw_request(method: &str, target: &[u8], headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = Vec::with_capacity(128 + target.len() + body.len());
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() || method == "POST" {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

impl RawConn {
    pub fn new(port: u16) -> RawConn {
        RawConn { port, conn: None }
    }

    /// Sends `request` and reads its response (interim 1xx responses skipped). `None` when the
    /// server closed the connection without an answer.
    pub fn exchange(&mut self, request: &[u8], head_only: bool) -> Option<RawResponse> {
        use std::io::{BufRead, Read};
        for attempt in 0..2 {
            let reader = match &mut self.conn {
                Some(r) => r,
                None => {
                    let s =
                        std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
                    s.set_nodelay(true).ok();
                    self.conn.insert(std::io::BufReader::new(s))
                }
            };
            if reader.get_mut().write_all(request).is_err() {
                self.conn = None;
                continue;
            }
            let mut status = 0u16;
            let mut headers = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let l = line.trim_end();
                if status == 0 {
                    status = l
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    continue;
                }
                if !l.is_empty() {
                    if let Some((k, v)) = l.split_once(':') {
                        headers.push((k.trim().to_string(), v.trim().to_string()));
                    }
                    continue;
                }
                if (100..200).contains(&status) {
                    status = 0;
                    headers.clear();
                    continue;
                }
                break;
            }
            if status == 0 {
                // A kept-alive connection the server had closed: one retry on a new one.
                self.conn = None;
                if attempt == 0 {
                    continue;
                }
                return None;
            }
            let resp_header = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                    .map(|(_, v)| v.to_ascii_lowercase())
            };
            let mut body = Vec::new();
            let no_body = head_only || status == 204 || status == 304;
            let closes = resp_header("connection").is_some_and(|v| v.contains("close"));
            if no_body {
            } else if resp_header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let size =
                        usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                            .unwrap_or(0);
                    if size == 0 {
                        // Trailers, then the blank line.
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0
                                || line.trim().is_empty()
                            {
                                break;
                            }
                        }
                        break;
                    }
                    let mut chunk = vec![0; size + 2];
                    if reader.read_exact(&mut chunk).is_err() {
                        break;
                    }
                    body.extend_from_slice(&chunk[..size]);
                }
            } else if let Some(n) =
                resp_header("content-length").and_then(|v| v.parse::<usize>().ok())
            {
                body.resize(n, 0);
                if reader.read_exact(&mut body).is_err() {
                    self.conn = None;
                }
            } else {
                let _ = reader.read_to_end(&mut body);
                self.conn = None;
            }
            if closes {
                self.conn = None;
            }
            return Some(RawResponse {
                status,
                headers,
                body,
            });
        }
        None
    }
}

/// A `redis-server` (Debian's `redis-server` package) on a loopback port, saving nothing to
/// disk; killed on drop.
pub struct Redis {
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// A Redis on a given port (to bring it back where the sidecars look for it).
    pub fn start_on(port: u16) -> Redis {
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it: apt-get install redis-server")
            });
        let redis = Redis {
            port,
            proc: Proc { child },
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || redis
                .try_command(&["PING"])
                .is_some_and(|r| r == "+PONG")),
            "redis-server did not start on {port}"
        );
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command's reply line (`+OK`, `:3`, `$5`...), or `None` when Redis does not answer
    /// within a second.
    pub fn try_command(&self, args: &[&str]) -> Option<String> {
        use std::io::BufRead;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(request.as_bytes()).ok()?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// An integer reply (`EXISTS`, `ZCARD`, `DBSIZE`...).
    pub fn integer(&self, args: &[&str]) -> i64 {
        let reply = self.try_command(args).expect("redis answers");
        reply
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{args:?}: not an integer reply: {reply}"))
    }
}

/// The sidecar's `/metrics` page ("" when it cannot be read).
pub fn metrics_text(admin_port: u16) -> String {
    client()
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

/// The sum of every sample of the metric `name`, whatever its labels.
pub fn metric_sum(admin_port: u16, name: &str) -> f64 {
    metrics_text(admin_port)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A sample's value on the sidecar's `/metrics` (`name{labels}` as written there), 0 when absent.
pub fn metric_value(admin_port: u16, series: &str) -> f64 {
    metrics_text(admin_port)
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The sidecar's access-log lines (it must run with `log.format: json`), read again until
/// `enough` holds for them or 10 s pass: a line is written when its request ends.
pub fn access_lines(
    sidecar: &Sidecar,
    enough: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        sidecar
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    };
    wait_until(Duration::from_secs(10), || enough(&read()));
    read()
}

// ---- Reload (tests/reload.rs): rewrite a running sidecar's configuration and reload it. ----
impl Sidecar {
    /// The admin listener's URL for `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Writes `body` after the same `listen` and `admin.listen` lines [`SidecarCmd::new`] wrote
    /// (the file is replaced whole, by rename, as editors and configuration tools do).
    pub fn rewrite_config(&self, body: &str) {
        let text = format!(
            "listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n{body}",
            self.port, self.admin_port
        );
        self.rewrite_config_text(&text);
    }

    /// Replaces the configuration file with `text` exactly.
    pub fn rewrite_config_text(&self, text: &str) {
        let path = self.config.path();
        let next = path.with_extension("next");
        std::fs::write(&next, text).expect("write the next configuration");
        std::fs::rename(&next, path).expect("replace the configuration");
    }

    /// `POST /reload` on the admin listener: its status and JSON answer.
    pub fn reload(&self) -> (u16, serde_json::Value) {
        let r = client()
            .post(self.admin_url("/reload"))
            .send()
            .expect("POST /reload");
        let status = r.status().as_u16();
        (status, r.json().expect("/reload answers JSON"))
    }

    /// The configuration generation `/status` reports.
    pub fn config_generation(&self) -> u64 {
        self.status()["config"]["generation"]
            .as_u64()
            .expect("/status config.generation")
    }

    /// The value of the metric line that starts with `series` (name and labels), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = client()
            .get(self.admin_url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("admin /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}
