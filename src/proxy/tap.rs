//! The stream tap: reads the response chunks the relay forwards, as they pass, to find the first
//! token, the final token counts and in-band errors. It never delays or changes a chunk: the relay
//! forwards the chunk it was given, and the tap only looks at it.
//!
//! - **NDJSON** (`application/x-ndjson`, Ollama's native streams) and **SSE**
//!   (`text/event-stream`, the OpenAI and Anthropic routes) are read line by line. Complete lines
//!   inside a chunk are read in place; only a line split across chunks is copied (the trailing
//!   part, until its newline arrives). A line longer than [`MAX_LINE`] keeps only its last
//!   [`TAIL`] bytes, where Ollama writes the counts (after the `context` array).
//! - **JSON** (`application/json`, non-streamed answers): a body up to [`TAIL`] bytes (errors,
//!   short answers) is kept and parsed once by [`StreamTap::finish`]; of a longer one (an
//!   embedding, a long completion) only the last [`TAIL`] bytes are kept and scanned for the
//!   counts, which every API writes last. Parsing a whole embedding cost more than relaying it.
//! - Anything else is ignored.
//!
//! What counts as the first token: a native chunk with a non-empty `response`, `thinking`,
//! `message.content`, `message.thinking` or `message.tool_calls`; an OpenAI chunk with a non-empty
//! `choices[0].delta.content` (or `reasoning`, `tool_calls`, or `text` on `/v1/completions`); an
//! Anthropic `content_block_delta`; a Responses API `response.output_text.delta`.
//!
//! Counts: Ollama's final chunk (`prompt_eval_count`, `eval_count`, `eval_duration`,
//! `load_duration`, in nanoseconds), OpenAI `usage` (`prompt_tokens`, `completion_tokens`: the
//! streamed usage chunk of `stream_options.include_usage`, or the non-streamed answer), Anthropic
//! and Responses `usage` (`input_tokens`, `output_tokens`).

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// A streamed line longer than this keeps only its tail.
pub const MAX_LINE: usize = 1 << 20;
/// What is kept of an over-long line or body: enough for the counts at its end.
pub const TAIL: usize = 4096;

/// What a response said about itself.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TapSummary {
    /// When the chunk with the first token arrived (from the request's start).
    pub first_token: Option<Duration>,
    /// When the last chunk with a token arrived.
    pub last_token: Option<Duration>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Ollama's `eval_duration`: time spent generating the completion tokens.
    pub eval_duration: Option<Duration>,
    /// Ollama's `load_duration`: time spent loading the model for this request.
    pub load_duration: Option<Duration>,
    /// The message of an `{"error":...}` object in the body (in-band for a stream).
    pub error: Option<String>,
    /// The stream's end was seen (`done: true`, `[DONE]`, `message_stop`, `response.completed`).
    pub done: bool,
    /// The body was a stream (NDJSON or SSE).
    pub streamed: bool,
    /// Streamed chunks that carried output. Each carries at least one generated token, so this is
    /// a lower bound of the completion tokens when the stream ends before its counts.
    pub token_chunks: u64,
}

impl TapSummary {
    /// The tokens a key's budget is charged: Ollama's own counts; for a stream that ended
    /// before them (the client left, the instance broke), the output chunks seen (the prompt's
    /// count is unknown then, and not charged).
    pub fn tokens_to_charge(&self) -> u64 {
        let completion = self.completion_tokens.unwrap_or(self.token_chunks);
        self.prompt_tokens.unwrap_or(0) + completion
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    #[default]
    Off,
    Ndjson,
    Sse,
    Json,
}

#[derive(Debug, Default)]
pub struct StreamTap {
    mode: Mode,
    summary: TapSummary,
    /// The trailing partial line (NDJSON, SSE), or the body so far (JSON).
    partial: Vec<u8>,
    /// The partial line or body passed its limit: `partial` holds only its last bytes.
    overflowed: bool,
    finished: bool,
}

impl StreamTap {
    /// Called once with the response header's content type.
    pub fn start(&mut self, content_type: Option<&str>) {
        let media = content_type
            .and_then(|c| c.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase());
        self.mode = match media.as_deref() {
            Some("application/x-ndjson") => Mode::Ndjson,
            Some("text/event-stream") => Mode::Sse,
            Some("application/json") => Mode::Json,
            _ => Mode::Off,
        };
        self.summary.streamed = matches!(self.mode, Mode::Ndjson | Mode::Sse);
        self.partial.clear();
        self.overflowed = false;
        self.finished = false;
    }

    /// Called for each relayed body chunk, `at` after the request started.
    pub fn observe(&mut self, chunk: &[u8], at: Duration) {
        match self.mode {
            Mode::Off => {}
            Mode::Json => self.keep(chunk, TAIL),
            Mode::Ndjson | Mode::Sse => self.lines(chunk, at),
        }
    }

    /// Ends the body: reads a trailing line without its newline, and parses a JSON body. Called
    /// once the response is over (more calls do nothing); `at` is the time of the end.
    pub fn finish(&mut self, at: Duration) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.partial.is_empty() {
            return;
        }
        let kept = std::mem::take(&mut self.partial);
        match self.mode {
            Mode::Off => {}
            _ if self.overflowed => self.scan_tail(&kept),
            Mode::Json => {
                if let Ok(obj) = serde_json::from_slice::<Obj>(&kept) {
                    self.absorb(obj, at, false);
                }
            }
            Mode::Ndjson | Mode::Sse => self.line(&kept, at),
        }
    }

    pub fn summary(&self) -> &TapSummary {
        &self.summary
    }

    /// Appends to `partial`, keeping at most `limit` bytes; past it, only the last [`TAIL`].
    fn keep(&mut self, bytes: &[u8], limit: usize) {
        if !self.overflowed && self.partial.len() + bytes.len() <= limit {
            self.partial.extend_from_slice(bytes);
            return;
        }
        self.overflowed = true;
        if bytes.len() >= TAIL {
            self.partial.clear();
            self.partial.extend_from_slice(&bytes[bytes.len() - TAIL..]);
        } else {
            let keep = TAIL - bytes.len();
            if self.partial.len() > keep {
                self.partial.drain(..self.partial.len() - keep);
            }
            self.partial.extend_from_slice(bytes);
        }
    }

    fn lines(&mut self, mut chunk: &[u8], at: Duration) {
        if !self.partial.is_empty() || self.overflowed {
            // Complete the line that the previous chunk started.
            let Some(nl) = find_newline(chunk) else {
                self.keep(chunk, MAX_LINE);
                return;
            };
            self.keep(&chunk[..nl], MAX_LINE);
            let line = std::mem::take(&mut self.partial);
            let overflowed = std::mem::replace(&mut self.overflowed, false);
            if overflowed {
                self.scan_tail(&line);
            } else {
                self.line(&line, at);
            }
            // Reuse the allocation for the next partial line.
            self.partial = line;
            self.partial.clear();
            chunk = &chunk[nl + 1..];
        }
        while let Some(nl) = find_newline(chunk) {
            self.line(&chunk[..nl], at);
            chunk = &chunk[nl + 1..];
        }
        if !chunk.is_empty() {
            self.keep(chunk, MAX_LINE);
        }
    }

    /// One complete line (without its newline).
    fn line(&mut self, line: &[u8], at: Duration) {
        let line = trim(line);
        if line.is_empty() {
            return;
        }
        let json = match self.mode {
            Mode::Ndjson => {
                // After the first token, content chunks only need to be seen, not parsed.
                if self.summary.first_token.is_some() && line.ends_with(b"\"done\":false}") {
                    self.summary.last_token = Some(at);
                    self.summary.token_chunks += 1;
                    return;
                }
                line
            }
            Mode::Sse => {
                let Some(data) = line.strip_prefix(b"data:") else {
                    // `event:`, `id:`, `retry:` and comments: the data line says it all.
                    return;
                };
                let data = trim(data);
                if data == b"[DONE]" {
                    self.summary.done = true;
                    return;
                }
                if self.summary.first_token.is_some() && is_plain_sse_delta(data) {
                    self.summary.last_token = Some(at);
                    self.summary.token_chunks += 1;
                    return;
                }
                data
            }
            Mode::Json | Mode::Off => return,
        };
        if let Ok(obj) = serde_json::from_slice::<Obj>(json) {
            self.absorb(obj, at, true);
        }
    }

    fn absorb(&mut self, obj: Obj, at: Duration, streamed: bool) {
        let s = &mut self.summary;
        if let Some(message) = obj.error.and_then(|e| e.0) {
            s.error = Some(message);
        }
        let kind = obj.kind.as_deref();
        if kind == Some("error") {
            s.error.get_or_insert_with(|| "error".to_string());
        }
        let mut token = obj.response.as_ref().is_some_and(|r| r.text)
            || obj.thinking.is_some_and(|t| t.0)
            || obj.message.as_ref().is_some_and(|m| m.has_output())
            || obj.choices.as_ref().is_some_and(|c| c.0);
        match kind {
            Some("content_block_delta") | Some("response.output_text.delta") => token = true,
            Some("message_stop") | Some("response.completed") => s.done = true,
            _ => {}
        }
        if streamed && token {
            s.first_token.get_or_insert(at);
            s.last_token = Some(at);
            s.token_chunks += 1;
        }
        if obj.done == Some(true) {
            s.done = true;
        }
        // Ollama native counts.
        if let Some(n) = obj.prompt_eval_count {
            s.prompt_tokens = Some(n);
        }
        if let Some(n) = obj.eval_count {
            s.completion_tokens = Some(n);
        }
        if let Some(ns) = obj.eval_duration {
            s.eval_duration = Some(Duration::from_nanos(ns));
        }
        if let Some(ns) = obj.load_duration {
            s.load_duration = Some(Duration::from_nanos(ns));
        }
        // OpenAI, Anthropic and Responses usage; Anthropic's `message_start` carries it inside
        // `message`, the Responses API's `response.completed` inside `response`.
        for usage in [
            obj.usage.as_ref(),
            obj.message.as_ref().and_then(|m| m.usage.as_ref()),
            obj.response.as_ref().and_then(|r| r.usage.as_ref()),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(n) = usage.prompt_tokens.or(usage.input_tokens) {
                s.prompt_tokens = Some(n);
            }
            if let Some(n) = usage.completion_tokens.or(usage.output_tokens) {
                s.completion_tokens = Some(n);
            }
        }
    }

    /// The end of an over-long line or body: no JSON to parse, so look for the counts by key.
    fn scan_tail(&mut self, tail: &[u8]) {
        let found = TailKeys::scan(tail);
        let number = |key: TailKey| found.numbers[key as usize];
        let s = &mut self.summary;
        let prompt = number(TailKey::PromptEvalCount)
            .or(number(TailKey::PromptTokens))
            .or(number(TailKey::InputTokens));
        let completion = number(TailKey::EvalCount)
            .or(number(TailKey::CompletionTokens))
            .or(number(TailKey::OutputTokens));
        if prompt.is_some() {
            s.prompt_tokens = prompt;
        }
        if completion.is_some() {
            s.completion_tokens = completion;
        }
        if let Some(ns) = number(TailKey::EvalDuration) {
            s.eval_duration = Some(Duration::from_nanos(ns));
        }
        if let Some(ns) = number(TailKey::LoadDuration) {
            s.load_duration = Some(Duration::from_nanos(ns));
        }
        // `done` comes before the `context` array, so it may be gone; the durations are not.
        if found.done || number(TailKey::TotalDuration).is_some() {
            s.done = true;
        }
    }
}

/// The keys [`StreamTap::scan_tail`] reads, in [`TAIL_KEYS`]' order.
#[derive(Clone, Copy)]
enum TailKey {
    PromptEvalCount,
    PromptTokens,
    InputTokens,
    EvalCount,
    CompletionTokens,
    OutputTokens,
    EvalDuration,
    LoadDuration,
    TotalDuration,
}

const TAIL_KEYS: [&[u8]; 9] = [
    b"\"prompt_eval_count\":",
    b"\"prompt_tokens\":",
    b"\"input_tokens\":",
    b"\"eval_count\":",
    b"\"completion_tokens\":",
    b"\"output_tokens\":",
    b"\"eval_duration\":",
    b"\"load_duration\":",
    b"\"total_duration\":",
];

/// What one pass over a tail found: for each key, the number after its last occurrence.
struct TailKeys {
    numbers: [Option<u64>; TAIL_KEYS.len()],
    done: bool,
}

impl TailKeys {
    /// One pass over the quotes (few, in an embedding's or a context array's tail) instead of
    /// a substring search per key: this runs once per long non-streamed answer.
    fn scan(tail: &[u8]) -> TailKeys {
        let mut found = TailKeys {
            numbers: [None; TAIL_KEYS.len()],
            done: false,
        };
        for quote in memchr::memchr_iter(b'"', tail) {
            let rest = &tail[quote..];
            if rest.starts_with(b"\"done\":true") {
                found.done = true;
            } else if let Some(i) = TAIL_KEYS.iter().position(|key| rest.starts_with(key)) {
                found.numbers[i] = leading_number(&rest[TAIL_KEYS[i].len()..]);
            }
        }
        found
    }
}

/// An OpenAI content chunk (`..."finish_reason":null}]}`), an Anthropic text delta or a Responses
/// text delta: a token, and nothing else to learn from it once the first token is known.
fn is_plain_sse_delta(data: &[u8]) -> bool {
    (data.ends_with(b"\"finish_reason\":null}]}") && find(data, b"\"usage\":{").is_none())
        || data.starts_with(b"{\"type\":\"content_block_delta\"")
        || data.starts_with(b"{\"type\":\"response.output_text.delta\"")
}

fn find_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The unsigned integer at the start of `bytes` (after whitespace).
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let rest = trim(bytes);
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The JSON shapes read, with everything else skipped.
// ---------------------------------------------------------------------------------------------

/// One streamed object or a whole non-streamed answer, of any of the APIs.
#[derive(Deserialize, Default)]
struct Obj {
    /// Native generate: the text (a string); Responses API `response.completed`: an object.
    response: Option<ResponseField>,
    thinking: Option<NonEmpty>,
    message: Option<Message>,
    done: Option<bool>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    eval_duration: Option<u64>,
    load_duration: Option<u64>,
    error: Option<ErrorField>,
    choices: Option<FirstChoice>,
    usage: Option<Usage>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
struct Message {
    content: Option<NonEmpty>,
    thinking: Option<NonEmpty>,
    tool_calls: Option<NonEmpty>,
    /// Anthropic `message_start`.
    usage: Option<Usage>,
}

impl Message {
    fn has_output(&self) -> bool {
        [&self.content, &self.thinking, &self.tool_calls]
            .iter()
            .any(|f| f.is_some_and(|f| f.0))
    }
}

#[derive(Deserialize, Default)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct Choice {
    delta: Option<Delta>,
    /// `/v1/completions` chunks.
    text: Option<NonEmpty>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<NonEmpty>,
    reasoning: Option<NonEmpty>,
    reasoning_content: Option<NonEmpty>,
    tool_calls: Option<NonEmpty>,
}

/// Whether a value holds something: a non-empty string, array or object (never allocates).
#[derive(Clone, Copy, Default)]
struct NonEmpty(bool);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NonEmpty;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NonEmpty, E> {
                Ok(NonEmpty(!v.is_empty()))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<NonEmpty, E> {
                Ok(NonEmpty(!v.is_empty()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<NonEmpty, E> {
                Ok(NonEmpty(!v.is_empty()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
            fn visit_none<E: de::Error>(self) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NonEmpty, A::Error> {
                let mut any = false;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(NonEmpty(any))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NonEmpty, A::Error> {
                let mut any = false;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(NonEmpty(any))
            }
        }
        d.deserialize_any(V)
    }
}

/// `choices`: whether the first choice carries output.
#[derive(Default)]
struct FirstChoice(bool);

impl<'de> Deserialize<'de> for FirstChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstChoice;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_unit<E: de::Error>(self) -> Result<FirstChoice, E> {
                Ok(FirstChoice(false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstChoice, A::Error> {
                let first = seq.next_element::<Choice>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                let output = first.is_some_and(|c| {
                    c.text.is_some_and(|t| t.0)
                        || c.delta.is_some_and(|d| {
                            [d.content, d.reasoning, d.reasoning_content, d.tool_calls]
                                .iter()
                                .any(|f| f.is_some_and(|f| f.0))
                        })
                });
                Ok(FirstChoice(output))
            }
        }
        d.deserialize_any(V)
    }
}

/// Native `response`: the generated text; Responses API: the response object with `usage`.
#[derive(Default)]
struct ResponseField {
    text: bool,
    usage: Option<Usage>,
}

impl<'de> Deserialize<'de> for ResponseField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResponseField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ResponseField, E> {
                Ok(ResponseField {
                    text: !v.is_empty(),
                    usage: None,
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<ResponseField, E> {
                Ok(ResponseField::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResponseField, A::Error> {
                let mut usage = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "usage" {
                        usage = map.next_value::<Option<Usage>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ResponseField { text: false, usage })
            }
        }
        d.deserialize_any(V)
    }
}

/// `error`: a string (native), or an object with `message` (OpenAI, Anthropic).
struct ErrorField(Option<String>);

impl<'de> Deserialize<'de> for ErrorField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ErrorField, E> {
                Ok(ErrorField(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ErrorField, E> {
                Ok(ErrorField(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ErrorField, A::Error> {
                let mut message = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "message" {
                        message = map.next_value::<Option<String>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ErrorField(Some(
                    message.unwrap_or_else(|| "error".to_string()),
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `chunks`, chunk `i` at `i` ms, then finishes at 1 s.
    fn run(content_type: &str, chunks: &[&[u8]]) -> TapSummary {
        let mut tap = StreamTap::default();
        tap.start(Some(content_type));
        for (i, c) in chunks.iter().enumerate() {
            tap.observe(c, MS * i as u32);
        }
        tap.finish(Duration::from_secs(1));
        tap.summary().clone()
    }

    /// The body split at every byte position into two chunks, and into single bytes: the counts
    /// and error are the same as for the whole body; the first token arrives with the chunk that
    /// completes its line.
    fn every_split(content_type: &str, body: &[u8]) -> TapSummary {
        let whole = run(content_type, &[body]);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            let s = run(content_type, &[a, b]);
            assert_eq!(s.prompt_tokens, whole.prompt_tokens, "cut at {cut}");
            assert_eq!(s.completion_tokens, whole.completion_tokens, "cut at {cut}");
            assert_eq!(s.eval_duration, whole.eval_duration, "cut at {cut}");
            assert_eq!(s.load_duration, whole.load_duration, "cut at {cut}");
            assert_eq!(s.error, whole.error, "cut at {cut}");
            assert_eq!(s.done, whole.done, "cut at {cut}");
            assert_eq!(s.first_token.is_some(), whole.first_token.is_some());
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let s = run(content_type, &bytes);
        assert_eq!(
            (s.prompt_tokens, s.completion_tokens, &s.error, s.done),
            (
                whole.prompt_tokens,
                whole.completion_tokens,
                &whole.error,
                whole.done
            )
        );
        whole
    }

    const NDJSON: &str = "application/x-ndjson";
    const SSE: &str = "text/event-stream";

    fn native_chat() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":false}\n");
        for t in ["Hel", "lo", " \\\"w\\n\""] {
            b.extend_from_slice(format!("{{\"model\":\"m\",\"created_at\":\"t\",\"message\":{{\"role\":\"assistant\",\"content\":\"{t}\"}},\"done\":false}}\n").as_bytes());
        }
        b.extend_from_slice(b"{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true,\"total_duration\":9,\"load_duration\":2000000,\"prompt_eval_count\":26,\"prompt_eval_duration\":5,\"eval_count\":3,\"eval_duration\":1500000000}\n");
        b
    }

    #[test]
    fn native_chat_stream() {
        let body = native_chat();
        let s = every_split(NDJSON, &body);
        assert_eq!(s.prompt_tokens, Some(26));
        assert_eq!(s.completion_tokens, Some(3));
        assert_eq!(s.eval_duration, Some(Duration::from_millis(1500)));
        assert_eq!(s.load_duration, Some(Duration::from_millis(2)));
        assert!(s.done && s.streamed && s.error.is_none());
        assert_eq!(s.first_token, Some(Duration::ZERO));
    }

    #[test]
    fn first_token_is_the_first_chunk_with_content_not_the_first_byte() {
        let body = native_chat();
        let first_line_end = body.iter().position(|&b| b == b'\n').unwrap() + 1;
        let second_line_end = first_line_end
            + body[first_line_end..]
                .iter()
                .position(|&b| b == b'\n')
                .unwrap()
            + 1;
        // Chunk 0: the empty role chunk; chunk 1: half of the first token's line; chunk 2: rest.
        let mid = (first_line_end + second_line_end) / 2;
        let s = run(
            NDJSON,
            &[
                &body[..first_line_end],
                &body[first_line_end..mid],
                &body[mid..],
            ],
        );
        assert_eq!(s.first_token, Some(MS * 2));
        assert_eq!(s.completion_tokens, Some(3));
    }

    #[test]
    fn native_generate_with_thinking_and_context() {
        let mut body = Vec::new();
        body.extend_from_slice(b"{\"model\":\"m\",\"created_at\":\"t\",\"response\":\"\",\"thinking\":\"hmm\",\"done\":false}\n");
        body.extend_from_slice(
            b"{\"model\":\"m\",\"created_at\":\"t\",\"response\":\"x\",\"done\":false}\n",
        );
        body.extend_from_slice(b"{\"model\":\"m\",\"created_at\":\"t\",\"response\":\"\",\"done\":true,\"done_reason\":\"stop\",\"context\":[1,2,3],\"prompt_eval_count\":7,\"eval_count\":2,\"eval_duration\":100}\n");
        let s = every_split(NDJSON, &body);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(7), Some(2)));
        assert_eq!(s.first_token, Some(Duration::ZERO));
    }

    #[test]
    fn in_band_error_line() {
        let mut body = native_chat();
        body.truncate(body.len() / 2);
        let cut = body.iter().rposition(|&b| b == b'\n').unwrap() + 1;
        body.truncate(cut);
        body.extend_from_slice(
            b"{\"error\":\"an error was encountered while running the model\"}\n",
        );
        let s = every_split(NDJSON, &body);
        assert_eq!(
            s.error.as_deref(),
            Some("an error was encountered while running the model")
        );
        assert!(!s.done);
        assert_eq!(s.completion_tokens, None);
    }

    #[test]
    fn a_last_line_without_newline_is_read_at_finish() {
        let body = native_chat();
        let s = every_split(NDJSON, &body[..body.len() - 1]);
        assert_eq!(s.completion_tokens, Some(3));
    }

    #[test]
    fn an_over_long_final_line_keeps_its_counts() {
        let mut body = Vec::new();
        body.extend_from_slice(b"{\"model\":\"m\",\"response\":\"a\",\"done\":false}\n");
        body.extend_from_slice(b"{\"model\":\"m\",\"response\":\"\",\"done\":true,\"context\":[");
        let context: Vec<String> = (0..(MAX_LINE / 3))
            .map(|i| (i % 1000).to_string())
            .collect();
        body.extend_from_slice(context.join(",").as_bytes());
        body.extend_from_slice(
            b"],\"total_duration\":9,\"prompt_eval_count\":4000,\"eval_count\":321,\"eval_duration\":5}\n",
        );
        assert!(body.len() > MAX_LINE);
        for size in [1000, 4096, 65536, body.len()] {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            let s = run(NDJSON, &chunks);
            assert_eq!(
                (s.prompt_tokens, s.completion_tokens, s.done),
                (Some(4000), Some(321), true),
                "chunks of {size}"
            );
        }
    }

    fn openai_stream(usage: bool) -> Vec<u8> {
        let mut b = Vec::new();
        let head = "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[";
        b.extend_from_slice(format!("data: {head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n").as_bytes());
        for t in ["a", "b", "c", "d"] {
            b.extend_from_slice(format!("data: {head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n").as_bytes());
        }
        b.extend_from_slice(format!("data: {head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":\"stop\"}}]}}\n\n").as_bytes());
        if usage {
            b.extend_from_slice(format!("data: {head}],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":4,\"total_tokens\":15}}}}\n\n").as_bytes());
        }
        b.extend_from_slice(b"data: [DONE]\n\n");
        b
    }

    #[test]
    fn openai_stream_with_and_without_usage() {
        let s = every_split(SSE, &openai_stream(true));
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(11), Some(4)));
        assert!(s.done);
        assert_eq!(s.first_token, Some(Duration::ZERO));
        let s = every_split(SSE, &openai_stream(false));
        assert_eq!((s.prompt_tokens, s.completion_tokens), (None, None));
        assert!(s.done && s.first_token.is_some());
    }

    #[test]
    fn openai_stream_first_token_skips_the_role_chunk() {
        let body = openai_stream(true);
        let end = body.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let s = run(SSE, &[&body[..end], &body[end..]]);
        assert_eq!(s.first_token, Some(MS));
    }

    #[test]
    fn openai_in_band_error_and_crlf() {
        let body = b"data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\r\n\r\ndata: {\"error\":{\"message\":\"boom\",\"type\":\"api_error\",\"param\":null,\"code\":null}}\r\n\r\n";
        let s = every_split(SSE, body);
        assert_eq!(s.error.as_deref(), Some("boom"));
        assert!(s.first_token.is_some());
    }

    #[test]
    fn anthropic_stream() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":0}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let s = every_split(SSE, body.as_bytes());
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(12), Some(2)));
        assert!(s.done);
        // message_start is not a token.
        let parts: Vec<&str> = body.split_inclusive("\n\n").collect();
        let chunks: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        assert_eq!(run(SSE, &chunks).first_token, Some(MS * 2));
        let err = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"overloaded\"}}\n\n";
        assert_eq!(
            every_split(SSE, err.as_bytes()).error.as_deref(),
            Some("overloaded")
        );
    }

    #[test]
    fn responses_api_stream() {
        let body = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[{\"content\":[{\"text\":\"Hi\"}]}],\"usage\":{\"input_tokens\":5,\"output_tokens\":1,\"total_tokens\":6}}}\n\n",
        );
        let s = every_split(SSE, body.as_bytes());
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(5), Some(1)));
        assert!(s.done && s.first_token.is_some());
    }

    #[test]
    fn non_streamed_json_answers() {
        let native = br#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"Hello"},"done_reason":"stop","done":true,"total_duration":1,"load_duration":3,"prompt_eval_count":9,"prompt_eval_duration":1,"eval_count":5,"eval_duration":2}"#;
        let s = every_split("application/json; charset=utf-8", native);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(9), Some(5)));
        assert_eq!(
            s.first_token, None,
            "no first token for a non-streamed answer"
        );
        assert!(!s.streamed);
        let openai = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":8,"total_tokens":11}}"#;
        let s = every_split("application/json", openai);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(3), Some(8)));
        let embed = br#"{"model":"m","embeddings":[[0.1,0.2],[0.3,0.4]],"total_duration":1,"load_duration":1,"prompt_eval_count":6}"#;
        let s = every_split("application/json", embed);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(6), None));
        let anthropic = br#"{"id":"m","type":"message","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":4,"output_tokens":2}}"#;
        let s = every_split("application/json", anthropic);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(4), Some(2)));
        let error = br#"{"error":"model 'x' not found"}"#;
        assert_eq!(
            every_split("application/json", error).error.as_deref(),
            Some("model 'x' not found")
        );
    }

    #[test]
    fn a_large_json_body_keeps_only_its_tail() {
        let mut body = b"{\"model\":\"m\",\"embeddings\":[[".to_vec();
        let nums: Vec<String> = (0..(1 << 20)).map(|i| (i % 10).to_string()).collect();
        body.extend_from_slice(nums.join(",").as_bytes());
        body.extend_from_slice(
            b"]],\"total_duration\":1,\"load_duration\":1,\"prompt_eval_count\":77}",
        );
        let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
        let mut tap = StreamTap::default();
        tap.start(Some("application/json"));
        for c in &chunks {
            tap.observe(c, MS);
        }
        assert!(tap.partial.len() <= TAIL, "kept {}", tap.partial.len());
        tap.finish(MS);
        assert_eq!(tap.summary().prompt_tokens, Some(77));
    }

    #[test]
    fn copies_at_most_the_partial_line() {
        let body = native_chat();
        let mut tap = StreamTap::default();
        tap.start(Some(NDJSON));
        for c in body.chunks(7) {
            tap.observe(c, MS);
            assert!(tap.partial.len() < 300);
        }
        // Whole lines in one chunk are never copied.
        let mut tap = StreamTap::default();
        tap.start(Some(NDJSON));
        tap.observe(&body, MS);
        assert!(tap.partial.is_empty());
    }

    #[test]
    fn other_content_types_are_ignored() {
        let s = run("text/plain", &[b"{\"eval_count\":3}\n"]);
        assert_eq!(s, TapSummary::default());
        let s = run("", &[b"{\"eval_count\":3}\n"]);
        assert_eq!(s.completion_tokens, None);
    }

    #[test]
    fn garbage_is_harmless() {
        let s = every_split(
            NDJSON,
            b"not json\n{\"done\":\n}}}\n\xff\xfe\n{\"eval_count\":2,\"done\":true}\n",
        );
        assert_eq!(s.completion_tokens, Some(2));
        let s = every_split(SSE, b"data: {\ndata:\n:comment\nretry: 5\ndata: [DONE]\n");
        assert!(s.done);
    }

    #[test]
    fn a_tail_scan_takes_the_last_number_of_each_key() {
        let eval = |tail: &[u8]| TailKeys::scan(tail).numbers[TailKey::EvalCount as usize];
        assert_eq!(eval(b"\"eval_count\":1,\"eval_count\": 22}"), Some(22));
        assert_eq!(eval(b"\"eval_count\":1,\"eval_count\":x"), None);
        assert_eq!(eval(b"\"prompt_eval_count\":7"), None);
        assert_eq!(eval(b""), None);
        assert!(TailKeys::scan(b"3,\"done\":true,\"total_duration\":1").done);
        assert!(!TailKeys::scan(b"\"done\":false").done);
    }
}
