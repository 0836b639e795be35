//! Response bodies. Streams are generated lazily as hyper polls them, so a client that
//! goes away (hyper drops the body) stops generation at once and frees the slot; every
//! chunk is handed to hyper as its own frame followed by one yield, so each is flushed
//! as its own write like Ollama's `Flush()` after every line.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::time::Sleep;

use crate::state::{GenParams, Slot};
use crate::util;

pub const RUNNER_ERROR: &str = "an error was encountered while running the model: unexpected EOF";

const WORDS: [&str; 16] = [
    "Hello", " from", " the", " mock", " Ollama", " server", ",", " a", " fast", " stand", "-in",
    " for", " a", " real", " model", ".",
];

fn token(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

pub fn full_text(n: u64) -> String {
    (0..n).map(token).collect()
}

/// The response body type of every route.
pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Lines(Box<LineStream>),
    Gen(Box<GenStream>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Body::Lines(s) => s.poll(cx),
            Body::Gen(g) => g.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Lines(s) => s.idx >= s.lines.len(),
            Body::Gen(g) => g.stage == Stage::End,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty | Body::Full(None) => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            _ => SizeHint::default(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Generate,
    Chat,
    OaChat,
    OaCompletion,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
}

impl Kind {
    pub fn openai(self) -> bool {
        matches!(self, Kind::OaChat | Kind::OaCompletion)
    }

    /// A compatibility API: SSE, streams only when asked, no load/unload answers.
    pub fn compat(self) -> bool {
        self != Kind::Generate && self != Kind::Chat
    }
}

/// What one generation produces.
pub struct Gen {
    pub kind: Kind,
    /// The requested model name as a JSON string literal (echoed as sent, like Ollama).
    pub model_json: String,
    pub tokens: u64,
    pub done_reason: &'static str,
    pub prompt_eval_count: u64,
    pub include_usage: bool,
    pub id: String,
    pub created: u64,
    /// When the request arrived.
    pub t0: Instant,
    pub params: GenParams,
}

pub struct Timings {
    pub load: Duration,
    pub prompt_eval: Duration,
    pub eval: Duration,
    pub total: Duration,
}

fn floor(d: Duration) -> u64 {
    util::nanos(d).max(1000)
}

impl Gen {
    /// When content chunk `i` is due, or None when there are no delays at all.
    fn deadline(&self, start: Instant, i: u64) -> Option<Instant> {
        let p = &self.params;
        if p.first_token_delay.is_zero() && p.token_delay.is_zero() {
            return None;
        }
        Some(start + p.first_token_delay + p.token_delay.mul_f64(i as f64))
    }

    fn created_at(&self, buf: &mut Vec<u8>) {
        let mut s = String::with_capacity(32);
        util::write_rfc3339(&mut s, SystemTime::now());
        buf.extend_from_slice(s.as_bytes());
    }

    fn oa_head(&self, buf: &mut Vec<u8>, object: &str) {
        buf.extend_from_slice(b"{\"id\":\"");
        buf.extend_from_slice(self.id.as_bytes());
        buf.extend_from_slice(b"\",\"object\":\"");
        buf.extend_from_slice(object.as_bytes());
        buf.extend_from_slice(b"\",\"created\":");
        buf.extend_from_slice(self.created.to_string().as_bytes());
        buf.extend_from_slice(b",\"model\":");
        buf.extend_from_slice(self.model_json.as_bytes());
        buf.extend_from_slice(b",\"system_fingerprint\":\"fp_ollama\",\"choices\":[");
    }

    fn native_head(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"{\"model\":");
        buf.extend_from_slice(self.model_json.as_bytes());
        buf.extend_from_slice(b",\"created_at\":\"");
        self.created_at(buf);
        buf.push(b'"');
    }

    fn content(&self, buf: &mut Vec<u8>, text: &str) {
        match self.kind {
            Kind::Generate => {
                self.native_head(buf);
                buf.extend_from_slice(b",\"response\":\"");
                buf.extend_from_slice(text.as_bytes());
                buf.extend_from_slice(b"\",\"done\":false}\n");
            }
            Kind::Chat => {
                self.native_head(buf);
                buf.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":\"");
                buf.extend_from_slice(text.as_bytes());
                buf.extend_from_slice(b"\"},\"done\":false}\n");
            }
            Kind::OaChat => {
                buf.extend_from_slice(b"data: ");
                self.oa_head(buf, "chat.completion.chunk");
                buf.extend_from_slice(
                    b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"",
                );
                buf.extend_from_slice(text.as_bytes());
                buf.extend_from_slice(b"\"},\"finish_reason\":null}]}\n\n");
            }
            Kind::OaCompletion => {
                buf.extend_from_slice(b"data: ");
                self.oa_head(buf, "text_completion");
                buf.extend_from_slice(b"{\"text\":\"");
                buf.extend_from_slice(text.as_bytes());
                buf.extend_from_slice(b"\",\"index\":0,\"finish_reason\":null}]}\n\n");
            }
            Kind::Anthropic => {
                buf.extend_from_slice(
                    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"",
                );
                buf.extend_from_slice(text.as_bytes());
                buf.extend_from_slice(b"\"}}\n\n");
            }
        }
    }

    fn stop_reason(&self) -> &'static str {
        if self.done_reason == "length" {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    /// Anthropic's opening events: message_start and content_block_start.
    fn anthropic_start(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"",
        );
        buf.extend_from_slice(self.id.as_bytes());
        buf.extend_from_slice(b"\",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
        buf.extend_from_slice(self.model_json.as_bytes());
        buf.extend_from_slice(
            format!(
                ",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{},\"output_tokens\":0}}}}}}\n\n",
                self.prompt_eval_count
            )
            .as_bytes(),
        );
        buf.extend_from_slice(
            b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        );
    }

    fn metrics(&self, buf: &mut Vec<u8>, t: &Timings) {
        let load = floor(t.load);
        let pe = floor(t.prompt_eval);
        let ev = floor(t.eval);
        let total = util::nanos(t.total).max(load + pe + ev);
        let mut s = format!(
            ",\"total_duration\":{total},\"load_duration\":{load},\"prompt_eval_count\":{},\"prompt_eval_duration\":{pe}",
            self.prompt_eval_count
        );
        if self.tokens > 0 {
            s.push_str(&format!(",\"eval_count\":{}", self.tokens));
        }
        s.push_str(&format!(",\"eval_duration\":{ev}"));
        buf.extend_from_slice(s.as_bytes());
    }

    fn context(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b",\"context\":[");
        let n = self.prompt_eval_count + self.tokens;
        let mut s = String::with_capacity(n as usize * 6);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&(128_000 + (i * 7919) % 2000).to_string());
        }
        buf.extend_from_slice(s.as_bytes());
        buf.push(b']');
    }

    fn usage(&self, buf: &mut Vec<u8>) {
        let p = self.prompt_eval_count;
        let c = self.tokens;
        buf.extend_from_slice(
            format!(
                "\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}",
                p + c
            )
            .as_bytes(),
        );
    }

    /// The last object: the final stream chunk (`text` empty) or the whole non-streamed answer.
    fn last(&self, buf: &mut Vec<u8>, text: &str, t: &Timings, streamed: bool) {
        match self.kind {
            Kind::Generate | Kind::Chat => {
                self.native_last(buf, text, t);
                if streamed {
                    buf.push(b'\n');
                }
            }
            Kind::OaChat if streamed => self.oa_chat_last_chunk(buf),
            Kind::OaChat => self.oa_chat_answer(buf, text),
            Kind::OaCompletion => self.oa_completion_last(buf, text, streamed),
            Kind::Anthropic if streamed => self.anthropic_last_events(buf),
            Kind::Anthropic => self.anthropic_answer(buf, text),
        }
    }

    /// /api/generate's and /api/chat's `done` object, with the metrics.
    fn native_last(&self, buf: &mut Vec<u8>, text: &str, t: &Timings) {
        self.native_head(buf);
        let text = util::json_str(text);
        if self.kind == Kind::Chat {
            buf.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":");
            buf.extend_from_slice(text.as_bytes());
            buf.extend_from_slice(b"},\"done_reason\":\"");
            buf.extend_from_slice(self.done_reason.as_bytes());
            buf.extend_from_slice(b"\",\"done\":true");
        } else {
            buf.extend_from_slice(b",\"response\":");
            buf.extend_from_slice(text.as_bytes());
            buf.extend_from_slice(b",\"done\":true,\"done_reason\":\"");
            buf.extend_from_slice(self.done_reason.as_bytes());
            buf.push(b'"');
            self.context(buf);
        }
        self.metrics(buf, t);
        buf.extend_from_slice(b"}");
    }

    /// The chat completion stream's last chunk: an empty delta with the finish reason.
    fn oa_chat_last_chunk(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"data: ");
        self.oa_head(buf, "chat.completion.chunk");
        buf.extend_from_slice(
            b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":\"",
        );
        buf.extend_from_slice(self.done_reason.as_bytes());
        buf.extend_from_slice(b"\"}]}\n\n");
    }

    /// The whole non-streamed chat completion, with its usage.
    fn oa_chat_answer(&self, buf: &mut Vec<u8>, text: &str) {
        self.oa_head(buf, "chat.completion");
        buf.extend_from_slice(b"{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
        buf.extend_from_slice(util::json_str(text).as_bytes());
        buf.extend_from_slice(b"},\"finish_reason\":\"");
        buf.extend_from_slice(self.done_reason.as_bytes());
        buf.extend_from_slice(b"\"}],");
        self.usage(buf);
        buf.push(b'}');
    }

    /// The text completion's last chunk, or the whole answer with its usage.
    fn oa_completion_last(&self, buf: &mut Vec<u8>, text: &str, streamed: bool) {
        if streamed {
            buf.extend_from_slice(b"data: ");
        }
        self.oa_head(buf, "text_completion");
        buf.extend_from_slice(b"{\"text\":");
        buf.extend_from_slice(util::json_str(text).as_bytes());
        buf.extend_from_slice(b",\"index\":0,\"logprobs\":null,\"finish_reason\":\"");
        buf.extend_from_slice(self.done_reason.as_bytes());
        buf.extend_from_slice(b"\"}]");
        if streamed {
            buf.extend_from_slice(b"}\n\n");
        } else {
            buf.push(b',');
            self.usage(buf);
            buf.push(b'}');
        }
    }

    /// Anthropic's closing events before message_stop: content_block_stop, message_delta.
    fn anthropic_last_events(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(
            b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        buf.extend_from_slice(
            format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{}\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{}}}}}\n\n",
                self.stop_reason(),
                self.tokens
            )
            .as_bytes(),
        );
    }

    /// The whole non-streamed Anthropic message.
    fn anthropic_answer(&self, buf: &mut Vec<u8>, text: &str) {
        buf.extend_from_slice(b"{\"id\":\"");
        buf.extend_from_slice(self.id.as_bytes());
        buf.extend_from_slice(b"\",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
        buf.extend_from_slice(self.model_json.as_bytes());
        buf.extend_from_slice(b",\"content\":[{\"type\":\"text\",\"text\":");
        buf.extend_from_slice(util::json_str(text).as_bytes());
        buf.extend_from_slice(
            format!(
                "}}],\"stop_reason\":\"{}\",\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{},\"output_tokens\":{}}}}}",
                self.stop_reason(),
                self.prompt_eval_count,
                self.tokens
            )
            .as_bytes(),
        );
    }

    /// `stream_options.include_usage`: one more chunk with no choices and the usage, before
    /// `[DONE]`, on chat and on completions alike (Ollama `middleware/openai.go`,
    /// `ChatWriter.writeResponse` and `CompleteWriter.writeResponse`).
    fn usage_chunk(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"data: ");
        let object = if self.kind == Kind::OaCompletion {
            "text_completion"
        } else {
            "chat.completion.chunk"
        };
        self.oa_head(buf, object);
        buf.extend_from_slice(b"],");
        self.usage(buf);
        buf.extend_from_slice(b"}\n\n");
    }

    fn error_chunk(&self, buf: &mut Vec<u8>) {
        if self.kind == Kind::Anthropic {
            buf.extend_from_slice(
                b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":",
            );
            buf.extend_from_slice(util::json_str(RUNNER_ERROR).as_bytes());
            buf.extend_from_slice(b"}}\n\n");
        } else if self.kind.openai() {
            buf.extend_from_slice(b"data: {\"error\":{\"message\":");
            buf.extend_from_slice(util::json_str(RUNNER_ERROR).as_bytes());
            buf.extend_from_slice(b",\"type\":\"api_error\",\"param\":null,\"code\":null}}\n\n");
        } else {
            buf.extend_from_slice(b"{\"error\":");
            buf.extend_from_slice(util::json_str(RUNNER_ERROR).as_bytes());
            buf.extend_from_slice(b"}\n");
        }
    }

    /// The number of chunks a full stream has (content + final), for fault placement.
    fn total_chunks(&self) -> u64 {
        self.tokens + 1
    }

    /// Generate the whole answer at once (`"stream": false`), taking as long as the stream would.
    /// `Err(())` means an injected in-band error (answered as a 500 by the caller).
    pub async fn run_full(&self, slot: Slot) -> Result<Vec<u8>, ()> {
        let start = Instant::now();
        if let Some(k) = self.params.error_after_chunks {
            if k < self.total_chunks() {
                if let Some(d) = self.deadline(start, k.min(self.tokens.saturating_sub(1))) {
                    tokio::time::sleep_until(d.into()).await;
                }
                slot.abort(true);
                return Err(());
            }
        }
        if self.tokens > 0 {
            if let Some(d) = self.deadline(start, self.tokens - 1) {
                tokio::time::sleep_until(d.into()).await;
            }
        }
        let first = self.params.first_token_delay;
        let t = Timings {
            load: slot.load_duration,
            prompt_eval: first,
            eval: start.elapsed().saturating_sub(first),
            total: self.t0.elapsed(),
        };
        let text = full_text(self.tokens);
        let mut buf = Vec::with_capacity(512 + text.len());
        self.last(&mut buf, &text, &t, false);
        slot.finish(false);
        Ok(buf)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    Content,
    Final,
    Usage,
    Done,
    End,
}

/// A streamed generation (NDJSON or SSE).
pub struct GenStream {
    gen: Gen,
    slot: Option<Slot>,
    start: Instant,
    load: Duration,
    next: u64,
    emitted: u64,
    stage: Stage,
    pacer: Pacer,
    first_at: Option<Instant>,
}

type PollFrame = Poll<Option<Result<Frame<Bytes>, io::Error>>>;

impl GenStream {
    pub fn new(gen: Gen, slot: Slot) -> GenStream {
        GenStream {
            load: slot.load_duration,
            slot: Some(slot),
            start: Instant::now(),
            next: 0,
            emitted: 0,
            stage: if gen.kind == Kind::Anthropic {
                Stage::Start
            } else {
                Stage::Content
            },
            pacer: Pacer::default(),
            first_at: None,
            gen,
        }
    }

    fn emit(&mut self, buf: Vec<u8>) -> PollFrame {
        self.emitted += 1;
        // The last frame goes out with the chunked terminator in the same write.
        self.pacer.yield_next = self.stage != Stage::End;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
    }

    /// Injected faults due before the next chunk.
    fn fault(&mut self) -> Option<PollFrame> {
        let p = self.gen.params;
        if p.close_after_chunks == Some(self.emitted) {
            if let Some(s) = self.slot.take() {
                s.abort(false);
            }
            self.stage = Stage::End;
            return Some(Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "mock-ollama: close_after_chunks",
            )))));
        }
        if p.error_after_chunks == Some(self.emitted) {
            if let Some(s) = self.slot.take() {
                s.abort(true);
            }
            self.stage = Stage::End;
            let mut buf = Vec::with_capacity(160);
            self.gen.error_chunk(&mut buf);
            return Some(self.emit(buf));
        }
        None
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollFrame {
        loop {
            if self.pacer.waiting(cx) {
                return Poll::Pending;
            }
            match self.stage {
                Stage::End => return Poll::Ready(None),
                Stage::Start => {
                    let mut buf = Vec::with_capacity(512);
                    self.gen.anthropic_start(&mut buf);
                    self.stage = Stage::Content;
                    return self.emit(buf);
                }
                Stage::Content if self.next < self.gen.tokens => {
                    let (gen, start, next) = (&self.gen, self.start, self.next);
                    if self.pacer.wait_for(next, || gen.deadline(start, next)) {
                        continue;
                    }
                    return self.content();
                }
                Stage::Content => self.stage = Stage::Final,
                Stage::Final => return self.final_chunk(),
                Stage::Usage => {
                    let mut buf = Vec::with_capacity(300);
                    self.gen.usage_chunk(&mut buf);
                    self.stage = Stage::Done;
                    return self.emit(buf);
                }
                Stage::Done => return self.done(),
            }
        }
    }

    /// The next token, unless a fault is due first.
    fn content(&mut self) -> PollFrame {
        if let Some(f) = self.fault() {
            return f;
        }
        self.first_at.get_or_insert_with(Instant::now);
        let mut buf = Vec::with_capacity(160 + self.gen.model_json.len());
        self.gen.content(&mut buf, token(self.next));
        self.next += 1;
        self.emit(buf)
    }

    /// The closing chunk with the timings; it frees the slot.
    fn final_chunk(&mut self) -> PollFrame {
        if let Some(f) = self.fault() {
            return f;
        }
        let now = Instant::now();
        let first = self.first_at.unwrap_or(now);
        let t = Timings {
            load: self.load,
            prompt_eval: first - self.start,
            eval: now - first,
            total: self.gen.t0.elapsed(),
        };
        let mut buf = Vec::with_capacity(512);
        self.gen.last(&mut buf, "", &t, true);
        if let Some(s) = self.slot.take() {
            s.finish(true);
        }
        self.stage = match self.gen.kind {
            Kind::OaChat | Kind::OaCompletion if self.gen.include_usage => Stage::Usage,
            Kind::OaChat | Kind::OaCompletion | Kind::Anthropic => Stage::Done,
            _ => Stage::End,
        };
        self.emit(buf)
    }

    /// The SSE stream's terminator.
    fn done(&mut self) -> PollFrame {
        self.stage = Stage::End;
        if self.gen.kind == Kind::Anthropic {
            return self
                .emit(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_vec());
        }
        self.emit(b"data: [DONE]\n\n".to_vec())
    }
}

/// Paces a stream: one yield after each chunk so hyper flushes it as its own write, and
/// each item not before its deadline.
#[derive(Default)]
struct Pacer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The item whose deadline was already armed (or found passed).
    slept_for: Option<u64>,
    yield_next: bool,
}

impl Pacer {
    /// Whether the stream must return Pending: it yields once after each chunk (set by the
    /// emitter), so hyper flushes that chunk as its own write; then an armed deadline that
    /// is still ahead.
    fn waiting(&mut self, cx: &mut Context<'_>) -> bool {
        if self.yield_next {
            self.yield_next = false;
            cx.waker().wake_by_ref();
            return true;
        }
        if let Some(s) = self.sleep.as_mut() {
            if s.as_mut().poll(cx).is_pending() {
                return true;
            }
            self.sleep = None;
        }
        false
    }

    /// Arm item `item`'s deadline once; true when it is ahead (poll `waiting` next).
    fn wait_for(&mut self, item: u64, deadline: impl FnOnce() -> Option<Instant>) -> bool {
        if self.slept_for == Some(item) {
            return false;
        }
        self.slept_for = Some(item);
        match deadline() {
            Some(d) if d > Instant::now() => {
                self.sleep = Some(Box::pin(tokio::time::sleep_until(d.into())));
                true
            }
            _ => false,
        }
    }
}

/// Precomputed lines (pull/push/create progress), `delay` apart.
pub struct LineStream {
    lines: Vec<Bytes>,
    idx: usize,
    delay: Duration,
    start: Instant,
    on_last: Option<Box<dyn FnOnce() + Send>>,
    pacer: Pacer,
}

impl LineStream {
    pub fn new(
        lines: Vec<Bytes>,
        delay: Duration,
        on_last: Option<Box<dyn FnOnce() + Send>>,
    ) -> LineStream {
        LineStream {
            lines,
            idx: 0,
            delay,
            start: Instant::now(),
            on_last,
            pacer: Pacer::default(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollFrame {
        loop {
            if self.pacer.waiting(cx) {
                return Poll::Pending;
            }
            if self.idx >= self.lines.len() {
                return Poll::Ready(None);
            }
            let (idx, start, delay) = (self.idx, self.start, self.delay);
            if idx > 0
                && !delay.is_zero()
                && self
                    .pacer
                    .wait_for(idx as u64, || Some(start + delay.mul_f64(idx as f64)))
            {
                continue;
            }
            if self.idx + 1 == self.lines.len() {
                if let Some(f) = self.on_last.take() {
                    f();
                }
            }
            let line = self.lines[self.idx].clone();
            self.idx += 1;
            self.pacer.yield_next = self.idx < self.lines.len();
            return Poll::Ready(Some(Ok(Frame::data(line))));
        }
    }
}
