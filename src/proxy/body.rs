//! The body's half of the canonical request view: the JSON fields a decision reads (`model`, the
//! legacy `name`, `stream`, create's `from`, copy's `source`/`destination`), bound the way Ollama
//! binds them. Everything else in the body is skipped, never copied or re-encoded.
//!
//! Ollama binds bodies with gin's `ShouldBindJSON`, i.e. Go's `encoding/json` into the route's
//! struct (api/types.go). In `decode.go` `object()`, a key selects the field whose name matches
//! exactly, else the one whose `foldName` (fold.go, Go >= 1.21) is equal: ASCII letters are
//! upper-cased, other runes map to the smallest rune of their `unicode.SimpleFold` orbit. The only
//! non-ASCII runes whose orbit holds an ASCII letter are U+017F `ſ` (orbit S s ſ) and U+212A
//! KELVIN SIGN (orbit K k K): unicode/tables.go `asciiFold` maps `k` to U+212A and `s` to U+017F,
//! and `caseOrbit` keeps U+0130 `İ` and U+0131 `ı` as orbits of one rune, so they match nothing.
//! Every matching key sets the field, in order (the last wins; `null` leaves a string as it was
//! and resets a `*bool`).
//!
//! Where Go's outcome hangs on that order the sidecar does not guess: two keys that bind the same
//! field with different values are refused (400), as are JSON that is invalid for serde_json
//! (invalid UTF-8 included, which Go would replace with U+FFFD), a top level that is not an
//! object, trailing data after it (Go's decoder reads the first value only), and a bound field of
//! the wrong type (Go answers 400 for it too).

use crate::keep_alive::KeepAlive;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::fmt;

/// A body field a decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Model,
    /// The deprecated `name` of pull, push, show, delete and create (`cmp.Or(req.Model, req.Name)`).
    Name,
    Stream,
    /// create's base model.
    From,
    Source,
    Destination,
    /// The native inference routes' `keep_alive` (`*api.Duration`).
    KeepAlive,
}

impl Field {
    /// The JSON name (the struct tag).
    pub fn json_name(self) -> &'static str {
        match self {
            Field::Model => "model",
            Field::Name => "name",
            Field::Stream => "stream",
            Field::From => "from",
            Field::Source => "source",
            Field::Destination => "destination",
            Field::KeepAlive => "keep_alive",
        }
    }

    /// Whether the field's value is a model name (for the allow-lists).
    pub fn names_model(self) -> bool {
        !matches!(self, Field::Stream | Field::KeepAlive)
    }
}

/// What the body says, as Ollama will bind it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFacts {
    /// The model the handler uses: `model`, else the legacy `name` where the route binds one.
    pub model: Option<String>,
    /// `None` when the body does not say (each route has its own default).
    pub stream: Option<bool>,
    /// Every model name the body binds (model, name, from, source, destination), non-empty.
    pub models: Vec<String>,
    /// The session `keep_alive` gives the model; `None` when the body names none.
    pub keep_alive: Option<KeepAlive>,
}

/// One rune as Go's `foldName` maps it, for the runes that can equal an ASCII letter's fold.
fn go_fold(c: char) -> char {
    match c {
        '\u{017F}' => 'S',
        '\u{212A}' => 'K',
        c => c.to_ascii_uppercase(),
    }
}

/// Whether Go's `encoding/json` binds `key` to the struct field tagged `name` (ASCII).
pub fn key_binds(key: &str, name: &str) -> bool {
    let mut key = key.chars();
    for expected in name.chars() {
        match key.next() {
            Some(c) if go_fold(c) == go_fold(expected) => {}
            _ => return false,
        }
    }
    key.next().is_none()
}

/// A bound value: a string field's string (or `null`), a `stream` flag (or `null`), a
/// `keep_alive` (`None`: `null`, or a value Ollama refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bound {
    Text(Option<String>),
    Flag(Option<bool>),
    Session(Option<KeepAlive>),
}

struct KeySeed<'f>(&'f [Field]);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<Field>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<Field>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self
            .0
            .iter()
            .copied()
            .find(|f| key_binds(key, f.json_name())))
    }
}

struct Fields<'f>(&'f [Field]);

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Vec<(Field, Bound)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut bound: Vec<(Field, Bound)> = Vec::new();
        while let Some(field) = map.next_key_seed(KeySeed(self.0))? {
            let Some(field) = field else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let value = match field {
                Field::Stream => Bound::Flag(map.next_value()?),
                Field::KeepAlive => {
                    let value: serde_json::Value = map.next_value()?;
                    Bound::Session(KeepAlive::from_json(&value))
                }
                _ => Bound::Text(map.next_value()?),
            };
            if field == Field::KeepAlive {
                // No decision of the sidecar's hangs on it: the last key wins, as in Go.
                bound.retain(|(f, _)| *f != field);
                bound.push((field, value));
                continue;
            }
            match bound.iter().find(|(f, _)| *f == field) {
                Some((_, first)) if *first != value => {
                    return Err(de::Error::custom(format_args!(
                        "ambiguous request body: two keys set `{}` to different values (Go's JSON binding matches keys case-insensitively)",
                        field.json_name()
                    )));
                }
                Some(_) => {}
                None => bound.push((field, value)),
            }
        }
        Ok(bound)
    }
}

/// Reads the fields of `fields` as Ollama binds them; an error is a message for a 400 in the
/// route's shape.
pub fn inspect_fields(body: &[u8], fields: &[Field]) -> Result<BodyFacts, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("missing request body".to_string());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let bound = de::Deserializer::deserialize_map(&mut de, Fields(fields))
        .and_then(|b| de.end().map(|()| b))
        .map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                format!("invalid JSON in the request body: {e}")
            } else {
                format!("invalid request body: {e}")
            }
        })?;
    let text = |field: Field| {
        bound.iter().find_map(|(f, v)| match v {
            Bound::Text(Some(s)) if *f == field && !s.is_empty() => Some(s.clone()),
            _ => None,
        })
    };
    let stream = bound.iter().find_map(|(f, v)| match v {
        Bound::Flag(b) if *f == Field::Stream => *b,
        _ => None,
    });
    let keep_alive = bound.iter().find_map(|(f, v)| match v {
        Bound::Session(k) if *f == Field::KeepAlive => *k,
        _ => None,
    });
    Ok(BodyFacts {
        model: text(Field::Model).or_else(|| text(Field::Name)),
        stream,
        keep_alive,
        models: fields
            .iter()
            .filter(|f| f.names_model())
            .filter_map(|&f| text(f))
            .collect(),
    })
}

/// The inference routes' fields (`model`, `stream`).
pub fn inspect(body: &[u8]) -> Result<BodyFacts, String> {
    inspect_fields(body, &[Field::Model, Field::Stream])
}

/// `body`, a JSON object, with `member` (a `"key":value` pair) added as its last member: in Go's
/// binding a later key wins over an earlier one that binds the same field, whatever its case, so
/// `member` decides that field. `None` when `body` does not end as an object does.
pub fn append_member(body: &[u8], member: &[u8]) -> Option<bytes::Bytes> {
    let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[close] != b'}' {
        return None;
    }
    let before = body[..close]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())?;
    let mut out = bytes::BytesMut::with_capacity(body.len() + member.len() + 1);
    out.extend_from_slice(&body[..close]);
    if body[before] != b'{' {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(member);
    out.extend_from_slice(&body[close..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Field::*;

    #[test]
    fn a_member_is_appended_last() {
        let m = br#""k":1"#;
        assert_eq!(
            append_member(br#"{"a":2}"#, m).unwrap(),
            &br#"{"a":2,"k":1}"#[..]
        );
        assert_eq!(
            append_member(b" { } \n", m).unwrap(),
            &b" { \"k\":1} \n"[..]
        );
        assert!(append_member(b"[1]", m).is_none());
        assert!(append_member(b"   ", m).is_none());
    }

    #[test]
    fn keep_alive_binds_like_any_key_and_the_last_one_wins() {
        use crate::keep_alive::KeepAlive::*;
        let native = [Model, KeepAlive];
        let ka = |body: &str| inspect_fields(body.as_bytes(), &native).unwrap().keep_alive;
        assert_eq!(ka(r#"{"model":"m","keep_alive":0}"#), Some(UnloadWhenIdle));
        assert_eq!(
            ka(r#"{"model":"m","Keep_Alive":"0s"}"#),
            Some(UnloadWhenIdle)
        );
        assert_eq!(
            ka(r#"{"keep_alive":0,"KEEP_ALIVE":"5m"}"#),
            Some(For(std::time::Duration::from_secs(300)))
        );
        assert_eq!(ka(r#"{"keep_alive":0,"keep_alive":null}"#), None);
        assert_eq!(ka(r#"{"model":"m"}"#), None);
        // Not a model name: the allow-lists never see it.
        let f = inspect_fields(br#"{"model":"m","keep_alive":"1h"}"#, &native).unwrap();
        assert_eq!(f.models, ["m"]);
    }

    #[test]
    fn fields() {
        let f = inspect(br#"{"model":"llama3.2","messages":[],"stream":false}"#).unwrap();
        assert_eq!(f.model.as_deref(), Some("llama3.2"));
        assert_eq!(f.stream, Some(false));
        let show = [Model, Name];
        assert_eq!(
            inspect_fields(br#"{"name":"m"}"#, &show)
                .unwrap()
                .model
                .as_deref(),
            Some("m")
        );
        // Chat binds no `name`: Ollama never reads it there.
        assert_eq!(inspect(br#"{"name":"m"}"#).unwrap().model, None);
        assert_eq!(inspect(br#"{"prompt":"x"}"#).unwrap(), BodyFacts::default());
        // Escapes are decoded, so routing sees the real name.
        assert_eq!(
            inspect(br#"{"model":"a\u0062"}"#).unwrap().model.as_deref(),
            Some("ab")
        );
        let copy = inspect_fields(
            br#"{"source":"a","Destination":"b"}"#,
            &[Source, Destination],
        );
        assert_eq!(copy.unwrap().models, vec!["a", "b"]);
    }

    #[test]
    fn keys_fold_like_go() {
        for key in ["Model", "MODEL", "mODel", "mod\u{65}l"] {
            assert!(key_binds(key, "model"), "{key}");
        }
        assert!(key_binds("\u{17F}tream", "stream"));
        assert!(key_binds("STREAM", "stream"));
        assert!(key_binds("\u{212A}eep_alive", "keep_alive"));
        for key in [
            "model ",
            "mode",
            "modell",
            "m\u{f3}del",
            "nam\u{130}",
            "n\u{131}me",
        ] {
            assert!(!key_binds(key, "model") && !key_binds(key, "name"), "{key}");
        }
        let f = inspect(br#"{"Model":"llama3.2","\u017ftream":false}"#).unwrap();
        assert_eq!(
            (f.model.as_deref(), f.stream),
            (Some("llama3.2"), Some(false))
        );
    }

    #[test]
    fn conflicting_duplicates_are_refused() {
        let err = inspect(br#"{"model":"qwen2.5:0.5b","MODEL":"llama3.2"}"#).unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(inspect(br#"{"model":"a","model":null}"#).is_err());
        assert!(inspect(br#"{"stream":true,"Stream":false}"#).is_err());
        // The same value twice is what Go binds either way.
        let f = inspect(br#"{"model":"a","Model":"a"}"#).unwrap();
        assert_eq!(f.model.as_deref(), Some("a"));
    }

    #[test]
    fn bad_bodies() {
        assert!(inspect(b"").unwrap_err().contains("missing"));
        assert!(inspect(b"{").unwrap_err().contains("invalid JSON"));
        assert!(inspect(br#"{"model":5}"#)
            .unwrap_err()
            .contains("invalid type"));
        assert!(inspect(br#"{"MODEL":[]}"#).is_err());
        assert!(inspect(br#"{"stream":"yes"}"#)
            .unwrap_err()
            .contains("invalid type"));
        assert!(inspect(b"[1,2]").is_err());
        assert!(inspect(br#"{"model":"a"} {"model":"b"}"#).is_err());
        assert!(inspect(&[0xff, 0xfe]).is_err());
        assert!(inspect(b"{\"mo\xffdel\":\"a\"}").is_err());
        let deep = "[".repeat(10_000);
        assert!(inspect(deep.as_bytes()).is_err());
    }
}
