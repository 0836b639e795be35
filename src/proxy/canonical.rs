//! The canonical view of a request: the path as Ollama's router will see it, computed once from
//! the exact bytes the sidecar forwards, so that every decision (classification, policy,
//! admission, dispatch, metrics labels) is about the request Ollama will actually run. What is
//! forwarded is never changed; only decisions read this view. The body's half of the view (the
//! fields Go's `encoding/json` binds) is `proxy/body.rs`, built when a decision reads the body.
//!
//! How Ollama reads a request target (Ollama's go.mod: Go 1.26, gin v1.10.0):
//! - Go's `net/http` parses the request line with `url.ParseRequestURI` (net/url `parse`): a
//!   control byte is an error (`stringContainsCTLByte`), the path is cut at the first `?`, a `#`
//!   stays part of the path, and `setPath` percent-decodes it with `unescape(.., encodePath)`:
//!   every `%XX` (including `%2F`) becomes its byte, once, and a `%` not followed by two hex
//!   digits is an error. Errors are a 400 from `net/http` before any handler.
//! - Ollama serves through `http.DefaultServeMux` (server/routes.go `Serve`: `http.Handle("/", h)`,
//!   `Handler: nil`). The mux (net/http server.go `findHandler`) cleans `URL.EscapedPath()` with
//!   `cleanPath` (path.Clean, trailing slash kept) and, when that changes it, answers a redirect
//!   to the cleaned path: no Ollama handler runs. CONNECT requests are not cleaned.
//! - Otherwise gin (`gin.Default()`, `UseRawPath` false, `RemoveExtraSlash` false) routes on the
//!   decoded `URL.Path`, byte for byte: see `proxy/route.rs`.
//!
//! Pingora 0.9.1 forwards `RequestHeader::raw_path()` verbatim (pingora-core
//! `http_req_header_to_wire`), after dropping a `#fragment` (pingora-http `parse_request_target`)
//! and percent-encoding the bytes httparse refuses in a request line
//! (`escape_illegal_request_line`): this view is computed from those forwarded bytes.

use std::borrow::Cow;

/// What Ollama's Go server does with a request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathView {
    /// gin routes on this decoded path (`URL.Path`, possibly not UTF-8).
    Routed(Vec<u8>),
    /// `ServeMux` answers a redirect to the cleaned path; no handler runs.
    Redirect(Vec<u8>),
}

impl PathView {
    /// The decoded path (for a redirect, the path before cleaning).
    pub fn decoded(&self) -> &[u8] {
        match self {
            PathView::Routed(p) | PathView::Redirect(p) => p,
        }
    }
}

/// Why the sidecar refuses a target itself (400): Go rejects it, or it is not a plain path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Absolute-form, asterisk-form or anything not starting with `/`.
    NotOriginForm,
    /// A byte below 0x20 or 0x7f (Go: `invalid control character in URL`).
    ControlByte,
    /// `%` not followed by two hex digits (Go: `invalid URL escape`).
    InvalidEscape,
}

impl PathRefusal {
    pub fn message(self) -> &'static str {
        match self {
            PathRefusal::NotOriginForm => {
                "ollama-sidecar: the request target must be a path starting with `/`"
            }
            PathRefusal::ControlByte => {
                "ollama-sidecar: the request path contains a control character"
            }
            PathRefusal::InvalidEscape => {
                "ollama-sidecar: the request path has an invalid percent-escape (`%` must be followed by two hex digits)"
            }
        }
    }
}

/// The canonical path view of a forwarded request target (`raw_path()`), for `method`.
pub fn path_view(method: &http::Method, target: &[u8]) -> Result<PathView, PathRefusal> {
    if target.first() != Some(&b'/') {
        return Err(PathRefusal::NotOriginForm);
    }
    if target.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(PathRefusal::ControlByte);
    }
    let raw = match memchr::memchr(b'?', target) {
        Some(i) => &target[..i],
        None => target,
    };
    let decoded = unescape(raw).ok_or(PathRefusal::InvalidEscape)?;
    if method == http::Method::CONNECT {
        return Ok(PathView::Routed(decoded));
    }
    // net/url `EscapedPath`: the raw path when it is a valid encoding, else Go's own escaping.
    let escaped: Cow<[u8]> = if valid_encoded(raw) {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(escape(&decoded))
    };
    if is_clean(&escaped) {
        Ok(PathView::Routed(decoded))
    } else {
        Ok(PathView::Redirect(decoded))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// net/url `unescape(s, encodePath)`: every `%XX` decoded once, `+` kept; `None` for a bad escape.
pub fn unescape(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hi = hex_value(*s.get(i + 1)?)?;
            let lo = hex_value(*s.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// net/url `shouldEscape(c, encodePath)`.
fn should_escape(c: u8) -> bool {
    !(c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'_'
                | b'.'
                | b'~'
                | b'$'
                | b'&'
                | b'+'
                | b','
                | b'/'
                | b':'
                | b';'
                | b'='
                | b'@'
        ))
}

/// net/url `validEncoded(s, encodePath)`.
fn valid_encoded(s: &[u8]) -> bool {
    s.iter().all(|&c| {
        matches!(
            c,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'['
                | b']'
                | b'%'
        ) || !should_escape(c)
    })
}

/// net/url `escape(s, encodePath)`: upper-case `%XX` for every byte `shouldEscape` names.
fn escape(s: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(s.len());
    for &c in s {
        if should_escape(c) {
            out.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether net/http `cleanPath` leaves a rooted path unchanged: `path.Clean` removes empty,
/// `.` and `..` segments and the trailing slash, which `cleanPath` puts back (one).
fn is_clean(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let segments: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
    let last = segments.len() - 1;
    segments.iter().enumerate().all(|(i, s)| match *s {
        b"" => i == last,
        b"." | b".." => false,
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn view(target: &str) -> Result<PathView, PathRefusal> {
        path_view(&Method::POST, target.as_bytes())
    }

    fn routed(p: &str) -> Result<PathView, PathRefusal> {
        Ok(PathView::Routed(p.as_bytes().to_vec()))
    }

    #[test]
    fn decoding_is_gos() {
        assert_eq!(view("/api/%70ull"), routed("/api/pull"));
        assert_eq!(view("/api%2Fpull"), routed("/api/pull"));
        assert_eq!(view("/api/pull?x=%zz"), routed("/api/pull"));
        assert_eq!(view("/api/pu+ll"), routed("/api/pu+ll"));
        // Decoded once: `%25` is a literal `%` for gin.
        assert_eq!(view("/api/%2570ull"), routed("/api/%70ull"));
        assert_eq!(
            view("/api/blobs/sha256%3Aab"),
            routed("/api/blobs/sha256:ab")
        );
        assert_eq!(view("/api/pull#x"), routed("/api/pull#x"));
        assert_eq!(
            view("/api/%FF"),
            Ok(PathView::Routed(b"/api/\xff".to_vec()))
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(view("/api/%7"), Err(PathRefusal::InvalidEscape));
        assert_eq!(view("/api/%zzpull"), Err(PathRefusal::InvalidEscape));
        assert_eq!(view("/api/%"), Err(PathRefusal::InvalidEscape));
        assert_eq!(view("http://h/api/pull"), Err(PathRefusal::NotOriginForm));
        assert_eq!(view("*"), Err(PathRefusal::NotOriginForm));
        assert_eq!(view("?a"), Err(PathRefusal::NotOriginForm));
        assert_eq!(view("/a\x01b"), Err(PathRefusal::ControlByte));
        assert_eq!(view("/a\x7f"), Err(PathRefusal::ControlByte));
    }

    #[test]
    fn servemux_cleaning_redirects() {
        for p in [
            "//api/pull",
            "/api//pull",
            "/api/./pull",
            "/api/x/../pull",
            "/api/pull/.",
            "/.",
        ] {
            assert!(matches!(view(p), Ok(PathView::Redirect(_))), "{p}");
        }
        // Cleaning runs on the escaped path: encoded dots and slashes are not segments there.
        assert_eq!(view("/api/%2e%2e/pull"), routed("/api/../pull"));
        assert_eq!(view("/api%2F%2Fpull"), routed("/api//pull"));
        assert_eq!(view("/api/pull/"), routed("/api/pull/"));
        // Not a valid encoding (`{`): Go re-escapes the decoded path, where `%2F` is a slash.
        assert!(matches!(view("/api%2F%2Fpull{"), Ok(PathView::Redirect(_))));
        assert!(matches!(view("/x%2F..%2Fapi{"), Ok(PathView::Redirect(_))));
        // CONNECT is never cleaned.
        assert_eq!(
            path_view(&Method::CONNECT, b"/api/./pull"),
            routed("/api/./pull")
        );
    }

    #[test]
    fn escaping_matches_net_url() {
        assert_eq!(
            escape(b"/a b?c{}!'()*"),
            b"/a%20b%3Fc%7B%7D%21%27%28%29%2A".to_vec()
        );
        assert!(valid_encoded(b"/a!'()*[]%41"));
        assert!(!valid_encoded(b"/a{"));
        assert!(!valid_encoded("/é".as_bytes()));
    }
}
