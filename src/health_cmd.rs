//! `ollama-sidecar health`: asks a running sidecar's admin listener whether it can serve
//! (`GET /readyz`) and turns the answer into an exit status, for container `HEALTHCHECK`s and
//! scripts that have no curl. One request with hyper's client on a single-threaded runtime,
//! bounded by one deadline.
//!
//! Exit status: [`EXIT_READY`] (0) on 200, [`EXIT_NOT_READY`] (1) on any other status (the body is
//! printed), [`EXIT_UNREACHABLE`] (2) when nothing usable answered in time (why is printed).

use crate::config::{self, Overrides};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Outcome::Unreachable(format!("cannot start a runtime: {e}")),
    };
    let answer =
        runtime.block_on(async { tokio::time::timeout(timeout, ask(target, timeout)).await });
    match answer {
        Ok(Ok((status, body))) => Outcome::Answered { status, body },
        Ok(Err(why)) => Outcome::Unreachable(why),
        Err(_) => Outcome::Unreachable(format!(
            "no answer: timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// One `GET` on a connection of its own (hyper resolves the name, tries each address, frames the
/// body); the status and the body's text.
async fn ask(target: &Target, timeout: Duration) -> Result<(u16, String), String> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    // A connect that takes the whole budget says so, rather than the generic timeout.
    connector.set_connect_timeout(Some(timeout));
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        // `Host:`, not `host:`: what a reader of a server's log or a packet capture expects.
        .http1_title_case_headers(true)
        .build::<_, Empty<Bytes>>(connector);
    let request = http::Request::get(target.to_string())
        .header(http::header::USER_AGENT, "ollama-sidecar-health")
        .header(http::header::ACCEPT, "*/*")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("`{target}`: not a request target: {e}"))?;
    let response = client.request(request).await.map_err(|e| {
        if e.is_connect() {
            format!("cannot connect to {}: {}", target.host_header(), causes(&e))
        } else {
            format!("no usable answer: {}", causes(&e))
        }
    })?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("the {status} answer's body: {e}"))?
        .to_bytes();
    Ok((
        status,
        String::from_utf8_lossy(&body).trim_end().to_string(),
    ))
}

/// An error and its sources, innermost last (`tcp connect error: Connection refused`).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c.to_string());
        cause = c.source();
    }
    if text.is_empty() {
        e.to_string()
    } else {
        text
    }
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

    /// A one-connection server on 127.0.0.1 that reads the request head, writes `reply` and
    /// closes; bounded by read and accept timeouts.
    fn serve_raw(reply: &'static [u8]) -> Target {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(reply);
        });
        Target::parse_url(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    fn ask(reply: &'static [u8]) -> Outcome {
        check(&serve_raw(reply), Duration::from_secs(5))
    }

    fn answered(status: u16, body: &str) -> Outcome {
        Outcome::Answered {
            status,
            body: body.to_string(),
        }
    }

    #[test]
    fn responses_are_framed() {
        let r = ask(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n");
        assert_eq!(r, answered(200, "ready"));
        let chunked = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
        assert_eq!(ask(chunked), answered(503, "not ready"));
        let by_close = b"HTTP/1.0 503 X\r\n\r\nbusy";
        assert_eq!(ask(by_close), answered(503, "busy"));
        for cut_or_not_http in [
            &b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\nnot"[..],
            b"",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"garbage",
        ] {
            let outcome = check(
                &serve_raw(Box::leak(cut_or_not_http.to_vec().into_boxed_slice())),
                Duration::from_secs(5),
            );
            assert!(
                matches!(outcome, Outcome::Unreachable(_)),
                "{:?}: {outcome:?}",
                String::from_utf8_lossy(cut_or_not_http)
            );
        }
    }

    #[test]
    fn a_huge_answer_is_refused() {
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        )
        .into_bytes();
        reply.resize(reply.len() + MAX_RESPONSE + 1, b'x');
        let outcome = check(
            &serve_raw(Box::leak(reply.into_boxed_slice())),
            Duration::from_secs(5),
        );
        assert!(matches!(outcome, Outcome::Unreachable(_)), "{outcome:?}");
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
