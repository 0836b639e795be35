//! Where to reach an instance: an external instance's `url`, parsed and checked.

use super::OLLAMA_DEFAULT_PORT;
use std::fmt;

/// Where to reach an instance, as the operator wrote it: an IP address or a host name (resolved
/// by the instance watch, `src/upstream/resolve.rs`), a port, and whether it speaks TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddress {
    /// An IP literal (IPv6 without brackets) or a DNS name.
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl UpstreamAddress {
    /// The `host:port` authority as written (`[v6]:port` for IPv6), the default `Host` header.
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The address itself when the host is an IP literal (nothing to resolve).
    pub fn literal(&self) -> Option<std::net::SocketAddr> {
        self.host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, self.port))
    }

    /// The same Ollama listed twice (scheme, host and port compared without case): its slots
    /// would count twice. A name and an address that resolve alike are not caught here.
    pub(super) fn same_as(&self, other: &UpstreamAddress) -> bool {
        let host = |u: &UpstreamAddress| u.host.trim_end_matches('.').to_ascii_lowercase();
        self.tls == other.tls && self.port == other.port && host(self) == host(other)
    }
}

impl fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.host_header())
    }
}

/// Parses an external instance's URL: `http://host:port`, `https://host`, or a bare `host:port`
/// (Ollama's own `OLLAMA_HOST` convention: no scheme means http on port 11434).
pub fn parse_instance_url(url: &str) -> Result<UpstreamAddress, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => (String::new(), url),
    };
    let (tls, default_port) = match scheme.as_str() {
        "" => (false, OLLAMA_DEFAULT_PORT),
        "http" => (false, 80),
        "https" => (true, 443),
        other => {
            return Err(format!(
                "unsupported scheme `{other}`; expected http or https"
            ))
        }
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('?') || authority.contains('#') {
        return Err("expected scheme://host:port with no path".to_string());
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".to_string());
    }
    let (host, port) = split_authority(authority, default_port)?;
    if host.is_empty() {
        return Err("expected a host name or address".to_string());
    }
    if !authority.starts_with('[') {
        check_host_name(&host)?;
    }
    if port == 0 {
        return Err("port must be between 1 and 65535".to_string());
    }
    Ok(UpstreamAddress { host, port, tls })
}

/// `host[:port]` or `[v6][:port]` into the host (IPv6 without brackets) and the port.
fn split_authority(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("bad port `{p}`"));
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| "unterminated IPv6 address".to_string())?;
        let port = match after.strip_prefix(':') {
            Some(p) => port(p)?,
            None if after.is_empty() => default_port,
            None => return Err("expected `]:port` after an IPv6 address".to_string()),
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`[{h}]` is not an IPv6 address"));
        }
        return Ok((h.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), port(p)?)),
        None => Ok((authority.to_string(), default_port)),
    }
}

/// Checks a host written in an instance URL: an IPv4 address or a DNS name (letters, digits, `-`,
/// `_`; labels of 1 to 63 characters, 253 in all, an optional final dot). IPv6 goes in brackets.
fn check_host_name(host: &str) -> Result<(), String> {
    if host.contains(':') {
        return Err(format!("an IPv6 address goes in brackets: `[{host}]:port`"));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "`{host}` is not a host name (letters, digits, `-` and `_` in dot-separated labels) or an IP address"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_urls() {
        let a = parse_instance_url("http://ollama:11434").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("ollama", 11434, false));
        assert_eq!(parse_instance_url("http://h").unwrap().port, 80);
        assert_eq!(parse_instance_url("h").unwrap().port, 11434);
        assert_eq!(parse_instance_url("https://h").unwrap().port, 443);
        let v6 = parse_instance_url("http://[::1]:5").unwrap();
        assert_eq!(v6.host_header(), "[::1]:5");
        assert!(parse_instance_url("ftp://h").is_err());
        assert!(parse_instance_url("http://h:1/api").is_err());
        assert!(parse_instance_url("http://h:99999").is_err());
        let named = parse_instance_url("https://gpu-3.internal:11434").unwrap();
        assert_eq!((named.host.as_str(), named.tls), ("gpu-3.internal", true));
        assert_eq!(named.literal(), None);
        assert_eq!(v6.literal(), Some("[::1]:5".parse().unwrap()));
        assert_eq!(
            parse_instance_url("10.0.0.5:7").unwrap().literal(),
            Some("10.0.0.5:7".parse().unwrap())
        );
        assert!(parse_instance_url("http://ollama.:1").is_ok());
        for bad in [
            "http://::1:5",
            "http://[nope]:5",
            "http://a b:1",
            "http://a..b:1",
            "http://ollama%:1",
        ] {
            assert!(parse_instance_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn same_upstream_ignores_case_and_final_dot() {
        let a = parse_instance_url("http://Ollama.:1").unwrap();
        assert!(a.same_as(&parse_instance_url("http://ollama:1").unwrap()));
        assert!(!a.same_as(&parse_instance_url("https://ollama:1").unwrap()));
    }
}
