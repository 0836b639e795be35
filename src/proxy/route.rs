//! Request classification: which API a path belongs to (so errors take that API's shape) and
//! which class of work it is (so admission knows whether it waits). Paths are never normalised.

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

/// What kind of work a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// Generation and embeddings: admitted into a slot.
    Inference,
    /// Listing and describing: never waits.
    Metadata,
    /// pull/push/create/copy/delete/blobs: its own small limit.
    Management,
    /// Anything else (unknown paths): passed through, Ollama answers 404/405 itself.
    Other,
}

impl RouteClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Inference => "inference",
            RouteClass::Metadata => "metadata",
            RouteClass::Management => "management",
            RouteClass::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub shape: ApiShape,
    pub class: RouteClass,
    /// A bounded label for logs and metrics: the route's pattern, or `other`.
    pub name: &'static str,
    /// Whether the JSON body names a model that routing may use.
    pub has_model_body: bool,
}

const KNOWN: &[(&str, RouteClass, bool)] = &[
    ("/", RouteClass::Metadata, false),
    ("/api/version", RouteClass::Metadata, false),
    ("/api/status", RouteClass::Metadata, false),
    ("/api/tags", RouteClass::Metadata, false),
    ("/api/ps", RouteClass::Metadata, false),
    ("/api/show", RouteClass::Metadata, true),
    ("/api/generate", RouteClass::Inference, true),
    ("/api/chat", RouteClass::Inference, true),
    ("/api/embed", RouteClass::Inference, true),
    ("/api/embeddings", RouteClass::Inference, true),
    ("/api/pull", RouteClass::Management, true),
    ("/api/push", RouteClass::Management, true),
    ("/api/create", RouteClass::Management, true),
    ("/api/delete", RouteClass::Management, true),
    ("/api/copy", RouteClass::Management, true),
    ("/v1/chat/completions", RouteClass::Inference, true),
    ("/v1/completions", RouteClass::Inference, true),
    ("/v1/embeddings", RouteClass::Inference, true),
    ("/v1/responses", RouteClass::Inference, true),
    ("/v1/messages", RouteClass::Inference, true),
    ("/v1/audio/transcriptions", RouteClass::Inference, false),
    ("/v1/models", RouteClass::Metadata, false),
];

/// Classifies a request by method and path (the query string is not part of `path`).
pub fn classify(_method: &Method, path: &str) -> Route {
    let shape = if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        ApiShape::Anthropic
    } else if path.starts_with("/v1/") {
        ApiShape::OpenAi
    } else {
        ApiShape::Ollama
    };
    if let Some((name, class, has_model_body)) = KNOWN.iter().find(|(p, _, _)| *p == path) {
        return Route {
            shape,
            class: *class,
            name,
            has_model_body: *has_model_body,
        };
    }
    let (name, class) = if path.starts_with("/api/blobs/") {
        ("/api/blobs/:digest", RouteClass::Management)
    } else if path.starts_with("/v1/models/") {
        ("/v1/models/:model", RouteClass::Metadata)
    } else {
        ("other", RouteClass::Other)
    };
    Route {
        shape,
        class,
        name,
        has_model_body: false,
    }
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
        // Never normalised: a trailing slash is another path, which Ollama answers itself.
        assert_eq!(classify(&Method::POST, "/api/chat/").name, "other");
        assert_eq!(classify(&Method::GET, "/nope").shape, ApiShape::Ollama);
        assert_eq!(classify(&Method::GET, "/v1/nope").shape, ApiShape::OpenAi);
    }
}
