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
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let local_port = cols.get(1)?.rsplit(':').next()?;
                    let listening = *cols.get(3)? == "0A";
                    let inode = cols.get(9)?;
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
        })
        .unwrap_or(false)
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

/// A mock Ollama on its own port.
pub struct Mock {
    pub port: u16,
    pub proc: Proc,
}

impl Mock {
    /// A mock on a free port; started again on another port if a parallel test took this one.
    pub fn start(env: &[(&str, &str)]) -> Mock {
        for _ in 1..PORT_ATTEMPTS {
            if let Some(mock) = Self::try_start_on(free_port(), env) {
                return mock;
            }
        }
        Self::start_on(free_port(), env)
    }

    /// A mock on a given port (to bring an instance back where it was).
    pub fn start_on(port: u16, env: &[(&str, &str)]) -> Mock {
        match Self::try_start_on(port, env) {
            Some(mock) => mock,
            None => panic!("mock-ollama did not start listening on {port}"),
        }
    }

    /// Starts a mock and waits until it (not another process) listens on `port`; `None` when it
    /// exits or does not listen within 10 s.
    fn try_start_on(port: u16, env: &[(&str, &str)]) -> Option<Mock> {
        let mut cmd = Command::new(MOCK);
        cmd.arg("serve")
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn mock-ollama");
        let mut mock = Mock {
            port,
            proc: Proc { child },
        };
        let pid = mock.proc.pid();
        wait_until(Duration::from_secs(10), || {
            listens_on(pid, port) || matches!(mock.proc.child.try_wait(), Ok(Some(_)))
        });
        listens_on(pid, port).then_some(mock)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// A running sidecar with its configuration file.
pub struct Sidecar {
    pub port: u16,
    pub admin_port: u16,
    pub proc: Proc,
    pub config: tempfile::NamedTempFile,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts the sidecar with `body` appended to generated `listen`/`admin` keys, and waits
    /// until the proxy port accepts connections.
    pub fn start(body: &str) -> Sidecar {
        Self::start_with_env(body, &[])
    }

    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::start_with_command(body, |config| {
            let mut cmd = Command::new(SIDECAR);
            cmd.arg("--config").arg(config).env("RUST_LOG", "info");
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd
        })
    }

    /// Starts the sidecar with the command `command` makes from the configuration file's path
    /// (to run it under a wrapper such as `unshare`; the command must end by exec-ing
    /// [`SIDECAR`], so the child is the sidecar); its output goes to the log file.
    pub fn start_with_command(
        body: &str,
        mut command: impl FnMut(&std::path::Path) -> Command,
    ) -> Sidecar {
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match Self::try_start(body, &mut command) {
                Ok(sidecar) => return sidecar,
                Err(log) => last_log = log,
            }
        }
        panic!("sidecar did not start; log:\n{last_log}")
    }

    /// One start on fresh ports: the sidecar once its proxy and admin ports are its own, or its log
    /// when it exited or another process holds a port.
    fn try_start(
        body: &str,
        command: &mut impl FnMut(&std::path::Path) -> Command,
    ) -> Result<Sidecar, String> {
        let port = free_port();
        let admin_port = free_port();
        let mut config = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("temp config");
        write!(
            config,
            "listen: 127.0.0.1:{port}\nadmin:\n  listen: 127.0.0.1:{admin_port}\n{body}"
        )
        .expect("write config");
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("sidecar.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = command(config.path());
        cmd.stdout(Stdio::null()).stderr(log_file);
        let child = cmd.spawn().expect("spawn ollama-sidecar");
        let mut sidecar = Sidecar {
            port,
            admin_port,
            proc: Proc { child },
            config,
            log,
            _dir: dir,
        };
        let pid = sidecar.proc.pid();
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

/// A sample's value on the sidecar's `/metrics` (`name{labels}` as written there), 0 when absent.
pub fn metric_value(admin_port: u16, series: &str) -> f64 {
    let text = client()
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
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
