//! What Go's `net/http` server does with a request target before Ollama's gin router
//! sees it (Ollama registers gin on `http.DefaultServeMux`: server/routes.go `Serve`,
//! `http.Handle("/", h)` with `Handler: nil`).
//!
//! - net/http request.go `readRequest` parses the target with `url.ParseRequestURI`;
//!   url.go `setPath` decodes every `%XX` (including `%2F`) into `URL.Path` and keeps the
//!   raw form as `RawPath` only when it differs from `escape(Path)`. A bad escape is an
//!   error, and the server answers `400 Bad Request` and closes (server.go `serve`).
//! - server.go `ServeMux.findHandler` (Go 1.22+ mux, Go 1.26 as Ollama's go.mod pins)
//!   cleans `URL.EscapedPath()` with `cleanPath` (path.Clean, trailing slash kept) and
//!   answers 301 to the cleaned path when it differs. The cleaned *escaped* path is put in
//!   `url.URL{Path: ...}` and re-escaped, so `%` comes out as `%25` (golang/go#79897,
//!   present in go1.26.4).
//! - Redirect `Location`s go through server.go `Redirect`: path.Clean with the trailing
//!   slash kept, the query re-attached, non-ASCII hex-escaped.

/// url.go `shouldEscape(c, encodePath)`.
fn should_escape_path(c: u8) -> bool {
    if c.is_ascii_alphanumeric() {
        return false;
    }
    // Unreserved marks, and the reserved characters a path may carry as they are.
    !matches!(
        c,
        b'-' | b'_' | b'.' | b'~' | b'$' | b'&' | b'+' | b',' | b'/' | b':' | b';' | b'=' | b'@'
    )
}

/// url.go `escape(s, encodePath)`.
pub fn escape_path(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s {
        if should_escape_path(c) {
            out.push_str(&format!("%{c:02X}"));
        } else {
            out.push(c as char);
        }
    }
    out
}

/// url.go `unescape(s, encodePath)`: every `%XX` decoded, `+` kept; a `%` not followed by
/// two hex digits is an error.
pub fn unescape_path(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// url.go `validEncoded(s, encodePath)`.
fn valid_encoded(s: &str) -> bool {
    s.bytes().all(|c| {
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
        ) || !should_escape_path(c)
    })
}

/// A request target as Go's `url.URL` holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct GoUrl {
    /// `URL.Path`: fully decoded (invalid UTF-8 kept as U+FFFD only for display).
    pub path: String,
    /// `URL.EscapedPath()`.
    pub escaped: String,
    /// `URL.RawQuery`, and whether a bare `?` was sent (`ForceQuery`).
    pub raw_query: String,
    pub force_query: bool,
    /// `scheme://host` of an absolute-form target, else empty.
    pub origin: String,
}

/// Decode the path of a request target (origin-form path, or the path of an absolute-form
/// target) like `url.ParseRequestURI`. `None` when Go rejects it.
pub fn parse(raw_path: &str, query: Option<&str>, origin: &str) -> Option<GoUrl> {
    // stringContainsCTLByte: hyper already refuses these, checked again for clarity.
    if raw_path.bytes().any(|c| c < 0x20 || c == 0x7f) {
        return None;
    }
    let decoded = unescape_path(raw_path)?;
    // EscapedPath: RawPath (the bytes as sent) when it is a valid encoding, else escape(Path).
    let escaped = if valid_encoded(raw_path) {
        raw_path.to_string()
    } else {
        escape_path(&decoded)
    };
    let (raw_query, force_query) = match query {
        Some("") => (String::new(), true),
        Some(q) => (q.to_string(), false),
        None => (String::new(), false),
    };
    Some(GoUrl {
        path: String::from_utf8_lossy(&decoded).into_owned(),
        escaped,
        raw_query,
        force_query,
        origin: origin.to_string(),
    })
}

/// path.Clean.
pub fn path_clean(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

/// server.go `cleanPath`: path.Clean of a rooted path, keeping a trailing slash.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let rooted = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    };
    let mut np = path_clean(&rooted);
    if rooted.ends_with('/') && np != "/" {
        np.push('/');
    }
    np
}

/// The ServeMux sanitising redirect, when the escaped path is not clean: the 301's target.
pub fn mux_redirect(u: &GoUrl) -> Option<String> {
    let cleaned = clean_path(&u.escaped);
    if cleaned == u.escaped {
        return None;
    }
    // url.URL{Path: cleaned, RawQuery: ...}.String(): the escaped path escaped again.
    let mut target = escape_path(cleaned.as_bytes());
    if !u.raw_query.is_empty() {
        target.push('?');
        target.push_str(&u.raw_query);
    }
    Some(redirect_location(&target))
}

/// server.go `Redirect`: a path-absolute URL is cleaned (trailing slash kept) and its
/// query re-attached; non-ASCII bytes are hex-escaped (`hexEscapeNonASCII`).
pub fn redirect_location(url: &str) -> String {
    let has_scheme = url
        .split_once(':')
        .is_some_and(|(s, _)| !s.is_empty() && !s.contains('/') && !s.contains('?'));
    let url = if has_scheme || url.starts_with("//") {
        url.to_string()
    } else {
        let (path, query) = match url.find('?') {
            Some(i) => (&url[..i], &url[i..]),
            None => (url, ""),
        };
        let mut cleaned = path_clean(path);
        if path.ends_with('/') && !cleaned.ends_with('/') {
            cleaned.push('/');
        }
        format!("{cleaned}{query}")
    };
    let mut out = String::with_capacity(url.len());
    for &c in url.as_bytes() {
        if c >= 0x80 {
            out.push_str(&format!("%{c:02x}"));
        } else {
            out.push(c as char);
        }
    }
    out
}

/// server.go `htmlEscape` (the redirect body's link).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(raw: &str) -> GoUrl {
        let (p, q) = match raw.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (raw, None),
        };
        parse(p, q, "").expect(raw)
    }

    #[test]
    fn every_escape_is_decoded_into_path() {
        // setPath: URL.Path is the decoded form, %2F included.
        assert_eq!(url("/api/%70ull").path, "/api/pull");
        assert_eq!(url("/api%2Fpull").path, "/api/pull");
        assert_eq!(url("/api/blobs/sha256%3Aab").path, "/api/blobs/sha256:ab");
        // '+' is not a space in a path.
        assert_eq!(url("/a+b").path, "/a+b");
        // EscapedPath keeps the form that was sent when it is a valid encoding.
        assert_eq!(url("/api/%70ull").escaped, "/api/%70ull");
        // Invalid escapes: ParseRequestURI fails, Go answers 400.
        assert!(parse("/api/%zzpull", None, "").is_none());
        assert!(parse("/api/pull%", None, "").is_none());
        assert!(parse("/api/pull%4", None, "").is_none());
    }

    #[test]
    fn mux_sanitises_escaped_paths() {
        assert_eq!(mux_redirect(&url("/api/pull")), None);
        assert_eq!(mux_redirect(&url("/api/%70ull")), None);
        // An escaped dot or slash is not a path element for cleanPath.
        assert_eq!(mux_redirect(&url("/api/%2E%2E/api/pull")), None);
        assert_eq!(mux_redirect(&url("/api%2F%2Fpull")), None);
        assert_eq!(
            mux_redirect(&url("//api/pull")).as_deref(),
            Some("/api/pull")
        );
        assert_eq!(
            mux_redirect(&url("/api/./pull?x=1")).as_deref(),
            Some("/api/pull?x=1")
        );
        assert_eq!(
            mux_redirect(&url("/v1/../api/pull")).as_deref(),
            Some("/api/pull")
        );
        // The trailing slash survives cleaning.
        assert_eq!(
            mux_redirect(&url("/api//pull/")).as_deref(),
            Some("/api/pull/")
        );
        // golang/go#79897: the cleaned escaped path is escaped once more.
        assert_eq!(
            mux_redirect(&url("//api/%70ull")).as_deref(),
            Some("/api/%2570ull")
        );
    }

    #[test]
    fn path_clean_like_go() {
        for (i, o) in [
            ("", "."),
            ("/", "/"),
            ("/../a", "/a"),
            ("a/../..", ".."),
            ("/a/./b/../c//", "/a/c"),
        ] {
            assert_eq!(path_clean(i), o, "{i}");
        }
        assert_eq!(clean_path(""), "/");
        assert_eq!(clean_path("a/b/"), "/a/b/");
    }

    #[test]
    fn redirect_locations() {
        assert_eq!(redirect_location("/api/pull?x=1"), "/api/pull?x=1");
        assert_eq!(redirect_location("http://h/api/pull"), "http://h/api/pull");
        assert_eq!(redirect_location("/caf\u{e9}/"), "/caf%c3%a9/");
        assert_eq!(html_escape("/a?b=1&c=\"'"), "/a?b=1&amp;c=&#34;&#39;");
    }
}
