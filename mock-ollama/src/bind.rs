//! Binding a request body into Ollama's request structs with Go's `encoding/json` rules
//! (decode.go `object`, `array`, `literalStore`, `indirect`), the way each handler's
//! `c.ShouldBindJSON(&req)` does it. The result is a normalised JSON object holding what the
//! Go struct would hold, under the struct's own field names; handlers read that.
//!
//! The rules mirrored:
//! - A key selects a field by exact name (`fields.byExactName`), else by Go's case folding
//!   (`fields.byFoldedName[foldName(key)]`, see `gojson::fold_name`). Unknown keys are skipped.
//! - Every key that selects a field decodes into it, in order: the last one wins.
//! - `null` into a string, bool, number or struct is a no-op (the field keeps what an
//!   earlier key gave it); into a pointer, slice, map or interface it sets nil.
//! - Objects decode *into* what a struct, pointer-to-struct or map field already holds
//!   (fields merge); arrays decode element-wise into the existing elements, then truncate.
//! - A kind mismatch (`"model": 1`) records the first `UnmarshalTypeError`, leaves the field
//!   as it was and goes on; the handler then answers 400 with that error's text.
//! - A type with its own `UnmarshalJSON` (api.Duration, api.ThinkValue, api.Message) stops
//!   the decode at its first error, and that error is returned as is.

use serde_json::{Map, Number, Value};

use crate::gojson::{self, fold_name, DecodeError, Json};

/// A Go field type, as far as binding tells them apart.
pub enum Ty {
    Str,
    Bool,
    Int,
    Float32,
    Float64,
    /// `any` / `interface{}`: takes any JSON value (numbers become float64).
    Any,
    /// `json.RawMessage`: takes any JSON value verbatim.
    Raw,
    /// `api.ImageData` ([]byte): a base64 string.
    Bytes,
    /// `api.Duration` (types.go `Duration.UnmarshalJSON`).
    Duration,
    /// `api.ThinkValue` (types.go `ThinkValue.UnmarshalJSON`).
    Think,
    Ptr(&'static Ty),
    Slice(&'static Ty),
    Map(&'static Ty),
    Struct(&'static Schema),
    /// A named Go type (for error texts) with the binding behaviour of the inner one.
    Named(&'static str, &'static Ty),
}

pub struct Schema {
    /// The qualified Go type name, e.g. `api.PullRequest`.
    pub go_name: &'static str,
    pub fields: &'static [(&'static str, Ty)],
    /// The struct has its own UnmarshalJSON (errors inside it stop the whole decode).
    pub custom: bool,
}

impl Schema {
    fn short_name(&self) -> &'static str {
        self.go_name.rsplit('.').next().unwrap_or(self.go_name)
    }

    fn field(&self, key: &str) -> Option<&'static (&'static str, Ty)> {
        if let Some(f) = self.fields.iter().find(|(name, _)| *name == key) {
            return Some(f);
        }
        let folded = fold_name(key);
        self.fields
            .iter()
            .find(|(name, _)| fold_name(name) == folded)
    }
}

impl Ty {
    /// `reflect.Type.String()` of the value Go reports a mismatch against (after
    /// `indirect`, so a pointer reports its pointee).
    fn go_name(&self) -> String {
        match self {
            Ty::Str => "string".into(),
            Ty::Bool => "bool".into(),
            Ty::Int => "int".into(),
            Ty::Float32 => "float32".into(),
            Ty::Float64 => "float64".into(),
            Ty::Any => "interface {}".into(),
            Ty::Raw => "json.RawMessage".into(),
            Ty::Bytes => "api.ImageData".into(),
            Ty::Duration => "api.Duration".into(),
            Ty::Think => "api.ThinkValue".into(),
            Ty::Ptr(t) => t.go_name(),
            Ty::Slice(t) => format!("[]{}", t.inner_name()),
            Ty::Map(t) => format!("map[string]{}", t.inner_name()),
            Ty::Struct(s) => s.go_name.into(),
            Ty::Named(n, _) => (*n).into(),
        }
    }

    /// The name of an element type inside a composite one (pointers keep their star).
    fn inner_name(&self) -> String {
        match self {
            Ty::Ptr(t) => format!("*{}", t.inner_name()),
            t => t.go_name(),
        }
    }

    /// The Go zero value as normalised JSON (what a freshly allocated pointer points to).
    fn zero(&self) -> Value {
        match self {
            Ty::Str => Value::String(String::new()),
            Ty::Bool => Value::Bool(false),
            Ty::Int | Ty::Float32 | Ty::Float64 => Value::from(0),
            Ty::Struct(_) => Value::Object(Map::new()),
            Ty::Named(_, t) => t.zero(),
            _ => Value::Null,
        }
    }
}

/// Why binding failed, with the text the handler puts in its 400.
#[derive(Debug, PartialEq)]
pub enum BindError {
    /// An empty body: `io.EOF` (native handlers say "missing request body", /v1 ones "EOF").
    Eof,
    /// Any other error, with Go's message.
    Invalid(String),
}

/// The outcome of a bind: what the Go struct holds afterwards, and the error if any.
/// (On error the struct may be partly filled, as Go leaves it: the log shows it.)
pub struct Bound {
    pub value: Value,
    pub error: Option<BindError>,
}

/// A Go `UnmarshalTypeError`: the JSON value's description and the Go type, with the
/// struct and field path decode.go `addErrorContext` adds.
struct TypeError {
    value: String,
    go_type: String,
    context: Option<(&'static str, String)>,
}

impl TypeError {
    fn message(&self) -> String {
        match &self.context {
            Some((strukt, field)) => format!(
                "json: cannot unmarshal {} into Go struct field {strukt}.{field} of type {}",
                self.value, self.go_type
            ),
            None => format!(
                "json: cannot unmarshal {} into Go value of type {}",
                self.value, self.go_type
            ),
        }
    }
}

#[derive(Default)]
struct Binder {
    /// The first `UnmarshalTypeError` (decode.go `saveError`).
    saved: Option<TypeError>,
    /// JSON field names from the root to the current field (decode.go `errorContext`).
    path: Vec<&'static str>,
    /// The structs being decoded, innermost last.
    structs: Vec<&'static Schema>,
    /// The root struct's fields bound before an UnmarshalJSON error stopped the decode.
    partial: Option<Map<String, Value>>,
}

/// An error that stops decoding at once (from an UnmarshalJSON method).
struct Abort(String);

impl Binder {
    fn context(&self) -> Option<(&'static str, String)> {
        match self.structs.last() {
            Some(s) if !self.path.is_empty() => Some((s.short_name(), self.path.join("."))),
            _ => None,
        }
    }

    fn type_error(&mut self, value: &str, ty: &Ty) {
        if self.saved.is_none() {
            self.saved = Some(TypeError {
                value: value.to_string(),
                go_type: ty.go_name(),
                context: self.context(),
            });
        }
    }

    /// Decode `v` into a field of type `ty` currently holding `cur` (None: Go's zero/nil).
    fn value(
        &mut self,
        cur: Option<Value>,
        ty: &'static Ty,
        v: Json,
    ) -> Result<Option<Value>, Abort> {
        if let Json::Null = v {
            return Ok(null_into(cur, ty));
        }
        match ty {
            Ty::Named(_, inner) => self.named(cur, ty, inner, v),
            Ty::Ptr(inner) => {
                // indirect allocates the pointee even if the value then does not fit.
                let cur = cur.or_else(|| Some(inner.zero()));
                self.value(cur, inner, v)
            }
            Ty::Str => Ok(match v {
                Json::Str(s) => Some(Value::String(s)),
                other => self.mismatch(cur, ty, &other),
            }),
            Ty::Bool => Ok(match v {
                Json::Bool(b) => Some(Value::Bool(b)),
                other => self.mismatch(cur, ty, &other),
            }),
            Ty::Int => Ok(match v {
                // strconv.ParseInt(s, 10, 64): no fraction, no exponent, no overflow.
                Json::Num(s) => match s.parse::<i64>() {
                    Ok(n) => Some(Value::from(n)),
                    Err(_) => {
                        self.type_error(&format!("number {s}"), ty);
                        cur
                    }
                },
                other => self.mismatch(cur, ty, &other),
            }),
            Ty::Float32 | Ty::Float64 => Ok(match v {
                Json::Num(s) => match go_float(&s, matches!(ty, Ty::Float32)) {
                    Some(n) => Some(n),
                    None => {
                        self.type_error(&format!("number {s}"), ty);
                        cur
                    }
                },
                other => self.mismatch(cur, ty, &other),
            }),
            Ty::Any | Ty::Raw => Ok(Some(self.any(v))),
            Ty::Bytes => Ok(match v {
                Json::Str(s) => Some(Value::String(s)),
                other => self.mismatch(cur, ty, &other),
            }),
            Ty::Duration => duration(&v).map(Some).map_err(Abort),
            Ty::Think => think(&v).map(Some).map_err(Abort),
            Ty::Slice(elem) => match v {
                Json::Arr(items) => self.slice(cur, elem, items).map(Some),
                other => Ok(self.mismatch(cur, ty, &other)),
            },
            Ty::Map(elem) => match v {
                Json::Obj(entries) => self.map(cur, elem, entries).map(Some),
                other => Ok(self.mismatch(cur, ty, &other)),
            },
            Ty::Struct(schema) => match v {
                Json::Obj(entries) if schema.custom => self.custom_struct(schema, entries),
                Json::Obj(entries) => {
                    let map = match cur {
                        Some(Value::Object(m)) => m,
                        _ => Map::new(),
                    };
                    self.object(schema, map, entries)
                        .map(|m| Some(Value::Object(m)))
                }
                other => Ok(self.mismatch(cur, ty, &other)),
            },
        }
    }

    /// Elements decode into the old slice's elements in place, as decode.go `array` does.
    fn slice(
        &mut self,
        cur: Option<Value>,
        elem: &'static Ty,
        items: Vec<Json>,
    ) -> Result<Value, Abort> {
        let mut old = match cur {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        }
        .into_iter();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let next = self.value(old.next(), elem, item)?;
            out.push(next.unwrap_or(Value::Null));
        }
        Ok(Value::Array(out))
    }

    /// Entries merge into the existing map.
    fn map(
        &mut self,
        cur: Option<Value>,
        elem: &'static Ty,
        entries: Vec<(String, Json)>,
    ) -> Result<Value, Abort> {
        let mut map = match cur {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for (k, item) in entries {
            // Map values start from zero each time (decode.go `mapElem`).
            let next = self.value(None, elem, item)?;
            map.insert(k, next.unwrap_or(Value::Null));
        }
        Ok(Value::Object(map))
    }

    fn named(
        &mut self,
        cur: Option<Value>,
        outer: &'static Ty,
        inner: &'static Ty,
        v: Json,
    ) -> Result<Option<Value>, Abort> {
        // A mismatch reports the named type, not the underlying one.
        let kind_fits = match (inner, &v) {
            (Ty::Slice(_), Json::Arr(_)) | (Ty::Map(_), Json::Obj(_)) => true,
            (Ty::Slice(_) | Ty::Map(_), _) => false,
            _ => true,
        };
        if kind_fits {
            self.value(cur, inner, v)
        } else {
            Ok(self.mismatch(cur, outer, &v))
        }
    }

    fn mismatch(&mut self, cur: Option<Value>, ty: &Ty, v: &Json) -> Option<Value> {
        self.type_error(v.kind(), ty);
        cur
    }

    /// Fields of a struct, key by key (decode.go `object`).
    fn object(
        &mut self,
        schema: &'static Schema,
        mut map: Map<String, Value>,
        entries: Vec<(String, Json)>,
    ) -> Result<Map<String, Value>, Abort> {
        self.structs.push(schema);
        for (key, item) in entries {
            let Some((name, ty)) = schema.field(&key) else {
                continue;
            };
            self.path.push(name);
            let cur = map.remove(*name);
            let next = self.value(cur, ty, item);
            self.path.pop();
            let next = match next {
                Ok(n) => n,
                Err(abort) => {
                    if self.structs.len() == 1 {
                        self.partial = Some(map);
                    }
                    self.structs.pop();
                    return Err(abort);
                }
            };
            match next {
                Some(v) => {
                    map.insert((*name).to_string(), v);
                }
                None => {
                    map.remove(*name);
                }
            }
        }
        self.structs.pop();
        Ok(map)
    }

    /// A struct with its own UnmarshalJSON that decodes an alias type with json.Unmarshal
    /// (types.go `Message.UnmarshalJSON`): a fresh value, and its first error stops the
    /// decode; the outer decoder's context then names the field holding it.
    fn custom_struct(
        &mut self,
        schema: &'static Schema,
        entries: Vec<(String, Json)>,
    ) -> Result<Option<Value>, Abort> {
        let mut inner = Binder::default();
        let mut map = inner.object(schema, Map::new(), entries)?;
        if let Some(mut e) = inner.saved {
            e.context = self.context();
            return Err(Abort(e.message()));
        }
        // Message.UnmarshalJSON lower-cases the role.
        if let Some(Value::String(role)) = map.get_mut("role") {
            *role = role.to_lowercase();
        }
        Ok(Some(Value::Object(map)))
    }

    /// JSON as `interface{}` holds it: objects are maps (last duplicate wins).
    fn any(&mut self, v: Json) -> Value {
        match v {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(b),
            Json::Num(s) => match go_float(&s, false) {
                Some(n) => n,
                None => {
                    self.type_error(&format!("number {s}"), &Ty::Float64);
                    Value::Null
                }
            },
            Json::Str(s) => Value::String(s),
            Json::Arr(items) => Value::Array(items.into_iter().map(|i| self.any(i)).collect()),
            Json::Obj(entries) => {
                let mut m = Map::new();
                for (k, item) in entries {
                    let v = self.any(item);
                    m.insert(k, v);
                }
                Value::Object(m)
            }
        }
    }
}

/// What JSON null leaves in a field of type `ty` currently holding `cur`.
fn null_into(cur: Option<Value>, ty: &'static Ty) -> Option<Value> {
    match ty {
        // literalStore: null into a primitive or struct is ignored.
        Ty::Str | Ty::Bool | Ty::Int | Ty::Float32 | Ty::Float64 => cur,
        Ty::Struct(s) if !s.custom => cur,
        // Message.UnmarshalJSON("null") leaves a zero Message.
        Ty::Struct(_) => Some(Value::Object(Map::new())),
        Ty::Named(_, t) => null_into(cur, t),
        // Pointers, slices, maps and interfaces become nil.
        _ => None,
    }
}

/// strconv.ParseFloat(s, 64 or 32): out of range is an error, not infinity.
fn go_float(s: &str, single: bool) -> Option<Value> {
    let f: f64 = s.parse().ok()?;
    if !f.is_finite() || (single && f.abs() > f32::MAX as f64) {
        return None;
    }
    Number::from_f64(f).map(Value::Number)
}

/// types.go `Duration.UnmarshalJSON`: seconds as a number, a Go duration string, or an error.
fn duration(v: &Json) -> Result<Value, String> {
    match v {
        Json::Num(s) => go_float(s, false).ok_or_else(|| {
            format!("json: cannot unmarshal number {s} into Go value of type float64")
        }),
        Json::Str(s) => crate::cli::parse_go_duration(s).map(|_| Value::String(s.clone())),
        // reflect.TypeOf of what json.Unmarshal into `any` produced.
        Json::Bool(_) => Err("Unsupported type: 'bool'".into()),
        Json::Arr(_) => Err("Unsupported type: '[]interface {}'".into()),
        Json::Obj(_) => Err("Unsupported type: 'map[string]interface {}'".into()),
        Json::Null => Ok(Value::Null),
    }
}

/// types.go `ThinkValue.UnmarshalJSON`: a bool, or one of the effort strings.
fn think(v: &Json) -> Result<Value, String> {
    match v {
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::Str(s) if matches!(s.as_str(), "high" | "medium" | "low" | "max") => {
            Ok(Value::String(s.clone()))
        }
        Json::Str(s) => Err(format!(
            "invalid think value: {} (must be \"high\", \"medium\", \"low\", \"max\", true, or false)",
            crate::util::json_str(s)
        )),
        _ => Err("think must be a boolean or string (\"high\", \"medium\", \"low\", \"max\", true, or false)".into()),
    }
}

/// Bind `body` into `schema` like `c.ShouldBindJSON(&req)`.
pub fn bind(body: &[u8], schema: &'static Schema) -> Bound {
    let empty = || Value::Object(Map::new());
    let json = match gojson::decode(body) {
        Ok(j) => j,
        Err(DecodeError::Eof) => {
            return Bound {
                value: empty(),
                error: Some(BindError::Eof),
            }
        }
        Err(e) => {
            return Bound {
                value: empty(),
                error: Some(BindError::Invalid(e.message())),
            }
        }
    };
    let mut b = Binder::default();
    let result = match json {
        Json::Obj(entries) => b.object(schema, Map::new(), entries).map(Value::Object),
        // A top-level null leaves the struct at its zero value.
        Json::Null => Ok(empty()),
        other => {
            b.saved = Some(TypeError {
                value: other.kind().into(),
                go_type: schema.go_name.into(),
                context: None,
            });
            Ok(empty())
        }
    };
    match result {
        Ok(value) => Bound {
            value,
            error: b.saved.map(|e| BindError::Invalid(e.message())),
        },
        Err(Abort(msg)) => Bound {
            value: b.partial.take().map_or_else(empty, Value::Object),
            error: Some(BindError::Invalid(msg)),
        },
    }
}

/// Ollama's request structs (api/types.go, openai/openai.go, anthropic/anthropic.go at
/// v0.33.0-rc2), with the fields and types binding sees.
pub mod schemas {
    use super::{Schema, Ty};
    use Ty::*;

    /// A Go struct without its own UnmarshalJSON.
    const fn go_struct(go_name: &'static str, fields: &'static [(&'static str, Ty)]) -> Schema {
        Schema {
            go_name,
            fields,
            custom: false,
        }
    }

    const OPT_BOOL: Ty = Ptr(&Bool);
    const OPTIONS: Ty = Map(&Any);

    pub static MESSAGE: Schema = Schema {
        go_name: "api.Message",
        custom: true,
        fields: &[
            ("role", Str),
            ("content", Str),
            ("thinking", Str),
            ("images", Slice(&Bytes)),
            ("tool_calls", Slice(&Named("api.ToolCall", &Any))),
            ("tool_name", Str),
            ("tool_call_id", Str),
        ],
    };

    pub static GENERATE: Schema = go_struct(
        "api.GenerateRequest",
        &[
            ("model", Str),
            ("prompt", Str),
            ("suffix", Str),
            ("system", Str),
            ("template", Str),
            ("context", Slice(&Int)),
            ("stream", OPT_BOOL),
            ("raw", Bool),
            ("format", Raw),
            ("keep_alive", Ptr(&Duration)),
            ("images", Slice(&Bytes)),
            ("options", OPTIONS),
            ("think", Ptr(&Think)),
            ("truncate", OPT_BOOL),
            ("shift", OPT_BOOL),
            ("_debug_render_only", Bool),
            ("logprobs", Bool),
            ("top_logprobs", Int),
        ],
    );

    pub static CHAT: Schema = go_struct(
        "api.ChatRequest",
        &[
            ("model", Str),
            ("messages", Slice(&Struct(&MESSAGE))),
            ("stream", OPT_BOOL),
            ("format", Raw),
            ("keep_alive", Ptr(&Duration)),
            ("tools", Named("api.Tools", &Slice(&Any))),
            ("options", OPTIONS),
            ("think", Ptr(&Think)),
            ("truncate", OPT_BOOL),
            ("shift", OPT_BOOL),
            ("_debug_render_only", Bool),
            ("logprobs", Bool),
            ("top_logprobs", Int),
        ],
    );

    pub static EMBED: Schema = go_struct(
        "api.EmbedRequest",
        &[
            ("model", Str),
            ("input", Any),
            ("keep_alive", Ptr(&Duration)),
            ("truncate", OPT_BOOL),
            ("dimensions", Int),
            ("options", OPTIONS),
        ],
    );

    pub static EMBEDDING: Schema = go_struct(
        "api.EmbeddingRequest",
        &[
            ("model", Str),
            ("prompt", Str),
            ("keep_alive", Ptr(&Duration)),
            ("options", OPTIONS),
        ],
    );

    const PULL_FIELDS: &[(&str, Ty)] = &[
        ("model", Str),
        ("insecure", Bool),
        ("username", Str),
        ("password", Str),
        ("stream", OPT_BOOL),
        ("name", Str),
    ];

    pub static PULL: Schema = go_struct("api.PullRequest", PULL_FIELDS);

    pub static PUSH: Schema = go_struct("api.PushRequest", PULL_FIELDS);

    pub static CREATE: Schema = go_struct(
        "api.CreateRequest",
        &[
            ("model", Str),
            ("stream", OPT_BOOL),
            ("quantize", Str),
            ("draft_quantize", Str),
            ("from", Str),
            ("remote_host", Str),
            ("files", Map(&Str)),
            ("draft_files", Map(&Str)),
            ("adapters", Map(&Str)),
            ("template", Str),
            ("license", Any),
            ("system", Str),
            ("parameters", OPTIONS),
            ("messages", Slice(&Struct(&MESSAGE))),
            ("renderer", Str),
            ("parser", Str),
            ("requires", Str),
            ("info", OPTIONS),
            ("name", Str),
            ("quantization", Str),
        ],
    );

    pub static DELETE: Schema = go_struct("api.DeleteRequest", &[("model", Str), ("name", Str)]);

    pub static SHOW: Schema = go_struct(
        "api.ShowRequest",
        &[
            ("model", Str),
            ("system", Str),
            ("template", Str),
            ("verbose", Bool),
            ("options", OPTIONS),
            ("name", Str),
        ],
    );

    pub static COPY: Schema =
        go_struct("api.CopyRequest", &[("source", Str), ("destination", Str)]);

    static OA_MESSAGE: Schema = go_struct(
        "openai.Message",
        &[
            ("role", Str),
            ("content", Any),
            ("reasoning", Str),
            ("tool_calls", Slice(&Named("openai.ToolCall", &Any))),
            ("name", Str),
            ("tool_call_id", Str),
        ],
    );

    static STREAM_OPTIONS: Schema = go_struct("openai.StreamOptions", &[("include_usage", Bool)]);

    pub static OA_CHAT: Schema = go_struct(
        "openai.ChatCompletionRequest",
        &[
            ("model", Str),
            ("messages", Slice(&Struct(&OA_MESSAGE))),
            ("stream", Bool),
            ("stream_options", Ptr(&Struct(&STREAM_OPTIONS))),
            ("max_tokens", Ptr(&Int)),
            ("seed", Ptr(&Int)),
            ("stop", Any),
            ("temperature", Ptr(&Float64)),
            ("frequency_penalty", Ptr(&Float64)),
            ("presence_penalty", Ptr(&Float64)),
            ("top_p", Ptr(&Float64)),
            (
                "response_format",
                Ptr(&Named("openai.ResponseFormat", &Any)),
            ),
            ("tools", Slice(&Named("api.Tool", &Any))),
            ("reasoning", Ptr(&Named("openai.Reasoning", &Any))),
            ("reasoning_effort", Ptr(&Str)),
            ("logprobs", OPT_BOOL),
            ("top_logprobs", Int),
            ("_debug_render_only", Bool),
        ],
    );

    pub static OA_COMPLETION: Schema = go_struct(
        "openai.CompletionRequest",
        &[
            ("model", Str),
            ("prompt", Str),
            ("frequency_penalty", Float32),
            ("max_tokens", Ptr(&Int)),
            ("presence_penalty", Float32),
            ("seed", Ptr(&Int)),
            ("stop", Any),
            ("stream", Bool),
            ("stream_options", Ptr(&Struct(&STREAM_OPTIONS))),
            ("temperature", Ptr(&Float32)),
            ("top_p", Float32),
            ("suffix", Str),
            ("logprobs", Ptr(&Int)),
            ("_debug_render_only", Bool),
        ],
    );

    pub static OA_EMBED: Schema = go_struct(
        "openai.EmbedRequest",
        &[
            ("input", Any),
            ("model", Str),
            ("dimensions", Int),
            ("encoding_format", Str),
        ],
    );

    static ANTHROPIC_MESSAGE: Schema =
        go_struct("anthropic.MessageParam", &[("role", Str), ("content", Any)]);

    pub static ANTHROPIC: Schema = go_struct(
        "anthropic.MessagesRequest",
        &[
            ("model", Str),
            ("max_tokens", Int),
            ("messages", Slice(&Struct(&ANTHROPIC_MESSAGE))),
            ("system", Any),
            ("stream", Bool),
            ("temperature", Ptr(&Float64)),
            ("top_p", Ptr(&Float64)),
            ("top_k", Ptr(&Int)),
            ("stop_sequences", Slice(&Str)),
            ("tools", Slice(&Named("anthropic.Tool", &Any))),
            ("tool_choice", Ptr(&Named("anthropic.ToolChoice", &Any))),
            ("thinking", Ptr(&Named("anthropic.ThinkingConfig", &Any))),
            ("metadata", Ptr(&Named("anthropic.Metadata", &Any))),
            ("output_config", Ptr(&Named("anthropic.OutputConfig", &Any))),
        ],
    );

    /// openai.ResponsesRequest, as far as the mock reads it (model and stream).
    pub static OA_RESPONSES: Schema = go_struct(
        "openai.ResponsesRequest",
        &[("model", Str), ("input", Any), ("stream", OPT_BOOL)],
    );
}

#[cfg(test)]
mod tests {
    use super::schemas::*;
    use super::*;
    use serde_json::json;

    fn ok(body: &str, schema: &'static Schema) -> Value {
        let b = bind(body.as_bytes(), schema);
        assert_eq!(b.error, None, "{body}");
        b.value
    }

    fn err(body: &str, schema: &'static Schema) -> String {
        match bind(body.as_bytes(), schema).error {
            Some(BindError::Invalid(m)) => m,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn field_names_fold_and_the_last_match_wins() {
        // decode.go object(): byExactName, else byFoldedName; each match overwrites.
        assert_eq!(ok(r#"{"Model":"llama3.2"}"#, &PULL)["model"], "llama3.2");
        assert_eq!(
            ok(r#"{"model":"qwen2.5:0.5b","MODEL":"llama3.2"}"#, &GENERATE)["model"],
            "llama3.2"
        );
        assert_eq!(
            ok(r#"{"MODEL":"llama3.2","model":"qwen2.5:0.5b"}"#, &GENERATE)["model"],
            "qwen2.5:0.5b"
        );
        // ſ (U+017F) folds to S, the Kelvin sign to K.
        assert_eq!(ok("{\"\u{17f}tream\":false}", &PULL)["stream"], false);
        assert_eq!(
            ok("{\"\u{212a}eep_alive\":\"1m\"}", &GENERATE)["keep_alive"],
            "1m"
        );
        // İ and ı fold to themselves: not a field.
        assert!(ok("{\"\u{130}nput\":\"x\"}", &EMBED).get("input").is_none());
        assert!(ok("{\"\u{131}nput\":\"x\"}", &EMBED).get("input").is_none());
        // Unknown fields are ignored.
        assert_eq!(ok(r#"{"modelx":"a","model":"b"}"#, &PULL)["model"], "b");
    }

    #[test]
    fn null_semantics_per_field_type() {
        // null into a string is a no-op: the earlier key's value stays.
        assert_eq!(
            ok(r#"{"model":"qwen","MODEL":null}"#, &PULL)["model"],
            "qwen"
        );
        // null into a pointer sets nil.
        assert!(ok(r#"{"stream":false,"Stream":null}"#, &PULL)
            .get("stream")
            .is_none());
        // null into a slice or map sets nil.
        assert!(ok(r#"{"options":{"a":1},"options":null}"#, &GENERATE)
            .get("options")
            .is_none());
    }

    #[test]
    fn objects_merge_into_existing_values() {
        let v = ok(r#"{"options":{"a":1},"OPTIONS":{"b":2}}"#, &GENERATE);
        assert_eq!(v["options"], json!({"a": 1.0, "b": 2.0}));
        let v = ok(
            r#"{"stream_options":{"include_usage":true},"stream_options":{}}"#,
            &OA_CHAT,
        );
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn type_errors_keep_decoding_and_report_the_first() {
        let b = bind(br#"{"model":1,"name":"x","stream":"no"}"#, &PULL);
        assert_eq!(
            b.error,
            Some(BindError::Invalid(
                "json: cannot unmarshal number into Go struct field PullRequest.model of type string".into()
            ))
        );
        // Decoding went on after the error.
        assert_eq!(b.value["name"], "x");
        // An UnmarshalJSON error stops the decode; what came before it stays bound.
        let b = bind(
            br#"{"model":"m","keep_alive":"soon","prompt":"p"}"#,
            &GENERATE,
        );
        assert_eq!(b.value["model"], "m");
        assert!(b.value.get("prompt").is_none());
        assert_eq!(
            err(r#"{"top_logprobs":1.5}"#, &GENERATE),
            "json: cannot unmarshal number 1.5 into Go struct field GenerateRequest.top_logprobs of type int"
        );
        assert_eq!(
            err(r#"{"messages":"hi"}"#, &CHAT),
            "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"
        );
        assert_eq!(
            err(r#"{"stream_options":{"include_usage":"yes"}}"#, &OA_CHAT),
            "json: cannot unmarshal string into Go struct field StreamOptions.stream_options.include_usage of type bool"
        );
        assert_eq!(
            err("[1]", &PULL),
            "json: cannot unmarshal array into Go value of type api.PullRequest"
        );
    }

    #[test]
    fn custom_unmarshalers_stop_at_their_error() {
        assert_eq!(
            err(r#"{"keep_alive":"soon","model":"x"}"#, &GENERATE),
            "time: invalid duration \"soon\""
        );
        assert_eq!(
            err(r#"{"keep_alive":true}"#, &CHAT),
            "Unsupported type: 'bool'"
        );
        assert_eq!(
            err(r#"{"think":"very"}"#, &CHAT),
            "invalid think value: \"very\" (must be \"high\", \"medium\", \"low\", \"max\", true, or false)"
        );
        assert_eq!(
            err(r#"{"messages":[{"role":"user","content":5}]}"#, &CHAT),
            "json: cannot unmarshal number into Go struct field ChatRequest.messages of type string"
        );
        // Message.UnmarshalJSON lower-cases the role.
        let v = ok(r#"{"messages":[{"ROLE":"User","content":"hi"}]}"#, &CHAT);
        assert_eq!(v["messages"][0], json!({"role": "user", "content": "hi"}));
    }

    #[test]
    fn empty_and_broken_bodies() {
        assert_eq!(bind(b"  ", &PULL).error, Some(BindError::Eof));
        assert_eq!(err(r#"{"model":"#, &PULL), "unexpected EOF");
        assert_eq!(
            err("{,}", &PULL),
            "invalid character ',' looking for beginning of object key string"
        );
        // A top-level null binds nothing and is not an error.
        assert_eq!(ok("null", &PULL), json!({}));
        // Trailing data after the first value is never read.
        assert_eq!(ok(r#"{"model":"a"} trailing"#, &PULL)["model"], "a");
    }
}
