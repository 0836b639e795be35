//! OpenAI-compatible model listing (`/v1/models`, `/v1/models/:model`).
//! Chat, completions and embeddings live in `infer`.

use hyper::{Response, StatusCode};
use serde::Serialize;

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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn model(ctx: &mut Ctx) -> Response<Body> {
    let id = percent_decode(&ctx.path["/v1/models/".len()..]);
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
