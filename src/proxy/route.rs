//! Request classification: which API a request belongs to (so errors take that API's shape) and
//! which class of work it is (so admission knows whether it waits). It reads the canonical path
//! (`proxy/canonical.rs`): the decoded `URL.Path` gin routes on, matched exactly as gin v1.10's
//! tree (`tree.go` `getValue`) matches Ollama's routes (server/routes.go `GenerateRoutes`):
//! static routes byte for byte, `:param` segments as one non-empty run of bytes without `/`.
//! Nothing is cleaned here: `/api/chat/` is another path, which gin answers with a redirect, and
//! a method with no handler for the path (gin's 405) is `other` too: no Ollama handler runs.

use super::body::Field;
use http::Method;

/// The error shape a route's clients expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiShape {
    /// `{"error":"..."}`
    Ollama,
    /// `{"error":{"message":"...","type":"...","param":null,"code":null}}`
    OpenAi,
    /// `{"type":"error","error":{"type":"...","message":"..."}}`
    Anthropic,
}

pub use crate::route_class::RouteClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub shape: ApiShape,
    pub class: RouteClass,
    /// A bounded label for logs and metrics: the gin route pattern, or `other`.
    pub name: &'static str,
    /// The JSON body fields the route's Go struct binds that decisions read (api/types.go);
    /// empty when the body is not JSON or names no model.
    pub fields: &'static [Field],
}

impl Route {
    /// Whether the JSON body names a model that routing and the allow-lists read.
    pub fn has_model_body(&self) -> bool {
        self.fields.iter().any(|f| f.names_model())
    }
}

use Field::{Destination, From, KeepAlive, Model, Name, Source, Stream};
const INFERENCE: &[Field] = &[Model, Stream];
/// GenerateRequest, ChatRequest, EmbedRequest, EmbeddingRequest: the compatible routes'
/// requests have no `keep_alive` (Ollama's middleware leaves it nil).
const NATIVE: &[Field] = &[Model, Stream, KeepAlive];
/// PullRequest, PushRequest: `cmp.Or(req.Model, req.Name)`.
const PULL_PUSH: &[Field] = &[Model, Name, Stream];
/// ShowRequest, DeleteRequest.
const SHOW_DELETE: &[Field] = &[Model, Name];
/// CreateRequest: the new model and the one it is made `from`.
const CREATE: &[Field] = &[Model, Name, From, Stream];
const COPY: &[Field] = &[Source, Destination];

const GET: &[&str] = &["GET"];
const GET_HEAD: &[&str] = &["GET", "HEAD"];
const POST: &[&str] = &["POST"];
const POST_HEAD: &[&str] = &["POST", "HEAD"];
const DELETE: &[&str] = &["DELETE"];

/// Ollama's gin routes (server/routes.go `GenerateRoutes`): the methods with a handler, the
/// pattern, its class and body fields. Any other method gets gin's 405 (or 404) and runs
/// nothing: it is classed `other`, like an unknown path.
const STATIC: &[(&[&str], &str, RouteClass, &[Field])] = &[
    (GET_HEAD, "/", RouteClass::Metadata, &[]),
    (GET_HEAD, "/api/version", RouteClass::Metadata, &[]),
    (GET, "/api/status", RouteClass::Metadata, &[]),
    (GET_HEAD, "/api/tags", RouteClass::Metadata, &[]),
    (GET, "/api/ps", RouteClass::Metadata, &[]),
    (POST, "/api/show", RouteClass::Metadata, SHOW_DELETE),
    (POST, "/api/generate", RouteClass::Inference, NATIVE),
    (POST, "/api/chat", RouteClass::Inference, NATIVE),
    (POST, "/api/embed", RouteClass::Inference, NATIVE),
    (POST, "/api/embeddings", RouteClass::Inference, NATIVE),
    (POST, "/api/pull", RouteClass::Management, PULL_PUSH),
    (POST, "/api/push", RouteClass::Management, PULL_PUSH),
    (POST, "/api/create", RouteClass::Management, CREATE),
    (DELETE, "/api/delete", RouteClass::Management, SHOW_DELETE),
    (POST, "/api/copy", RouteClass::Management, COPY),
    (POST, "/api/me", RouteClass::Other, &[]),
    (POST, "/api/signout", RouteClass::Other, &[]),
    (POST, "/api/experimental/web_search", RouteClass::Other, &[]),
    (POST, "/api/experimental/web_fetch", RouteClass::Other, &[]),
    (
        GET,
        "/api/experimental/model-recommendations",
        RouteClass::Metadata,
        &[],
    ),
    (
        POST,
        "/v1/chat/completions",
        RouteClass::Inference,
        INFERENCE,
    ),
    (POST, "/v1/completions", RouteClass::Inference, INFERENCE),
    (POST, "/v1/embeddings", RouteClass::Inference, INFERENCE),
    (POST, "/v1/responses", RouteClass::Inference, INFERENCE),
    (POST, "/v1/messages", RouteClass::Inference, INFERENCE),
    // A multipart form: its model cannot be read.
    (POST, "/v1/audio/transcriptions", RouteClass::Inference, &[]),
    (GET, "/v1/models", RouteClass::Metadata, &[]),
];

/// Routes ending in one `:param` segment: (methods, prefix, name, class).
const PARAM: &[(&[&str], &str, &str, RouteClass)] = &[
    (
        POST_HEAD,
        "/api/blobs/",
        "/api/blobs/:digest",
        RouteClass::Management,
    ),
    (
        GET,
        "/v1/models/",
        "/v1/models/:model",
        RouteClass::Metadata,
    ),
    (
        DELETE,
        "/api/user/keys/",
        "/api/user/keys/:encodedKey",
        RouteClass::Other,
    ),
];

/// The `:param` of a parameterised route, decoded, when `path` matches one (gin: a non-empty
/// segment with no `/`).
pub fn param<'a>(route: &Route, path: &'a [u8]) -> Option<&'a [u8]> {
    let (_, prefix, _, _) = PARAM.iter().find(|(_, _, name, _)| *name == route.name)?;
    path.strip_prefix(prefix.as_bytes())
}

fn shape_of(path: &[u8]) -> ApiShape {
    if path == b"/v1/messages" || path.starts_with(b"/v1/messages/") {
        ApiShape::Anthropic
    } else if path.starts_with(b"/v1/") {
        ApiShape::OpenAi
    } else {
        ApiShape::Ollama
    }
}

/// The route a path that gin never routes (a refused target, a `ServeMux` redirect) still
/// answers in: its shape, class `other`.
pub fn unrouted(path: &[u8]) -> Route {
    Route {
        shape: shape_of(path),
        class: RouteClass::Other,
        name: "other",
        fields: &[],
    }
}

/// Classifies a request by method and decoded path (`URL.Path`, without the query string):
/// the gin route whose handler runs for it, or `other` when none does.
pub fn classify(method: &Method, path: impl AsRef<[u8]>) -> Route {
    let path = path.as_ref();
    let shape = shape_of(path);
    let method = method.as_str();
    if let Some((_, name, class, fields)) = STATIC
        .iter()
        .find(|(methods, p, _, _)| p.as_bytes() == path && methods.contains(&method))
    {
        return Route {
            shape,
            class: *class,
            name,
            fields,
        };
    }
    for (methods, prefix, name, class) in PARAM {
        if let Some(value) = path.strip_prefix(prefix.as_bytes()) {
            if !value.is_empty() && !value.contains(&b'/') && methods.contains(&method) {
                return Route {
                    shape,
                    class: *class,
                    name,
                    fields: &[],
                };
            }
        }
    }
    unrouted(path)
}

/// The class of a gin route pattern (as the mock reports the route it ran), `other` for none.
pub fn class_of_pattern(pattern: &str) -> RouteClass {
    STATIC
        .iter()
        .find(|(_, p, _, _)| *p == pattern)
        .map(|(_, _, c, _)| *c)
        .or_else(|| {
            PARAM
                .iter()
                .find(|(_, _, n, _)| *n == pattern)
                .map(|(_, _, _, c)| *c)
        })
        .unwrap_or(RouteClass::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_shapes() {
        let r = classify(&Method::POST, "/api/chat");
        assert_eq!(
            (r.class, r.shape, r.name),
            (RouteClass::Inference, ApiShape::Ollama, "/api/chat")
        );
        let r = classify(&Method::POST, "/v1/chat/completions");
        assert_eq!(
            (r.class, r.shape),
            (RouteClass::Inference, ApiShape::OpenAi)
        );
        assert_eq!(
            classify(&Method::POST, "/v1/messages").shape,
            ApiShape::Anthropic
        );
        assert_eq!(
            classify(&Method::GET, "/api/tags").class,
            RouteClass::Metadata
        );
        let r = classify(&Method::HEAD, "/api/blobs/sha256:abc");
        assert_eq!(
            (r.class, r.name),
            (RouteClass::Management, "/api/blobs/:digest")
        );
        assert_eq!(
            classify(&Method::GET, "/v1/models/llama3").class,
            RouteClass::Metadata
        );
        // gin does not clean: a trailing slash is another path (gin redirects it).
        assert_eq!(classify(&Method::POST, "/api/chat/").name, "other");
        assert_eq!(classify(&Method::GET, "/nope").shape, ApiShape::Ollama);
        assert_eq!(classify(&Method::GET, "/v1/nope").shape, ApiShape::OpenAi);
    }

    #[test]
    fn params_are_one_non_empty_segment() {
        assert_eq!(classify(&Method::POST, "/api/blobs/").name, "other");
        assert_eq!(classify(&Method::POST, "/api/blobs/a/b").name, "other");
        // A method without a handler runs nothing (gin's 405): `other`.
        assert_eq!(classify(&Method::GET, "/api/blobs/sha256:a").name, "other");
        assert_eq!(classify(&Method::GET, "/api/pull").class, RouteClass::Other);
        assert_eq!(
            classify(&Method::DELETE, "/api/delete").class,
            RouteClass::Management
        );
        assert_eq!(
            classify(&Method::POST, "/api/delete").class,
            RouteClass::Other
        );
        let r = classify(&Method::GET, b"/v1/models/q\xffwen".as_slice());
        assert_eq!(r.name, "/v1/models/:model");
        assert_eq!(param(&r, b"/v1/models/q\xffwen"), Some(&b"q\xffwen"[..]));
        assert_eq!(class_of_pattern("/api/pull"), RouteClass::Management);
        assert_eq!(
            class_of_pattern("/api/blobs/:digest"),
            RouteClass::Management
        );
        assert_eq!(class_of_pattern("/nope"), RouteClass::Other);
    }
}
