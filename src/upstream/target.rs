//! Where an instance's requests go: the addresses its name resolved to, the one in use, and the
//! `Host` header that goes with an address.
//!
//! Several addresses: the first one that answers is used and kept while it keeps answering; a
//! connect failure moves traffic to the next one (in the resolver's order, wrapping around), and
//! a new resolution keeps the address in use when it is still among the answers, else takes the
//! first.

use crate::config::UpstreamAddress;
use pingora_core::upstreams::peer::HttpPeer;
use std::net::SocketAddr;

/// The Pingora peer for a request to `addr`: TLS when the URL says `https`, with the host as
/// written for SNI and certificate verification (a name, not the address it resolved to).
pub fn http_peer(upstream: &UpstreamAddress, addr: SocketAddr) -> HttpPeer {
    HttpPeer::new(addr, upstream.tls, upstream.host.clone())
}

/// The `Host` headers of one instance: the authority as written, and the one sent when the
/// instance is reached on a loopback address.
///
/// Ollama listening on a loopback address refuses (403) a request whose `Host` is neither a
/// loopback, private or unspecified IP literal, nor an allowed name: `localhost`, the machine's
/// hostname, or a name ending in `.localhost`, `.local` or `.internal` (ollama/ollama
/// server/routes.go, `allowedHostsMiddleware` and `allowedHost`); on any other address it
/// accepts every `Host`. A loopback listener can only be reached through a loopback address, so
/// the written name goes upstream unless the address is loopback and the name is refused: then
/// `localhost:<port>`, which every Ollama accepts. Older Ollamas compare names case-sensitively,
/// newer ones lowercase them first; the check below is the case-sensitive one, which both accept.
#[derive(Debug, Clone)]
pub struct HostRule {
    written: String,
    on_loopback: String,
}

impl HostRule {
    pub fn new(upstream: &UpstreamAddress, machine_hostname: &str) -> HostRule {
        let written = upstream.host_header();
        let accepted =
            upstream.literal().is_some() || ollama_allows_name(&upstream.host, machine_hostname);
        let on_loopback = if accepted {
            written.clone()
        } else {
            format!("localhost:{}", upstream.port)
        };
        HostRule {
            written,
            on_loopback,
        }
    }

    /// The `Host` header for a request sent to `addr`.
    pub fn for_addr(&self, addr: SocketAddr) -> &str {
        if addr.ip().is_loopback() {
            &self.on_loopback
        } else {
            &self.written
        }
    }
}

/// Ollama's `allowedHost` for a name (not an IP literal), case-sensitive.
fn ollama_allows_name(name: &str, machine_hostname: &str) -> bool {
    name == "localhost"
        || (!machine_hostname.is_empty() && name == machine_hostname)
        || [".localhost", ".local", ".internal"]
            .iter()
            .any(|tld| name.ends_with(tld))
}

/// This machine's hostname (`gethostname(2)`), as Ollama's `os.Hostname()` reads it when it runs
/// beside the sidecar; empty when it cannot be read.
pub fn machine_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// The addresses of an instance and the one requests go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    list: Vec<SocketAddr>,
    current: usize,
}

impl Addresses {
    pub fn fixed(addr: SocketAddr) -> Addresses {
        Addresses {
            list: vec![addr],
            current: 0,
        }
    }

    /// The address in use, if the name has resolved.
    pub fn current(&self) -> Option<SocketAddr> {
        self.list.get(self.current).copied()
    }

    pub fn all(&self) -> &[SocketAddr] {
        &self.list
    }

    /// The address in use first, then the others in order: the order a health check tries them.
    pub fn in_trial_order(&self) -> Vec<SocketAddr> {
        let n = self.list.len();
        (0..n).map(|i| self.list[(self.current + i) % n]).collect()
    }

    /// Takes a new resolution (duplicates dropped, order kept); keeps the address in use when it
    /// is still there. Returns whether the address in use changed.
    pub fn replace(&mut self, mut list: Vec<SocketAddr>) -> bool {
        let before = self.current();
        let mut seen = std::collections::HashSet::new();
        list.retain(|a| seen.insert(*a));
        self.current = before
            .and_then(|b| list.iter().position(|a| *a == b))
            .unwrap_or(0);
        self.list = list;
        self.current() != before
    }

    /// Uses `addr` from now on (it answered); false when it is not one of the addresses.
    pub fn prefer(&mut self, addr: SocketAddr) -> bool {
        match self.list.iter().position(|a| *a == addr) {
            Some(i) => {
                self.current = i;
                true
            }
            None => false,
        }
    }

    /// `addr` refused a connection: when it is the one in use, move to the next. Returns the new
    /// address in use when it changed.
    pub fn failed(&mut self, addr: SocketAddr) -> Option<SocketAddr> {
        if self.list.len() < 2 || self.current() != Some(addr) {
            return None;
        }
        self.current = (self.current + 1) % self.list.len();
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_instance_url;

    fn rule(url: &str, hostname: &str) -> HostRule {
        HostRule::new(&parse_instance_url(url).unwrap(), hostname)
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_header_follows_ollamas_loopback_check() {
        // (url, the machine's hostname, the address, the Host sent)
        let cases = [
            // Names Ollama refuses on loopback are replaced there, kept elsewhere.
            (
                "http://ollama:11434",
                "box",
                "127.0.0.2:11434",
                "localhost:11434",
            ),
            (
                "http://ollama:11434",
                "box",
                "[::1]:11434",
                "localhost:11434",
            ),
            (
                "http://ollama:11434",
                "box",
                "10.1.2.3:11434",
                "ollama:11434",
            ),
            // Names it accepts go as written.
            ("http://localhost:7", "box", "127.0.0.1:7", "localhost:7"),
            ("http://gpu.local:7", "box", "127.0.0.1:7", "gpu.local:7"),
            (
                "http://a.b.internal:7",
                "box",
                "127.0.0.1:7",
                "a.b.internal:7",
            ),
            (
                "http://x.localhost:7",
                "box",
                "127.0.0.1:7",
                "x.localhost:7",
            ),
            ("http://box:7", "box", "127.0.0.1:7", "box:7"),
            // Case-sensitive (older Ollamas); a final dot is not the TLD; no hostname known.
            ("http://LOCALHOST:1", "box", "127.0.0.1:1", "localhost:1"),
            (
                "http://ollama.local.:1",
                "box",
                "127.0.0.1:1",
                "localhost:1",
            ),
            ("http://box:1", "", "127.0.0.1:1", "localhost:1"),
            // IP literals are always accepted.
            ("http://[::1]:5", "box", "[::1]:5", "[::1]:5"),
            ("http://127.0.0.1:5", "box", "127.0.0.1:5", "127.0.0.1:5"),
        ];
        for (url, hostname, addr, host) in cases {
            assert_eq!(
                rule(url, hostname).for_addr(a(addr)),
                host,
                "{url} at {addr}"
            );
        }
    }

    #[test]
    fn tls_peers_verify_the_name() {
        let upstream = parse_instance_url("https://gpu-3.internal:11434").unwrap();
        let peer = http_peer(&upstream, a("10.0.0.3:11434"));
        assert!(peer.is_tls());
        assert_eq!(peer.sni, "gpu-3.internal");
        assert_eq!(peer._address.to_string(), "10.0.0.3:11434");
        let plain = http_peer(
            &parse_instance_url("http://ollama:11434").unwrap(),
            a("172.18.0.2:11434"),
        );
        assert!(!plain.is_tls());
    }

    #[test]
    fn several_addresses() {
        let mut s = Addresses::default();
        assert_eq!(s.current(), None);
        assert!(s.replace(vec![a("[::1]:1"), a("127.0.0.1:1"), a("[::1]:1")]));
        assert_eq!(s.all().len(), 2, "duplicates dropped");
        assert_eq!(s.current(), Some(a("[::1]:1")), "the first");
        assert_eq!(s.in_trial_order(), vec![a("[::1]:1"), a("127.0.0.1:1")]);
        // A stale failure report changes nothing; a current one moves on, wrapping around.
        assert_eq!(s.failed(a("127.0.0.1:1")), None);
        assert_eq!(s.failed(a("[::1]:1")), Some(a("127.0.0.1:1")));
        assert_eq!(s.in_trial_order(), vec![a("127.0.0.1:1"), a("[::1]:1")]);
        // A new resolution keeps the address in use while it is listed.
        assert!(!s.replace(vec![a("127.0.0.3:1"), a("127.0.0.1:1")]));
        assert_eq!(s.current(), Some(a("127.0.0.1:1")));
        assert!(s.replace(vec![a("127.0.0.3:1")]));
        assert_eq!(s.current(), Some(a("127.0.0.3:1")));
        assert_eq!(s.failed(a("127.0.0.3:1")), None, "nowhere else to go");
        assert!(!s.prefer(a("127.0.0.9:1")));
        assert!(s.replace(Vec::new()));
        assert_eq!(s.current(), None);
        assert_eq!(
            Addresses::fixed(a("127.0.0.1:2")).current(),
            Some(a("127.0.0.1:2"))
        );
    }
}
