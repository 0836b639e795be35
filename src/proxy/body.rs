//! Reading what routing needs from a JSON request body: `model` (or legacy `name`) and `stream`.
//! Everything else in the body is skipped, never copied or re-encoded.

use serde::Deserialize;
use std::borrow::Cow;

/// What the body says about routing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    /// `None` when the body does not say (each route has its own default).
    pub stream: Option<bool>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Parses the routing fields; an error is a message for a 400 in the route's shape.
pub fn inspect(body: &[u8]) -> Result<BodyFacts, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("missing request body".to_string());
    }
    let fields: Fields = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("invalid JSON in the request body: {e}")
        } else {
            format!("invalid request body: {e}")
        }
    })?;
    let model = fields
        .model
        .filter(|m| !m.is_empty())
        .or(fields.name.filter(|n| !n.is_empty()))
        .map(Cow::into_owned);
    Ok(BodyFacts {
        model,
        stream: fields.stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let f = inspect(br#"{"model":"llama3.2","messages":[],"stream":false}"#).unwrap();
        assert_eq!(f.model.as_deref(), Some("llama3.2"));
        assert_eq!(f.stream, Some(false));
        assert_eq!(
            inspect(br#"{"name":"m"}"#).unwrap().model.as_deref(),
            Some("m")
        );
        assert_eq!(inspect(br#"{"prompt":"x"}"#).unwrap(), BodyFacts::default());
        // Escapes are decoded, so routing sees the real name.
        assert_eq!(
            inspect(br#"{"model":"a\u0062"}"#).unwrap().model.as_deref(),
            Some("ab")
        );
    }

    #[test]
    fn bad_bodies() {
        assert!(inspect(b"").unwrap_err().contains("missing"));
        assert!(inspect(b"{").unwrap_err().contains("invalid JSON"));
        assert!(inspect(br#"{"model":5}"#)
            .unwrap_err()
            .contains("invalid type"));
        assert!(inspect(br#"{"stream":"yes"}"#)
            .unwrap_err()
            .contains("invalid type"));
        assert!(inspect(b"[1,2]").is_err());
        assert!(inspect(&[0xff, 0xfe]).is_err());
        let deep = "[".repeat(10_000);
        assert!(inspect(deep.as_bytes()).is_err());
    }
}
