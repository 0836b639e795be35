//! `ollama-sidecar health`: asks a running sidecar's admin listener whether it can serve
//! (`GET /readyz`) and turns the answer into an exit status, for container `HEALTHCHECK`s and
//! scripts that have no curl. A plain HTTP/1.1 request over a std `TcpStream`, bounded by one
//! deadline: no runtime, no extra crates.
//!
//! Exit status: [`EXIT_READY`] (0) on 200, [`EXIT_NOT_READY`] (1) on any other status (the body is
//! printed), [`EXIT_UNREACHABLE`] (2) when nothing usable answered in time (why is printed).

use crate::config::{self, Overrides};
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

pub const EXIT_READY: u8 = 0;
pub const EXIT_NOT_READY: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

/// The default deadline for the whole exchange (connect, send, read).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The path asked when a URL gives none.
pub const READY_PATH: &str = "/readyz";
/// The most of a response that is read; a readiness answer is a few bytes.
const MAX_RESPONSE: usize = 64 * 1024;

/// Where to ask: a host (name or address), a port and a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    /// The admin listener's `/readyz`. A wildcard listen address (`0.0.0.0`, `[::]`) is asked on
    /// the matching loopback address, which is where a process on the same host reaches it.
    pub fn for_listen_addr(addr: SocketAddr) -> Target {
        let ip = loopback_for_wildcard(addr.ip());
        Target {
            host: ip.to_string(),
            port: addr.port(),
            path: READY_PATH.to_string(),
        }
    }

    /// Parses `http://host:port[/path]`, or a bare `host:port[/path]`. No path means `/readyz`.
    /// Wildcard hosts are mapped to loopback as in [`Target::for_listen_addr`].
    pub fn parse_url(url: &str) -> Result<Target, String> {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "`{url}`: only http:// is supported (got {scheme}://)"
                ))
            }
            None => url,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = if path.is_empty() || path == "/" {
            READY_PATH.to_string()
        } else {
            path.to_string()
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("`{url}`: the path may not contain spaces"));
        }
        let bad = || format!("`{url}`: expected http://host:port[/path]");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = after.strip_prefix(':').ok_or_else(bad)?;
            (h.to_string(), port)
        } else {
            let (h, port) = authority.rsplit_once(':').ok_or_else(bad)?;
            (h.to_string(), port)
        };
        if host.is_empty() {
            return Err(bad());
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}`: bad port `{port}`"))?;
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => loopback_for_wildcard(ip).to_string(),
            Err(_) => host,
        };
        Ok(Target { host, port, path })
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}

/// The admin listener's `/readyz` as `run` would bind it: `OLLAMA_SIDECAR_ADMIN_LISTEN` when set
/// (the file is then not needed), else the configuration file's `admin.listen` (or its default).
/// Nothing else in the file is read or validated: no secret, no instance.
pub fn target_from_config(path: &Path) -> Result<Target, String> {
    config::load_admin_listen(path, &Overrides::from_env())
        .map(Target::for_listen_addr)
        .map_err(|e| e.to_string())
}

/// `0.0.0.0` → `127.0.0.1`, `::` → `::1`; anything else unchanged.
pub fn loopback_for_wildcard(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The admin listener answered with this status and body.
    Answered { status: u16, body: String },
    /// Nothing usable answered: refused, timed out, closed early, or not HTTP.
    Unreachable(String),
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Answered { status: 200, .. } => EXIT_READY,
            Outcome::Answered { .. } => EXIT_NOT_READY,
            Outcome::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }
}

/// Sends `GET <path>` to the target and reads the answer, all within `timeout`.
pub fn check(target: &Target, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    match exchange(target, deadline) {
        Ok((status, body)) => Outcome::Answered { status, body },
        Err(why) => Outcome::Unreachable(why),
    }
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err("timed out".to_string())
    } else {
        Ok(left)
    }
}

fn io_why(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => e.to_string(),
    }
}

fn connect(target: &Target, deadline: Instant) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .collect();
    let mut last = format!("{} resolved to no address", target.host);
    for addr in addrs {
        let left = remaining(deadline)?;
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("cannot connect to {addr}: {}", io_why(e)),
        }
    }
    Err(last)
}

fn exchange(target: &Target, deadline: Instant) -> Result<(u16, String), String> {
    let mut stream = connect(target, deadline)?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ollama-sidecar-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.path,
        target.host_header()
    );
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(io_why)?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {}", io_why(e)))?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(done) = complete_response(&buf)? {
            return Ok(done);
        }
        if buf.len() >= MAX_RESPONSE {
            return Err(format!("the answer exceeds {MAX_RESPONSE} bytes"));
        }
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(io_why)?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return finish_at_eof(&buf);
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "no answer from {target}: {}{}",
                    io_why(e),
                    if buf.is_empty() {
                        String::new()
                    } else {
                        format!(" (after {} bytes)", buf.len())
                    }
                ))
            }
        }
    }
}

/// The parsed head of a response: status, where the body starts, how it is framed.
struct Head {
    status: u16,
    body_start: usize,
    content_length: Option<usize>,
    chunked: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if !buf.is_empty() && !b"HTTP/".starts_with(&buf[..buf.len().min(5)]) {
            return Err("the answer is not HTTP".to_string());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let status = match (version.starts_with("HTTP/1."), status) {
        (true, Some(s)) if (100..=999).contains(&s) => s,
        _ => return Err(format!("not an HTTP/1.x status line: `{status_line}`")),
    };
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok();
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(Some(Head {
        status,
        body_start: end + 4,
        content_length,
        chunked,
    }))
}

/// The status and body once the whole response is in `buf`; `None` while more is expected.
fn complete_response(buf: &[u8]) -> Result<Option<(u16, String)>, String> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let body = &buf[head.body_start..];
    if head.status == 204 || head.status == 304 || (100..200).contains(&head.status) {
        return Ok(Some((head.status, String::new())));
    }
    if head.chunked {
        return Ok(decode_chunked(body).map(|b| (head.status, text(&b))));
    }
    match head.content_length {
        Some(n) if body.len() >= n => Ok(Some((head.status, text(&body[..n])))),
        _ => Ok(None),
    }
}

/// The connection closed: a body delimited by the close is complete; anything else was cut.
fn finish_at_eof(buf: &[u8]) -> Result<(u16, String), String> {
    if buf.is_empty() {
        return Err("the connection closed without an answer".to_string());
    }
    match parse_head(buf)? {
        Some(head) if !head.chunked && head.content_length.is_none() => {
            Ok((head.status, text(&buf[head.body_start..])))
        }
        Some(head) => Err(format!(
            "the connection closed in the middle of a {} answer",
            head.status
        )),
        None => Err("the connection closed in the middle of the answer's header".to_string()),
    }
}

/// Decodes a complete chunked body; `None` until the last chunk has arrived.
fn decode_chunked(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if body.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_readyz_by_default() {
        let t = Target::parse_url("http://127.0.0.1:11435").unwrap();
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, 11435);
        assert_eq!(t.path, "/readyz");
        let t = Target::parse_url("localhost:9/healthz").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("localhost", 9, "/healthz")
        );
        let t = Target::parse_url("http://[::1]:11435/").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.to_string(), "http://[::1]:11435/readyz");
    }

    #[test]
    fn wildcards_map_to_loopback() {
        assert_eq!(
            Target::parse_url("http://0.0.0.0:11435").unwrap().host,
            "127.0.0.1"
        );
        assert_eq!(Target::parse_url("http://[::]:11435").unwrap().host, "::1");
        let t = Target::for_listen_addr("0.0.0.0:11435".parse().unwrap());
        assert_eq!(t.to_string(), "http://127.0.0.1:11435/readyz");
        let t = Target::for_listen_addr("[::]:11435".parse().unwrap());
        assert_eq!(t.to_string(), "http://[::1]:11435/readyz");
        let t = Target::for_listen_addr("10.1.2.3:11435".parse().unwrap());
        assert_eq!(t.host, "10.1.2.3");
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "https://127.0.0.1:1",
            "http://127.0.0.1",
            "http://:80",
            "http://h:0",
            "http://h:x",
            "http://[::1/",
        ] {
            assert!(Target::parse_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn responses_are_framed() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n";
        assert_eq!(
            complete_response(r).unwrap(),
            Some((200, "ready".to_string()))
        );
        let partial = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\nnot";
        assert_eq!(complete_response(partial).unwrap(), None);
        let chunked = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
        assert_eq!(
            complete_response(chunked).unwrap(),
            Some((503, "not ready".to_string()))
        );
        let by_close = b"HTTP/1.0 503 X\r\n\r\nbusy";
        assert_eq!(complete_response(by_close).unwrap(), None);
        assert_eq!(finish_at_eof(by_close).unwrap(), (503, "busy".to_string()));
        assert!(finish_at_eof(partial).is_err());
        assert!(finish_at_eof(b"").is_err());
        assert!(complete_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(complete_response(b"garbage").is_err());
    }

    #[test]
    fn exit_codes() {
        let answered = |status| Outcome::Answered {
            status,
            body: String::new(),
        };
        assert_eq!(answered(200).exit_code(), 0);
        assert_eq!(answered(503).exit_code(), 1);
        assert_eq!(answered(404).exit_code(), 1);
        assert_eq!(Outcome::Unreachable("x".into()).exit_code(), 2);
    }
}
