//! Model management and metadata routes of the native API.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bind::{schemas, Schema};
use crate::http::{self, Ctx, Flavor};
use crate::infer::parse;
use crate::state::{canonical_name, valid_name, Model};
use crate::stream::{Body, LineStream};
use crate::util;

#[derive(Serialize)]
pub struct Details<'a> {
    parent_model: &'a str,
    format: &'a str,
    family: &'a str,
    families: [&'a str; 1],
    parameter_size: &'a str,
    quantization_level: &'a str,
}

pub fn details(m: &Model) -> Details<'_> {
    Details {
        parent_model: "",
        format: "gguf",
        family: &m.family,
        families: [&m.family],
        parameter_size: &m.parameter_size,
        quantization_level: &m.quantization,
    }
}

#[derive(Serialize)]
struct ListModel<'a> {
    name: &'a str,
    model: &'a str,
    modified_at: String,
    size: u64,
    digest: &'a str,
    details: Details<'a>,
}

#[derive(Serialize)]
struct PsModel<'a> {
    name: &'a str,
    model: &'a str,
    size: u64,
    digest: &'a str,
    details: Details<'a>,
    expires_at: String,
    size_vram: u64,
    context_length: u64,
}

#[derive(Serialize)]
struct Models<T> {
    models: Vec<T>,
}

/// One progress line of pull/push/create, in Ollama's field order.
#[derive(Serialize)]
struct Progress<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed: Option<u64>,
}

fn status_line(status: &str) -> Bytes {
    progress_line(status, None, None, None)
}

fn progress_line(
    status: &str,
    digest: Option<&str>,
    total: Option<u64>,
    completed: Option<u64>,
) -> Bytes {
    let mut b = serde_json::to_vec(&Progress {
        status,
        digest,
        total,
        completed,
    })
    .unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

pub fn tags(ctx: &Ctx) -> Response<Body> {
    let mut models = ctx.state.models.read().unwrap().clone();
    models.sort_by_key(|m| std::cmp::Reverse(m.modified_at));
    let list: Vec<_> = models
        .iter()
        .map(|m| ListModel {
            name: &m.name,
            model: &m.name,
            modified_at: util::rfc3339(m.modified_at),
            size: m.size,
            digest: &m.digest,
            details: details(m),
        })
        .collect();
    json_of(&Models { models: list })
}

pub fn ps(ctx: &Ctx) -> Response<Body> {
    let models = ctx.state.models.read().unwrap().clone();
    let mut loaded: Vec<_> = models
        .iter()
        .filter_map(|m| m.loaded_until().map(|t| (t, m)))
        .collect();
    loaded.sort_by_key(|e| std::cmp::Reverse(e.0));
    let list: Vec<_> = loaded
        .iter()
        .map(|(t, m)| {
            let size = m.footprint();
            PsModel {
                name: &m.name,
                model: &m.name,
                size,
                digest: &m.digest,
                details: details(m),
                expires_at: util::rfc3339(*t),
                size_vram: size,
                context_length: 4096,
            }
        })
        .collect();
    json_of(&Models { models: list })
}

pub fn json_of<T: Serialize>(v: &T) -> Response<Body> {
    http::json_bytes(StatusCode::OK, serde_json::to_vec(v).unwrap_or_default())
}

#[derive(Deserialize, Default)]
struct NameRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    destination: Option<String>,
}

impl NameRequest {
    fn name(&self) -> String {
        self.model
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| self.name.clone())
            .unwrap_or_default()
    }
}

/// Bind the body into the route's request struct and log the model the handler acts on:
/// `cmp.Or(req.Model, req.Name)` (routes.go PullHandler, PushHandler, DeleteHandler,
/// CreateHandler; ShowHandler picks the same way).
fn parse_names(
    ctx: &mut Ctx,
    body: &[u8],
    schema: &'static Schema,
) -> Result<NameRequest, Response<Body>> {
    let r: NameRequest = parse(ctx, body, Flavor::Native, schema)?;
    let n = r.name();
    ctx.commit_log(Some(n.as_str()).filter(|s| !s.is_empty()));
    Ok(r)
}

/// `parse_names` for the handlers that refuse an empty name before looking it up.
fn parse_required_name(
    ctx: &mut Ctx,
    body: &[u8],
    schema: &'static Schema,
) -> Result<(NameRequest, String), Response<Body>> {
    let r = parse_names(ctx, body, schema)?;
    let name = r.name();
    if name.is_empty() {
        return Err(native_err(StatusCode::BAD_REQUEST, "model is required"));
    }
    Ok((r, name))
}

fn native_err(status: StatusCode, msg: &str) -> Response<Body> {
    http::error(Flavor::Native, status, msg)
}

pub fn show(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    let (_, name) = match parse_required_name(ctx, body, &schemas::SHOW) {
        Ok(named) => named,
        Err(e) => return e,
    };
    let Some(m) = ctx.state.find_model(&name) else {
        return native_err(StatusCode::NOT_FOUND, &format!("model '{name}' not found"));
    };
    let template = if m.embedding_only {
        "{{ .Prompt }}"
    } else {
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    };
    let parameters = if m.embedding_only {
        "num_ctx                        8192".to_string()
    } else {
        [
            "stop                           \"<|start_header_id|>\"",
            "stop                           \"<|end_header_id|>\"",
            "stop                           \"<|eot_id|>\"",
        ]
        .join("\n")
    };
    let modelfile = modelfile(&m, template, &parameters);
    let copilot = ctx
        .user_agent
        .as_ref()
        .and_then(|u| u.to_str().ok())
        .is_some_and(|u| u.starts_with("GitHubCopilotChat/"));
    let info = model_info(&m, copilot.then_some(name.as_str()));
    #[derive(Serialize)]
    struct Show<'a> {
        license: &'a str,
        modelfile: String,
        parameters: String,
        template: &'a str,
        details: Details<'a>,
        model_info: serde_json::Map<String, serde_json::Value>,
        tensors: [u8; 0],
        capabilities: &'a [&'a str],
        modified_at: String,
    }
    json_of(&Show {
        license: "",
        modelfile,
        parameters,
        template,
        details: details(&m),
        model_info: info,
        tensors: [],
        capabilities: m.capabilities(),
        modified_at: util::rfc3339(m.modified_at),
    })
}

/// The Modelfile `ollama show` prints for `m`.
fn modelfile(m: &Model, template: &str, parameters: &str) -> String {
    let blob = format!("/root/.ollama/models/blobs/sha256-{}", m.digest);
    let mut modelfile = format!(
        "# Modelfile generated by \"ollama show\"\n# To build a new Modelfile based on this, replace FROM with:\n# FROM {}\n\nFROM {blob}\nTEMPLATE \"\"\"{template}\"\"\"\n",
        m.name
    );
    for line in parameters.lines() {
        modelfile.push_str(&format!("PARAMETER {line}\n"));
    }
    modelfile
}

/// The GGUF metadata `show` answers; `basename` replaces the general one (GitHub Copilot
/// Chat gets the requested name there).
fn model_info(m: &Model, basename: Option<&str>) -> serde_json::Map<String, serde_json::Value> {
    let f = &m.family;
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(f));
    info.insert("general.basename".into(), json!(m.name.split(':').next()));
    info.insert("general.file_type".into(), json!(15));
    info.insert("general.parameter_count".into(), json!(m.parameter_count));
    info.insert("general.quantization_version".into(), json!(2));
    info.insert(format!("{f}.block_count"), json!(m.block_count));
    info.insert(format!("{f}.context_length"), json!(m.context_length));
    info.insert(format!("{f}.embedding_length"), json!(m.embedding_length));
    info.insert("tokenizer.ggml.model".into(), json!("gpt2"));
    if let Some(name) = basename {
        info.insert("general.basename".into(), json!(name));
    }
    info
}

/// Answer a progress stream, or only its last line when `"stream": false`.
async fn progress(
    ctx: &Ctx,
    stream: Option<bool>,
    lines: Vec<Bytes>,
    on_last: Box<dyn FnOnce() + Send>,
) -> Response<Body> {
    let delay = ctx.state.knobs.token_delay();
    if stream == Some(false) {
        // Ollama waits for the end and answers the last progress object.
        let total = delay.mul_f64(lines.len().saturating_sub(1) as f64);
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        on_last();
        let last = lines.last().cloned().unwrap_or_default();
        let status = if last.starts_with(b"{\"error\"") {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        let trimmed = last.slice(..last.len().saturating_sub(1));
        return http::text(status, "application/json", trimmed);
    }
    http::stream(
        "application/x-ndjson",
        Body::Lines(Box::new(LineStream::new(lines, delay, Some(on_last)))),
    )
}

/// Pull's and create's progress, ended by writing the manifest: the model `name` (a copy of
/// `src`, if given) is installed as the last line goes out.
async fn install_progress(
    ctx: &Ctx,
    stream: Option<bool>,
    mut lines: Vec<Bytes>,
    name: String,
    src: Option<Arc<Model>>,
) -> Response<Body> {
    lines.push(status_line("writing manifest"));
    lines.push(status_line("success"));
    let state = ctx.state.clone();
    let install = move || state.install(&name, src.as_deref());
    progress(ctx, stream, lines, Box::new(install)).await
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn layers(m: &Model) -> Vec<(String, u64)> {
    let mut out = vec![(m.digest.clone(), m.size)];
    for (i, size) in [(1u64, 1_429u64), (2, 7_711), (3, 96), (4, 485)] {
        out.push((
            util::sha256_hex(format!("{}#{i}", m.digest).as_bytes()),
            size,
        ));
    }
    out
}

pub async fn pull(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    let r = match parse_names(ctx, body, &schemas::PULL) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let name = r.name();
    if !valid_name(&name) {
        return native_err(StatusCode::BAD_REQUEST, "invalid model name");
    }
    let mut lines = vec![status_line("pulling manifest")];
    let base = canonical_name(&name);
    if base
        .rsplit('/')
        .next()
        .is_some_and(|m| m.starts_with("missing"))
    {
        lines.push(Bytes::from_static(
            b"{\"error\":\"pull model manifest: file does not exist\"}\n",
        ));
        return progress(ctx, r.stream, lines, Box::new(|| {})).await;
    }
    let template = Model::new(&name, ctx.state.started, 1);
    for (digest, total) in layers(&template) {
        let status = format!("pulling {}", short(&digest));
        let d = format!("sha256:{digest}");
        lines.push(progress_line(&status, Some(&d), Some(total), None));
        lines.push(progress_line(
            &status,
            Some(&d),
            Some(total),
            Some(total / 2),
        ));
        lines.push(progress_line(&status, Some(&d), Some(total), Some(total)));
    }
    lines.push(status_line("verifying sha256 digest"));
    install_progress(ctx, r.stream, lines, name, None).await
}

pub async fn push(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    let (r, name) = match parse_required_name(ctx, body, &schemas::PUSH) {
        Ok(named) => named,
        Err(e) => return e,
    };
    let Some(m) = ctx.state.find_model(&name) else {
        let c = canonical_name(&name);
        let (b, t) = c.rsplit_once(':').unwrap_or((&c, "latest"));
        let b = if b.contains('/') {
            b.to_string()
        } else {
            format!("library/{b}")
        };
        return native_err(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!(
                "open /root/.ollama/models/manifests/registry.ollama.ai/{b}/{t}: no such file or directory"
            ),
        );
    };
    let mut lines = vec![status_line("retrieving manifest")];
    for (digest, total) in layers(&m) {
        let d = format!("sha256:{digest}");
        lines.push(progress_line(
            "starting upload",
            Some(&d),
            Some(total),
            None,
        ));
        let status = format!("pushing {}", short(&digest));
        lines.push(progress_line(&status, Some(&d), Some(total), Some(total)));
    }
    lines.push(status_line("pushing manifest"));
    lines.push(status_line("success"));
    progress(ctx, r.stream, lines, Box::new(|| {})).await
}

pub async fn create(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    let r = match parse_names(ctx, body, &schemas::CREATE) {
        Ok(r) => r,
        Err(e) => return e,
    };
    // The other fields as the Go struct holds them (folded names, last match wins).
    let raw = crate::bind::bind(body, &schemas::CREATE).value;
    let name = r.name();
    if !valid_name(&name) {
        return native_err(StatusCode::BAD_REQUEST, "invalid model name");
    }
    let has_files = raw.get("files").is_some_and(|f| !f.is_null());
    let from = r.from.clone().filter(|f| !f.is_empty());
    if from.is_none() && !has_files {
        return native_err(
            StatusCode::BAD_REQUEST,
            "neither 'from' or 'files' was specified",
        );
    }
    let src = match &from {
        Some(f) => match ctx.state.find_model(f) {
            Some(m) => Some(m),
            None => {
                return native_err(StatusCode::NOT_FOUND, &format!("model '{f}' not found"));
            }
        },
        None => None,
    };
    let mut lines = vec![status_line("gathering model components")];
    let digests: Vec<String> = match &src {
        Some(m) => layers(m).into_iter().map(|(d, _)| d).take(3).collect(),
        None => raw["files"]
            .as_object()
            .map(|o| {
                o.values()
                    .filter_map(|v| v.as_str())
                    .map(|s| s.trim_start_matches("sha256:").to_string())
                    .collect()
            })
            .unwrap_or_default(),
    };
    for d in &digests {
        lines.push(status_line(&format!("using existing layer sha256:{d}")));
    }
    for key in ["template", "system", "parameters", "license", "messages"] {
        if raw.get(key).is_some_and(|v| !v.is_null()) {
            let d = util::sha256_hex(format!("{name}#{key}").as_bytes());
            lines.push(status_line(&format!("creating new layer sha256:{d}")));
        }
    }
    install_progress(ctx, r.stream, lines, name, src).await
}

pub fn delete(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    let r = match parse_names(ctx, body, &schemas::DELETE) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let name = r.name();
    if !valid_name(&name) {
        return native_err(
            StatusCode::BAD_REQUEST,
            &format!("name {} is invalid", util::json_str(&name)),
        );
    }
    if ctx.state.remove_model(&name) {
        http::empty(StatusCode::OK)
    } else {
        native_err(StatusCode::NOT_FOUND, &format!("model '{name}' not found"))
    }
}

pub fn copy(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    let r: NameRequest = match parse(ctx, body, Flavor::Native, &schemas::COPY) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let src = r.source.clone().unwrap_or_default();
    let dst = r.destination.clone().unwrap_or_default();
    ctx.bound(
        Some(src.as_str()).filter(|s| !s.is_empty()),
        Some(dst.as_str()).filter(|s| !s.is_empty()),
    );
    if !valid_name(&src) {
        return native_err(
            StatusCode::BAD_REQUEST,
            &format!("source {} is invalid", util::json_str(&src)),
        );
    }
    if !valid_name(&dst) {
        return native_err(
            StatusCode::BAD_REQUEST,
            &format!("destination {} is invalid", util::json_str(&dst)),
        );
    }
    let Some(m) = ctx.state.find_model(&src) else {
        return native_err(
            StatusCode::NOT_FOUND,
            &format!("model {} not found", util::json_str(&src)),
        );
    };
    ctx.state.install(&dst, Some(&m));
    http::empty(StatusCode::OK)
}

fn valid_digest(d: &str) -> bool {
    let rest = d
        .strip_prefix("sha256:")
        .or_else(|| d.strip_prefix("sha256-"));
    rest.is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// HEAD/POST /api/blobs/:digest. Uploads are hashed as they stream in, never buffered.
pub async fn blob(ctx: &mut Ctx, mut body: Incoming) -> Response<Body> {
    use sha2::{Digest, Sha256};
    let param = ctx.param.clone().unwrap_or_default();
    if !valid_digest(&param) {
        http::drain(ctx, body).await;
        return native_err(StatusCode::BAD_REQUEST, "invalid digest format");
    }
    // Stored under its file name, where ':' becomes '-'.
    let key = param.replacen("sha256:", "sha256-", 1);
    let stored = ctx.state.blobs.lock().unwrap().contains(&key);
    if ctx.method == Method::HEAD {
        http::drain(ctx, body).await;
        return if stored {
            http::empty(StatusCode::OK)
        } else {
            native_err(
                StatusCode::NOT_FOUND,
                &format!("blob {} not found", util::json_str(&param)),
            )
        };
    }
    if stored {
        // Ollama answers at once without reading the upload.
        return http::empty(StatusCode::OK);
    }
    let mut h = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len() as u64;
                    h.update(d);
                }
            }
            Err(_) => return http::empty(StatusCode::BAD_REQUEST),
        }
    }
    let got = format!("sha256:{}", util::hex(&h.finalize()));
    ctx.set_body_digest(len, got["sha256:".len()..].to_string());
    if got != param {
        return native_err(
            StatusCode::BAD_REQUEST,
            &format!(
                "digest mismatch, expected {}, got {}",
                util::json_str(&param),
                util::json_str(&got)
            ),
        );
    }
    ctx.state.blobs.lock().unwrap().insert(key);
    http::empty(StatusCode::CREATED)
}
