//! API keys: where a client puts one (`Authorization: Bearer`, `x-api-key`) and which configured
//! key it is. Keys are compared as SHA-256 digests in constant time; the key itself is never
//! stored, logged or forwarded.

use crate::config::sha256;
use pingora_http::RequestHeader;
use subtle::ConstantTimeEq;

pub const X_API_KEY: &str = "x-api-key";

/// The secret in `Authorization: Bearer <secret>`, if that is what the header holds.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let v = value.trim_ascii();
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let secret = v[7..].trim_ascii();
    (!secret.is_empty()).then_some(secret)
}

/// The credentials a request presents, in the order they are tried: each with the header it
/// came in.
pub fn presented(req: &RequestHeader) -> Vec<(http::HeaderName, &[u8])> {
    let mut out = Vec::new();
    for v in req.headers.get_all(http::header::AUTHORIZATION) {
        if let Some(secret) = bearer(v.as_bytes()) {
            out.push((http::header::AUTHORIZATION, secret));
        }
    }
    for v in req.headers.get_all(X_API_KEY) {
        let secret = v.as_bytes().trim_ascii();
        if !secret.is_empty() {
            out.push((http::HeaderName::from_static(X_API_KEY), secret));
        }
    }
    out
}

/// The index of the configured digest equal to SHA-256(`secret`), comparing every digest in
/// constant time (no early exit on the first match).
pub fn find(digests: &[[u8; 32]], secret: &[u8]) -> Option<usize> {
    let hash = sha256(secret);
    let mut found = None;
    for (i, d) in digests.iter().enumerate() {
        if bool::from(d.ct_eq(&hash)) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Whether a header value carries one of the configured keys (so it must not go upstream).
pub fn carries_key(digests: &[[u8; 32]], name: &http::HeaderName, value: &[u8]) -> bool {
    let secret = if name == http::header::AUTHORIZATION {
        match bearer(value) {
            Some(s) => s,
            None => return false,
        }
    } else {
        value.trim_ascii()
    };
    find(digests, secret).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc  "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn finds_keys() {
        let digests = [sha256(b"first-key-0123456"), sha256(b"second-key-012345")];
        assert_eq!(find(&digests, b"second-key-012345"), Some(1));
        assert_eq!(find(&digests, b"second-key-01234"), None);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("authorization", "Bearer nope").unwrap();
        req.insert_header("x-api-key", "first-key-0123456").unwrap();
        let p = presented(&req);
        assert_eq!(p.len(), 2);
        assert!(!carries_key(&digests, &p[0].0, b"Bearer nope"));
        assert!(carries_key(&digests, &p[1].0, b"first-key-0123456"));
    }
}
