//! The two listeners (`listen`, `admin.listen`): addresses to bind, which must not collide.

use super::overrides::{blame, Overrides};
use super::{file, ConfigError};
use std::net::SocketAddr;

/// The validated listening addresses.
pub(super) struct Listeners {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

/// Parses both addresses (overrides already applied) and refuses two that would fight over a
/// port, blaming the flag or variable a value came from.
pub(super) fn validate(
    file: &file::Config,
    source: &str,
    overrides: &Overrides,
) -> Result<Listeners, ConfigError> {
    let listen = listen_addr(source, "listen", overrides.listen_from, &file.listen)?;
    let admin_listen = listen_addr(
        source,
        "admin.listen",
        overrides.admin_listen_from,
        &file.admin.listen,
    )?;
    if listeners_overlap(listen, admin_listen) {
        let listen_named = match overrides.listen_from {
            Some(from) => format!("`listen` ({listen}, from {from})"),
            None => format!("`listen` ({listen})"),
        };
        let message = if listen == admin_listen {
            format!("must differ from {listen_named}")
        } else {
            format!(
                "{admin_listen} overlaps {listen_named}: a wildcard address takes port {} on every address; give the two listeners different ports",
                listen.port()
            )
        };
        return Err(blame(
            source,
            "admin.listen",
            overrides.admin_listen_from,
            message,
        ));
    }
    Ok(Listeners {
        proxy: listen,
        admin: admin_listen,
    })
}

/// Parses a listening address: an IP address and port, or `localhost:port` (bound as
/// 127.0.0.1). Other host names are refused: a listener binds one address, and a name may
/// resolve to several or change.
pub fn parse_listen_addr(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let example = "expected an address like `127.0.0.1:11434` or `[::1]:11434`";
    match value.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| format!("{example}, got `{value}` (bad port `{port}`)")),
        Some((host, port))
            if port.parse::<u16>().is_ok()
                && !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') =>
        {
            Err(format!(
                "`{value}`: `{host}` is a host name; a listener takes an IP address (`127.0.0.1:{port}` for this host only, `0.0.0.0:{port}` for every interface; `localhost` means 127.0.0.1)"
            ))
        }
        _ => Err(format!("{example}, got `{value}`")),
    }
}

/// One listening address, its error blamed on the flag or variable it came from, if any.
pub(super) fn listen_addr(
    source: &str,
    key: &str,
    from: Option<&str>,
    value: &str,
) -> Result<SocketAddr, ConfigError> {
    parse_listen_addr(value).map_err(|m| blame(source, key, from, m))
}

/// Whether two listeners would fight over one port: the same address, or a wildcard
/// (`0.0.0.0`, `[::]`) that takes the port on the other's address too. Linux's `[::]` is
/// dual-stack by default, so it covers IPv4 addresses as well.
fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || w.is_ipv4() == o.is_ipv4())
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::parse_err;
    use crate::config::{effective_yaml, parse, Overrides};

    #[test]
    fn bad_listen_and_overrides() {
        assert!(
            parse_err("listen: nowhere\ninstances:\n  - name: a\n    url: x:1\n")
                .contains("test.yaml: listen: expected an address")
        );
        let c = parse(
            "instances:\n  - name: a\n    url: x:1\n",
            "t",
            &Overrides {
                listen: Some("127.0.0.1:9999".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert!(effective_yaml(&c).contains("listen: 127.0.0.1:9999"));
    }

    #[test]
    fn overlapping_listeners() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listeners_overlap(a("0.0.0.0:5"), a("127.0.0.1:5")));
        assert!(listeners_overlap(a("127.0.0.1:5"), a("0.0.0.0:5")));
        assert!(
            listeners_overlap(a("[::]:5"), a("127.0.0.1:5")),
            "dual-stack"
        );
        assert!(
            !listeners_overlap(a("0.0.0.0:5"), a("[::1]:5")),
            "another family"
        );
        assert!(!listeners_overlap(a("127.0.0.1:5"), a("127.0.0.2:5")));
        assert!(!listeners_overlap(a("0.0.0.0:5"), a("0.0.0.0:6")));
    }
}
