//! Inference routes: /api/generate, /api/chat, /api/embed, /api/embeddings and their
//! OpenAI-compatible twins. All of them go through the per-model slots.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hyper::{Response, StatusCode};
use rand::Rng;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::bind::{self, schemas, BindError, Schema};
use crate::cli::KeepAlive;
use crate::http::{self, Ctx, Flavor, BUSY};
use crate::native::json_of;
use crate::state::{Model, Slot, State};
use crate::stream::{Body, Gen, GenStream, Kind};
use crate::util;

/// Length of a string, or total length of an array of strings, without keeping them.
#[derive(Default, Debug, Clone, Copy)]
pub struct TextLen(pub usize);

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextLen, E> {
                Ok(TextLen(s.len()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                let mut n = 0;
                while let Some(t) = seq.next_element::<TextPart>()? {
                    n += t.0;
                }
                Ok(TextLen(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// An element of a content array: a string, or an object whose `text` counts.
struct TextPart(usize);

impl<'de> Deserialize<'de> for TextPart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextPart;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a content part")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextPart, E> {
                Ok(TextPart(s.len()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextPart, E> {
                Ok(TextPart(4))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextPart, E> {
                Ok(TextPart(4))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextPart, E> {
                Ok(TextPart(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextPart, A::Error> {
                let mut n = 0;
                while let Some(t) = seq.next_element::<TextPart>()? {
                    n += t.0;
                }
                Ok(TextPart(n))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<TextPart, A::Error> {
                let mut n = 0;
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if k == "text" {
                        n += map.next_value::<TextLen>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(TextPart(n))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
struct Message {
    #[serde(default)]
    content: Option<TextLen>,
}

/// Count of messages and total content length.
#[derive(Default, Debug, Clone, Copy)]
pub struct Messages {
    pub count: usize,
    pub chars: usize,
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Messages, E> {
                Ok(Messages::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut m = Messages::default();
                while let Some(msg) = seq.next_element::<Message>()? {
                    m.count += 1;
                    m.chars += msg.content.map_or(0, |c| c.0);
                }
                Ok(m)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
struct Options {
    #[serde(default)]
    num_predict: Option<f64>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The fields of an inference request the mock looks at; everything else is skipped.
#[derive(Deserialize, Default)]
struct InferRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    prompt: Option<TextLen>,
    #[serde(default)]
    messages: Option<Messages>,
    #[serde(default)]
    keep_alive: Option<serde_json::Value>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<f64>,
}

/// Bind a body into Ollama's request struct for the route (Go's `encoding/json` rules,
/// see `bind`), then read the bound fields into `T`. A failure is logged as `bind_error`
/// and answered 400 as the handler does: native handlers say "missing request body" for
/// an empty body, the /v1 middlewares pass Go's `EOF`.
pub fn parse<T: for<'de> Deserialize<'de>>(
    ctx: &mut Ctx,
    body: &[u8],
    flavor: Flavor,
    schema: &'static Schema,
) -> Result<T, Response<Body>> {
    let bound = bind::bind(body, schema);
    let msg = match bound.error {
        None => match serde_json::from_value(bound.value) {
            Ok(v) => return Ok(v),
            Err(e) => {
                ctx.bind_failed(None);
                return Err(http::error(flavor, StatusCode::BAD_REQUEST, &e.to_string()));
            }
        },
        Some(BindError::Eof) if flavor == Flavor::Native => "missing request body".into(),
        Some(BindError::Eof) => "EOF".into(),
        Some(BindError::Invalid(m)) => m,
    };
    let model = match &bound.value["model"] {
        serde_json::Value::String(m) if !m.is_empty() => Some(m.as_str()),
        _ => None,
    };
    ctx.bind_failed(model);
    Err(http::error(flavor, StatusCode::BAD_REQUEST, &msg))
}

/// The request's `keep_alive`, `None` when absent or `null`: Ollama passes the handler's
/// `*api.Duration` to the scheduler as it is, and a nil one leaves a loaded model's session as
/// it was (sched.go `useLoadedRunner`); only a load takes `OLLAMA_KEEP_ALIVE` for it.
fn keep_alive(
    v: Option<&serde_json::Value>,
    flavor: Flavor,
) -> Result<Option<KeepAlive>, Response<Body>> {
    match v.map(KeepAlive::from_json) {
        None | Some(Ok(None)) => Ok(None),
        Some(Ok(Some(k))) => Ok(Some(k)),
        Some(Err(e)) => Err(http::error(flavor, StatusCode::BAD_REQUEST, &e)),
    }
}

/// Injected failures and hangs, checked for every inference request.
async fn faults(ctx: &Ctx, flavor: Flavor) -> Option<Response<Body>> {
    let state = &ctx.state;
    if let Some(status) = state.knobs.take_failure() {
        state.stats.injected_failures.fetch_add(1, Relaxed);
        return Some(http::injected(flavor, status));
    }
    if state.knobs.hang() {
        struct Hanging<'a>(&'a State);
        impl Drop for Hanging<'_> {
            fn drop(&mut self) {
                self.0.stats.hanging.fetch_sub(1, Relaxed);
            }
        }
        state.stats.hanging.fetch_add(1, Relaxed);
        let _g = Hanging(state);
        std::future::pending::<()>().await;
    }
    None
}

fn prompt_tokens(chars: usize, messages: usize) -> u64 {
    (1 + chars / 4 + messages * 4).min(4096) as u64
}

fn busy(flavor: Flavor) -> Response<Body> {
    http::error(flavor, StatusCode::SERVICE_UNAVAILABLE, BUSY)
}

fn model_or_error(
    state: &State,
    name: &str,
    flavor: Flavor,
    msg: impl FnOnce() -> String,
) -> Result<Arc<Model>, Response<Body>> {
    if name.is_empty() {
        return Err(http::error(
            flavor,
            StatusCode::BAD_REQUEST,
            "model is required",
        ));
    }
    state
        .find_model(name)
        .ok_or_else(|| http::error(flavor, StatusCode::NOT_FOUND, &msg()))
}

/// /api/generate, /api/chat, /v1/chat/completions, /v1/completions.
pub async fn generate(ctx: &mut Ctx, body: &[u8], kind: Kind) -> Response<Body> {
    let (flavor, schema) = generate_api(kind);
    let req: InferRequest = match parse(ctx, body, flavor, schema) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let name = req.model.unwrap_or_default();
    ctx.commit_log(Some(&name).filter(|n| !n.is_empty()).map(|s| s.as_str()));
    let msgs = req.messages.unwrap_or_default();
    if let Some(msg) = middleware_rejects(kind, &name, req.max_tokens, msgs.count) {
        return http::error(flavor, StatusCode::BAD_REQUEST, msg);
    }
    if let Some(resp) = faults(ctx, flavor).await {
        return resp;
    }
    let state = ctx.state.clone();
    let model = match model_or_error(&state, &name, flavor, || {
        format!("model '{name}' not found")
    }) {
        Ok(m) => m,
        Err(r) => return r,
    };
    if model.embedding_only {
        return cannot_generate(kind, &name, flavor);
    }
    let ka = match keep_alive(req.keep_alive.as_ref(), flavor) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let prompt = req.prompt.unwrap_or_default();
    let empty = match kind {
        Kind::Generate | Kind::OaCompletion => prompt.0 == 0,
        Kind::Chat | Kind::OaChat | Kind::Anthropic => msgs.count == 0,
    };
    let model_json = util::json_str(&name);
    if empty && !kind.compat() && ka == Some(KeepAlive::For(std::time::Duration::ZERO)) {
        model.unload();
        return load_answer(kind, &model_json, "unload");
    }
    if let Some(refusal) = state.too_large(&model) {
        return http::error(flavor, StatusCode::INTERNAL_SERVER_ERROR, &refusal);
    }
    let slot = match state.schedule(&model, ka).await {
        Ok(s) => s,
        Err(_) => return busy(flavor),
    };
    if empty && !kind.compat() {
        slot.release();
        return load_answer(kind, &model_json, "load");
    }
    let params = state.knobs.gen_params();
    let (tokens, done_reason) = token_budget(req.options, req.max_tokens, params.tokens);
    let (chars, count) = match kind {
        Kind::Generate | Kind::OaCompletion => (prompt.0, 0),
        _ => (msgs.chars, msgs.count),
    };
    let gen = Gen {
        kind,
        model_json,
        tokens,
        done_reason,
        prompt_eval_count: prompt_tokens(chars, count),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        id: response_id(kind),
        created: util::unix_secs(std::time::SystemTime::now()),
        t0: ctx.t0,
        params,
    };
    answer(gen, slot, flavor, req.stream.unwrap_or(!kind.compat())).await
}

/// The error flavour and request struct of each generation route.
fn generate_api(kind: Kind) -> (Flavor, &'static Schema) {
    let flavor = match kind {
        Kind::Anthropic => Flavor::Anthropic,
        k if k.openai() => Flavor::OpenAi,
        _ => Flavor::Native,
    };
    let schema = match kind {
        Kind::Generate => &schemas::GENERATE,
        Kind::Chat => &schemas::CHAT,
        Kind::OaChat => &schemas::OA_CHAT,
        Kind::OaCompletion => &schemas::OA_COMPLETION,
        Kind::Anthropic => &schemas::ANTHROPIC,
    };
    (flavor, schema)
}

/// An embedding-only model asked to generate or chat.
fn cannot_generate(kind: Kind, name: &str, flavor: Flavor) -> Response<Body> {
    let what = match kind {
        Kind::Generate | Kind::OaCompletion => "generate",
        _ => "chat",
    };
    http::error(
        flavor,
        StatusCode::BAD_REQUEST,
        &format!("{} does not support {what}", util::json_str(name)),
    )
}

/// How many tokens to generate and why generation stops: `num_predict` (or the
/// compatibility APIs' `max_tokens`) below the mock's length ends it with "length".
fn token_budget(
    options: Option<Options>,
    max_tokens: Option<f64>,
    cap: u64,
) -> (u64, &'static str) {
    let limit = options
        .and_then(|o| o.num_predict)
        .or(max_tokens)
        .filter(|n| *n >= 0.0)
        .map(|n| n as u64);
    match limit {
        Some(l) if l < cap => (l, "length"),
        _ => (cap, "stop"),
    }
}

/// The compatibility APIs' response id; native answers have none.
fn response_id(kind: Kind) -> String {
    match kind {
        Kind::OaChat => format!("chatcmpl-{}", rand::rng().random_range(0..999)),
        Kind::OaCompletion => format!("cmpl-{}", rand::rng().random_range(0..999)),
        Kind::Anthropic => format!("msg_{:024x}", rand::rng().random::<u128>() >> 32),
        _ => String::new(),
    }
}

/// Stream the generation, or run it to the end and answer one object.
async fn answer(gen: Gen, slot: Slot, flavor: Flavor, streaming: bool) -> Response<Body> {
    let kind = gen.kind;
    if streaming {
        let ctype = if kind.compat() {
            "text/event-stream"
        } else {
            "application/x-ndjson"
        };
        return http::stream(ctype, Body::Gen(Box::new(GenStream::new(gen, slot))));
    }
    match gen.run_full(slot).await {
        Ok(buf) => http::json_bytes(StatusCode::OK, buf),
        Err(()) => http::error(
            flavor,
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::stream::RUNNER_ERROR,
        ),
    }
}

/// What the compatibility middlewares refuse after binding and before the handler runs
/// (middleware/openai.go ChatMiddleware, middleware/anthropic.go AnthropicMessagesMiddleware).
fn middleware_rejects(
    kind: Kind,
    model: &str,
    max_tokens: Option<f64>,
    messages: usize,
) -> Option<&'static str> {
    match kind {
        Kind::OaChat if messages == 0 => Some("[] is too short - 'messages'"),
        Kind::Anthropic if model.is_empty() => Some("model is required"),
        Kind::Anthropic if max_tokens.unwrap_or(0.0) <= 0.0 => {
            Some("max_tokens is required and must be positive")
        }
        Kind::Anthropic if messages == 0 => Some("messages is required"),
        _ => None,
    }
}

fn load_answer(kind: Kind, model_json: &str, reason: &str) -> Response<Body> {
    let now = util::rfc3339(std::time::SystemTime::now());
    let body = match kind {
        Kind::Chat => format!(
            "{{\"model\":{model_json},\"created_at\":\"{now}\",\"message\":{{\"role\":\"assistant\",\"content\":\"\"}},\"done_reason\":\"{reason}\",\"done\":true}}"
        ),
        _ => format!(
            "{{\"model\":{model_json},\"created_at\":\"{now}\",\"response\":\"\",\"done\":true,\"done_reason\":\"{reason}\"}}"
        ),
    };
    http::json_bytes(StatusCode::OK, body.into_bytes())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EmbedApi {
    /// /api/embed
    Embed,
    /// /api/embeddings (legacy, `prompt`)
    Legacy,
    /// /v1/embeddings
    OpenAi,
}

#[derive(Deserialize, Default)]
struct EmbedRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    keep_alive: Option<serde_json::Value>,
    #[serde(default)]
    dimensions: Option<i64>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// A deterministic unit vector for `text`.
fn embedding(text: &str, dim: usize) -> Vec<f32> {
    let mut x = util::fnv1a(text.as_bytes()) | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    normalize(&mut v);
    v
}

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// /api/embed, /api/embeddings, /v1/embeddings.
pub async fn embed(ctx: &mut Ctx, body: &[u8], api: EmbedApi) -> Response<Body> {
    let flavor = if api == EmbedApi::OpenAi {
        Flavor::OpenAi
    } else {
        Flavor::Native
    };
    let schema = match api {
        EmbedApi::Embed => &schemas::EMBED,
        EmbedApi::Legacy => &schemas::EMBEDDING,
        EmbedApi::OpenAi => &schemas::OA_EMBED,
    };
    let req: EmbedRequest = match parse(ctx, body, flavor, schema) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let name = req.model.clone().unwrap_or_default();
    ctx.commit_log(Some(&name).filter(|n| !n.is_empty()).map(|s| s.as_str()));
    if let Some(resp) = faults(ctx, flavor).await {
        return resp;
    }
    let inputs = match embed_inputs(&req, api, flavor) {
        Ok(i) => i,
        Err(resp) => return resp,
    };
    if api == EmbedApi::OpenAi && inputs.is_empty() {
        return http::error(flavor, StatusCode::BAD_REQUEST, "invalid input");
    }
    let state = ctx.state.clone();
    let model = match model_or_error(&state, &name, flavor, || {
        format!(
            "model {} not found, try pulling it first",
            util::json_str(&name)
        )
    }) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let ka = match keep_alive(req.keep_alive.as_ref(), flavor) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if let Some(refusal) = state.too_large(&model) {
        return http::error(flavor, StatusCode::INTERNAL_SERVER_ERROR, &refusal);
    }
    let slot = match state.schedule(&model, ka).await {
        Ok(s) => s,
        Err(_) => return busy(flavor),
    };
    let first = state.knobs.gen_params().first_token_delay;
    if !inputs.is_empty() && !first.is_zero() {
        tokio::time::sleep(first).await;
    }
    let mut dim = model.embedding_length;
    if let Some(d) = req
        .dimensions
        .and_then(|d| usize::try_from(d).ok())
        .filter(|d| *d > 0 && *d < dim)
    {
        dim = d;
    }
    let vectors: Vec<Vec<f32>> = inputs.iter().map(|t| embedding(t, dim)).collect();
    let tokens: u64 = inputs.iter().map(|t| 1 + t.len() as u64 / 4).sum();
    let load = util::nanos(slot.load_duration).max(1000);
    let total = util::nanos(ctx.t0.elapsed()).max(load + 1000);
    slot.finish(false);
    let usage = EmbedUsage {
        tokens,
        total,
        load,
    };
    match api {
        EmbedApi::Embed => native_embed(&name, &vectors, usage),
        EmbedApi::Legacy => legacy_embedding(&vectors),
        EmbedApi::OpenAi => {
            let b64 = req.encoding_format.as_deref() == Some("base64");
            openai_embeddings(&name, &vectors, usage, b64)
        }
    }
}

/// Inputs as strings; token arrays (OpenAI) become their JSON text.
fn embed_inputs(
    req: &EmbedRequest,
    api: EmbedApi,
    flavor: Flavor,
) -> Result<Vec<String>, Response<Body>> {
    let invalid = || http::error(flavor, StatusCode::BAD_REQUEST, "invalid input type");
    Ok(match api {
        EmbedApi::Legacy => req
            .prompt
            .clone()
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect(),
        _ => match &req.input {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) if s.is_empty() => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for v in a {
                    match v {
                        serde_json::Value::String(s) => out.push(s.clone()),
                        serde_json::Value::Number(_) | serde_json::Value::Array(_)
                            if api == EmbedApi::OpenAi =>
                        {
                            out.push(v.to_string())
                        }
                        _ => return Err(invalid()),
                    }
                }
                out
            }
            Some(_) => return Err(invalid()),
        },
    })
}

/// The counts every embedding answer reports.
#[derive(Clone, Copy)]
struct EmbedUsage {
    tokens: u64,
    total: u64,
    load: u64,
}

/// /api/embed's answer.
fn native_embed(name: &str, vectors: &[Vec<f32>], usage: EmbedUsage) -> Response<Body> {
    #[derive(Serialize)]
    struct EmbedResponse<'a> {
        model: &'a str,
        embeddings: &'a [Vec<f32>],
        total_duration: u64,
        load_duration: u64,
        prompt_eval_count: u64,
    }
    json_of(&EmbedResponse {
        model: name,
        embeddings: vectors,
        total_duration: usage.total,
        load_duration: usage.load,
        prompt_eval_count: usage.tokens,
    })
}

/// /api/embeddings' answer: the first vector only, in float64.
fn legacy_embedding(vectors: &[Vec<f32>]) -> Response<Body> {
    let e: Vec<f64> = vectors
        .first()
        .map(|v| v.iter().map(|x| *x as f64).collect())
        .unwrap_or_default();
    json_of(&serde_json::json!({ "embedding": e }))
}

/// /v1/embeddings' list, each vector as floats or base64 of little-endian float32.
fn openai_embeddings(
    name: &str,
    vectors: &[Vec<f32>],
    usage: EmbedUsage,
    b64: bool,
) -> Response<Body> {
    #[derive(Serialize)]
    struct Item {
        object: &'static str,
        embedding: serde_json::Value,
        index: usize,
    }
    #[derive(Serialize)]
    struct Usage {
        prompt_tokens: u64,
        total_tokens: u64,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Item>,
        model: &'a str,
        usage: Usage,
    }
    let data: Vec<Item> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Item {
            object: "embedding",
            embedding: if b64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::Value::from(util::base64(&bytes))
            } else {
                serde_json::json!(v)
            },
            index,
        })
        .collect();
    json_of(&List {
        object: "list",
        data,
        model: name,
        usage: Usage {
            prompt_tokens: usage.tokens,
            total_tokens: usage.tokens,
        },
    })
}
