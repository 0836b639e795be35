//! Limits on the request head, checked before anything else looks at it. Pingora's own limits
//! (1 MiB of header, 256 fields) answer a bare 400 before any hook runs; these lower ones answer
//! in the route's error shape.

use crate::config::LimitsFile;
use crate::reject::Reject;
use pingora_http::RequestHeader;

/// Bytes of the request head as sent: the request line and each `name: value\r\n`.
pub fn head_bytes(req: &RequestHeader) -> u64 {
    let line = req.method.as_str().len() + 1 + req.raw_path().len() + " HTTP/1.1\r\n".len();
    let fields: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    (line + fields + 2) as u64
}

/// Deepest nesting of arrays and objects accepted in a JSON body routed by the sidecar (the
/// depth `serde_json` itself allows when it builds values).
pub const MAX_JSON_DEPTH: usize = 128;

/// Whether a JSON text nests arrays and objects deeper than `max` (strings are skipped). The
/// body parser skips fields it does not read without a depth limit, so this is checked apart.
pub fn json_too_deep(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = body.get(at) {
        match byte {
            b'"' => match string_end(body, at + 1) {
                Some(end) => at = end,
                // An unterminated string: the parser refuses the body.
                None => return false,
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    false
}

/// The index of the quote that ends the string starting at `from`. Strings are most of a large
/// body (message text, base64 images): `memchr2` skips them many bytes at a time.
fn string_end(body: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let found = from + memchr::memchr2(b'"', b'\\', body.get(from..)?)?;
        if body[found] == b'"' {
            return Some(found);
        }
        // A backslash escapes the next byte, whatever it is.
        from = found + 2;
    }
}

/// The refusal for a request head over a limit: 414 (target), 431 (fields), or 400 for a
/// request target with bytes outside printable ASCII (which Pingora lets through).
pub fn check(limits: &LimitsFile, req: &RequestHeader) -> Option<Reject> {
    if !req.raw_path().iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Some(Reject::InvalidTarget(
            "ollama-sidecar: the request target has bytes outside printable ASCII".to_string(),
        ));
    }
    let target = req.raw_path().len() as u64;
    if target > limits.max_uri_bytes.0 {
        return Some(Reject::UriTooLong {
            bytes: target,
            limit: limits.max_uri_bytes,
        });
    }
    let count = req.headers.len();
    if count > limits.max_headers {
        return Some(Reject::TooManyHeaders {
            count,
            limit: limits.max_headers,
        });
    }
    let bytes = head_bytes(req);
    if bytes > limits.max_header_bytes.0 {
        return Some(Reject::HeaderTooLarge {
            bytes,
            limit: limits.max_header_bytes,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    #[test]
    fn limits() {
        let limits = LimitsFile {
            max_headers: 2,
            max_uri_bytes: ByteSize(300),
            max_header_bytes: ByteSize(1024),
            ..LimitsFile::default()
        };
        let mut req = RequestHeader::build("GET", b"/api/tags", None).unwrap();
        req.insert_header("a", "1").unwrap();
        assert!(check(&limits, &req).is_none());
        req.insert_header("b", "1").unwrap();
        req.insert_header("c", "1").unwrap();
        assert_eq!(check(&limits, &req).unwrap().status(), 431);
        let long = format!("/{}", "x".repeat(400));
        let req = RequestHeader::build("GET", long.as_bytes(), None).unwrap();
        assert_eq!(check(&limits, &req).unwrap().status(), 414);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("big", "y".repeat(1100)).unwrap();
        assert_eq!(check(&limits, &req).unwrap().status(), 431);
    }

    #[test]
    fn depth() {
        assert!(!json_too_deep(br#"{"a":[{"b":[1]}]}"#, 4));
        assert!(json_too_deep(br#"{"a":[{"b":[[1]]}]}"#, 4));
        // Brackets inside strings do not count, escaped quotes do not end them.
        assert!(!json_too_deep(br#"{"a":"[[[[[[\"[[[["}"#, 2));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(json_too_deep(deep.as_bytes(), MAX_JSON_DEPTH));
    }
}
