//! OpenAI-compatible model listing (`/v1/models`, `/v1/models/:model`).
//! Chat, completions and embeddings live in `infer`.

use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::bind::schemas;
use crate::http::{self, Ctx, Flavor};
use crate::native::json_of;
use crate::state::Model;
use crate::stream::Body;
use crate::util;

fn owner(name: &str) -> &str {
    match name.rsplit_once('/') {
        Some((ns, _)) => ns.rsplit('/').next().unwrap_or("library"),
        None => "library",
    }
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

fn object<'a>(id: &'a str, m: &'a Model) -> ModelObject<'a> {
    ModelObject {
        id,
        object: "model",
        created: util::unix_secs(m.modified_at),
        owned_by: owner(&m.name),
    }
}

#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

pub fn models(ctx: &Ctx) -> Response<Body> {
    let mut models = ctx.state.models.read().unwrap().clone();
    models.sort_by_key(|m| std::cmp::Reverse(m.modified_at));
    let data: Vec<_> = models.iter().map(|m| object(&m.name, m)).collect();
    json_of(&List {
        object: "list",
        data,
    })
}

pub fn model(ctx: &mut Ctx) -> Response<Body> {
    // middleware/openai.go RetrieveMiddleware: the `:model` param, decoded once by Go.
    let id = ctx.param.clone().unwrap_or_default();
    ctx.commit_log(Some(&id));
    match ctx.state.find_model(&id) {
        Some(m) => json_of(&object(&id, &m)),
        None => http::error(
            Flavor::OpenAi,
            StatusCode::NOT_FOUND,
            &format!("model '{id}' not found"),
        ),
    }
}

/// `POST /v1/responses`: bound like Ollama's ResponsesMiddleware so the log shows the model,
/// then answered 501 (the mock does not generate Responses API output).
pub fn responses(ctx: &mut Ctx, body: &[u8]) -> Response<Body> {
    #[derive(serde::Deserialize)]
    struct Req {
        #[serde(default)]
        model: Option<String>,
    }
    let req: Req = match crate::infer::parse(ctx, body, Flavor::OpenAi, &schemas::OA_RESPONSES) {
        Ok(r) => r,
        Err(e) => return e,
    };
    ctx.commit_log(req.model.as_deref().filter(|m| !m.is_empty()));
    http::error(
        Flavor::OpenAi,
        StatusCode::NOT_IMPLEMENTED,
        "mock-ollama does not implement /v1/responses",
    )
}
