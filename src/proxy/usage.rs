//! Token counts the client did not ask for. An OpenAI-style stream (`/v1/chat/completions`,
//! `/v1/completions`) reports its usage only when the client sets
//! `stream_options.include_usage`; without the counts a key's token budget could not be charged.
//! So the sidecar asks Ollama for them on the client's behalf and takes the answer back out:
//!
//! - [`ask_for_usage`] appends `"stream_options":{"include_usage":true}` to a streamed request
//!   whose own binding leaves it false. Go's `encoding/json` lets a later key win, and a second
//!   `stream_options` object is decoded into the same struct (Ollama `openai.StreamOptions`,
//!   a pointer field of `ChatCompletionRequest` / `CompletionRequest`), so the appended key is
//!   what Ollama sees whatever the client wrote.
//! - [`UsageStrip`] removes the one event that the option adds (Ollama `middleware/openai.go`,
//!   `ChatWriter.writeResponse` / `CompleteWriter.writeResponse`: after the finish chunk, one
//!   chunk with an empty `choices` and the `usage`; the other chunks are the same with or
//!   without the option, their `usage` being `omitempty`). The client gets the bytes it would
//!   have got from Ollama directly; the tap reads the counts before the event is removed.
//!
//! Why ask rather than count the streamed chunks: Ollama's counts are exact, and they include
//! the prompt, which the streamed chunks never reveal. Counting is the fallback for a stream
//! that ends before its counts (see `TapSummary::tokens_to_charge`).

use super::body::{append_member, key_binds};
use super::ctx::RequestCtx;
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::http::HttpTask;
use pingora_proxy::Session;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::fmt;

/// What is appended to a request body to ask for the usage chunk.
const ASK: &[u8] = br#""stream_options":{"include_usage":true}"#;

/// The routes whose streams carry usage only when asked (Ollama `middleware/openai.go`).
fn route_hides_usage(route_name: &str) -> bool {
    matches!(route_name, "/v1/chat/completions" | "/v1/completions")
}

/// The body the inference path sends upstream: `body`, or, for an OpenAI-style stream that did
/// not ask for usage, the body asking for it (and the strip enabled). A compressed body is sent
/// as it is. (The subrequest frames what it is handed: see `Dispatch::body_length`.)
pub(super) fn prepare(session: &Session, ctx: &mut RequestCtx, body: Bytes) -> Bytes {
    let headers = &session.req_header().headers;
    if !route_hides_usage(ctx.route.name) || headers.contains_key(http::header::CONTENT_ENCODING) {
        return body;
    }
    let Some(asked) = ask_for_usage(&body) else {
        return body;
    };
    ctx.usage_strip.enable();
    asked
}

/// The body to send instead of `body`, when the client streams without asking for usage:
/// the same object with the option appended as its last key. `None`: send `body` as it is (not
/// streamed, usage asked for already, or not a JSON object this can safely extend).
pub fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let facts = de::Deserializer::deserialize_map(&mut de, TopLevel).ok()?;
    de.end().ok()?;
    if facts.stream != Some(true) || facts.include_usage {
        return None;
    }
    append_member(body, ASK)
}

/// What the body binds of `stream` and `stream_options.include_usage`, as Go would.
#[derive(Default)]
struct Facts {
    stream: Option<bool>,
    include_usage: bool,
}

struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Facts;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Facts, A::Error> {
        let mut facts = Facts::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key_binds(&key, "stream") {
                // `null` leaves a Go bool as it was.
                if let Some(b) = map.next_value::<Option<bool>>()? {
                    facts.stream = Some(b);
                }
            } else if key_binds(&key, "stream_options") {
                // `null` resets the pointer; an object is decoded into the existing struct.
                let current = facts.include_usage;
                facts.include_usage = map.next_value_seed(Options(current))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(facts)
    }
}

/// `stream_options`: the `include_usage` it leaves, starting from the current value.
struct Options(bool);

impl<'de> DeserializeSeed<'de> for Options {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Options {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or null")
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut include = self.0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key_binds(&key, "include_usage") {
                if let Some(b) = map.next_value::<Option<bool>>()? {
                    include = b;
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(include)
    }
}

/// Removes the usage event the sidecar asked for from an SSE stream, and nothing else. An
/// event split across reads is held until its end arrives (Ollama writes each event whole, so
/// this is rare and short); everything else passes through at once.
#[derive(Debug, Default)]
pub struct UsageStrip {
    active: bool,
    /// The start of an event whose end has not arrived yet.
    carry: Vec<u8>,
}

impl UsageStrip {
    pub fn enable(&mut self) {
        self.active = true;
    }

    /// The part of `chunk` to relay; `end`: the stream is over, release whatever is held.
    pub fn filter(&mut self, chunk: Bytes, end: bool) -> Bytes {
        if !self.active {
            return chunk;
        }
        // The common case: whole events, no usage among them, nothing held.
        if self.carry.is_empty() && ends_event(&chunk) && !contains_usage(&chunk) {
            return chunk;
        }
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(&chunk);
        let mut out = BytesMut::with_capacity(data.len());
        let mut rest = &data[..];
        while let Some(len) = event_len(rest) {
            let (event, after) = rest.split_at(len);
            if !is_usage_event(event) {
                out.extend_from_slice(event);
            }
            rest = after;
        }
        if end {
            out.extend_from_slice(rest);
        } else {
            self.carry.extend_from_slice(rest);
        }
        out.freeze()
    }
}

impl UsageStrip {
    /// A response task on its way to the client, with the usage event taken out.
    pub fn relay_task(&mut self, task: HttpTask) -> HttpTask {
        match task {
            HttpTask::Body(Some(bytes), end) if self.active => {
                HttpTask::Body(Some(self.filter(bytes, end)), end)
            }
            HttpTask::Body(None, true) if !self.carry.is_empty() => {
                HttpTask::Body(Some(self.filter(Bytes::new(), true)), true)
            }
            task => task,
        }
    }
}

fn contains_usage(chunk: &[u8]) -> bool {
    memchr::memmem::find(chunk, b"\"usage\"").is_some()
}

fn ends_event(chunk: &[u8]) -> bool {
    chunk.is_empty() || chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n")
}

/// The length of the first complete event in `data` (through its blank line), if complete.
fn event_len(data: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(data, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(data, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The chunk `include_usage` adds: a `data:` object with an empty `choices` and a `usage`.
fn is_usage_event(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<IgnoredAny>>,
        usage: Option<IgnoredAny>,
    }
    let text = event.trim_ascii();
    let Some(data) = text.strip_prefix(b"data:") else {
        return false;
    };
    serde_json::from_slice::<Chunk>(data.trim_ascii())
        .is_ok_and(|c| c.usage.is_some() && c.choices.is_some_and(|c| c.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(body: &str) -> Option<String> {
        ask_for_usage(body.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn a_stream_without_the_option_is_asked_for_usage() {
        assert_eq!(
            asked(r#"{"model":"m","stream":true} "#).as_deref(),
            Some(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}} "#)
        );
        // Go's folding: `STREAM` binds `stream`.
        assert!(asked(r#"{"model":"m","STREAM":true}"#).is_some());
        // Asked for already (any case), or set false again by a later key.
        assert_eq!(
            asked(r#"{"stream":true,"Stream_Options":{"Include_Usage":true}}"#),
            None
        );
        assert!(asked(
            r#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":null}"#
        )
        .is_some());
        assert!(
            asked(r#"{"stream":true,"stream_options":{"include_usage":false}}"#).is_some(),
            "the appended key wins"
        );
    }

    #[test]
    fn other_bodies_are_sent_as_they_are() {
        assert_eq!(asked(r#"{"model":"m"}"#), None);
        assert_eq!(asked(r#"{"model":"m","stream":false}"#), None);
        assert_eq!(asked(r#"{"model":"m","stream":true"#), None, "not JSON");
        assert_eq!(asked(r#"[1]"#), None);
    }

    fn strip(chunks: &[&str]) -> String {
        let mut s = UsageStrip::default();
        s.enable();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let end = i + 1 == chunks.len();
            out.extend_from_slice(&s.filter(Bytes::copy_from_slice(c.as_bytes()), end));
        }
        String::from_utf8(out).unwrap()
    }

    const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const FINISH: &str = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn the_usage_event_is_removed_however_it_is_split() {
        let whole = [CONTENT, FINISH, USAGE, DONE].concat();
        let expected = [CONTENT, FINISH, DONE].concat();
        assert_eq!(strip(&[&whole]), expected);
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(strip(&[a, b]), expected, "cut at {cut}");
        }
        assert_eq!(strip(&[CONTENT, FINISH, USAGE, DONE]), expected);
    }

    #[test]
    fn everything_else_passes_untouched() {
        let error = "data: {\"error\":{\"message\":\"boom\"}}\n\n";
        assert_eq!(strip(&[CONTENT, error]), [CONTENT, error].concat());
        // A stream cut before its end releases what it held.
        assert_eq!(
            strip(&[CONTENT, "data: {\"choi"]),
            [CONTENT, "data: {\"choi"].concat()
        );
        let mut off = UsageStrip::default();
        let b = off.filter(Bytes::from_static(USAGE.as_bytes()), false);
        assert_eq!(&b[..], USAGE.as_bytes(), "inactive: nothing removed");
    }
}
