//! Ollama's route table and gin's routing rules over it (gin v1.10.0, as Ollama's go.mod
//! pins; gin.go `handleHTTPRequest`, tree.go `getValue`).
//!
//! Ollama builds the router with `gin.Default()` and sets `HandleMethodNotAllowed = true`
//! (server/routes.go `GenerateRoutes`); the rest are gin's defaults (gin.go `New`):
//! `UseRawPath = false` (routing is on the decoded `URL.Path`), `RemoveExtraSlash = false`,
//! `RedirectTrailingSlash = true`, `RedirectFixedPath = false` (so route names are
//! case-sensitive and nothing else is cleaned). Per request:
//! 1. The tree of the request's method is searched; a match runs the handler.
//! 2. Otherwise, unless the method is CONNECT or the path is `/`, a trailing-slash
//!    recommendation (`value.tsr`: the path with its trailing slash removed, or added,
//!    exists in the same method's tree) redirects: 301 for GET, 307 for any other method
//!    (gin.go `redirectRequest`).
//! 3. Otherwise every *other* method's tree is searched for an exact match; any found make a
//!    405 whose `Allow` lists them in tree order, i.e. the order in which Ollama first
//!    registered each method: HEAD, GET, POST, DELETE.
//! 4. Otherwise 404.
//!
//! Params (`:digest`, `:model`) match one non-empty segment of the decoded path, so
//! `%2F` in a param splits it and `%3A` becomes `:` (gin `c.Param` is `URL.Path`-based).

use hyper::Method;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    Root,
    Version,
    Status,
    Pull,
    Push,
    Tags,
    Show,
    Delete,
    Me,
    Signout,
    UserKeys,
    Create,
    Blob,
    Copy,
    WebSearch,
    WebFetch,
    ModelRecommendations,
    Ps,
    Generate,
    Chat,
    Embed,
    Embeddings,
    OaChat,
    OaCompletions,
    OaEmbeddings,
    OaModels,
    OaModel,
    OaResponses,
    OaTranscriptions,
    Messages,
}

/// server/routes.go `GenerateRoutes`, in registration order.
const TABLE: &[(&str, &str, Route)] = &[
    ("HEAD", "/", Route::Root),
    ("GET", "/", Route::Root),
    ("HEAD", "/api/version", Route::Version),
    ("GET", "/api/version", Route::Version),
    ("GET", "/api/status", Route::Status),
    ("POST", "/api/pull", Route::Pull),
    ("POST", "/api/push", Route::Push),
    ("HEAD", "/api/tags", Route::Tags),
    ("GET", "/api/tags", Route::Tags),
    ("POST", "/api/show", Route::Show),
    ("DELETE", "/api/delete", Route::Delete),
    ("POST", "/api/me", Route::Me),
    ("POST", "/api/signout", Route::Signout),
    ("DELETE", "/api/user/keys/:encodedKey", Route::UserKeys),
    ("POST", "/api/create", Route::Create),
    ("POST", "/api/blobs/:digest", Route::Blob),
    ("HEAD", "/api/blobs/:digest", Route::Blob),
    ("POST", "/api/copy", Route::Copy),
    ("POST", "/api/experimental/web_search", Route::WebSearch),
    ("POST", "/api/experimental/web_fetch", Route::WebFetch),
    (
        "GET",
        "/api/experimental/model-recommendations",
        Route::ModelRecommendations,
    ),
    ("GET", "/api/ps", Route::Ps),
    ("POST", "/api/generate", Route::Generate),
    ("POST", "/api/chat", Route::Chat),
    ("POST", "/api/embed", Route::Embed),
    ("POST", "/api/embeddings", Route::Embeddings),
    ("POST", "/v1/chat/completions", Route::OaChat),
    ("POST", "/v1/completions", Route::OaCompletions),
    ("POST", "/v1/embeddings", Route::OaEmbeddings),
    ("GET", "/v1/models", Route::OaModels),
    ("GET", "/v1/models/:model", Route::OaModel),
    ("POST", "/v1/responses", Route::OaResponses),
    ("POST", "/v1/audio/transcriptions", Route::OaTranscriptions),
    ("POST", "/v1/messages", Route::Messages),
];

/// gin's method trees in creation order (the first registration of each method above).
const TREE_ORDER: &[&str] = &["HEAD", "GET", "POST", "DELETE"];

#[derive(Debug, PartialEq)]
pub enum Resolution {
    Handler {
        route: Route,
        /// The gin pattern, e.g. `/api/blobs/:digest`.
        pattern: &'static str,
        /// The value of the pattern's param, if it has one.
        param: Option<String>,
    },
    /// gin's trailing-slash redirect: status and the new `URL.Path`.
    Redirect {
        status: u16,
        path: String,
    },
    MethodNotAllowed {
        allow: String,
    },
    NotFound,
}

/// Match a gin pattern against a decoded path; `Some(param)` on a match.
fn matches(pattern: &str, path: &str) -> Option<Option<String>> {
    let mut param = None;
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(param),
            (Some(w), Some(g)) if w.starts_with(':') => {
                if g.is_empty() {
                    return None;
                }
                param = Some(g.to_string());
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return None,
        }
    }
}

fn find(method: &str, path: &str) -> Option<(Route, &'static str, Option<String>)> {
    TABLE
        .iter()
        .filter(|(m, _, _)| *m == method)
        .find_map(|(_, pattern, route)| matches(pattern, path).map(|p| (*route, *pattern, p)))
}

/// gin's routing decision for a method and a decoded path.
pub fn resolve(method: &Method, path: &str) -> Resolution {
    let m = method.as_str();
    if let Some((route, pattern, param)) = find(m, path) {
        return Resolution::Handler {
            route,
            pattern,
            param,
        };
    }
    let has_tree = TREE_ORDER.contains(&m);
    if has_tree && *method != Method::CONNECT && path != "/" {
        let tsr = match path.strip_suffix('/') {
            Some(shorter) => find(m, shorter).is_some(),
            None => find(m, &format!("{path}/")).is_some(),
        };
        if tsr {
            let new_path = trailing_slash_target(None, path);
            let status = if *method == Method::GET { 301 } else { 307 };
            return Resolution::Redirect {
                status,
                path: new_path,
            };
        }
    }
    let allow: Vec<&str> = TREE_ORDER
        .iter()
        .copied()
        .filter(|t| *t != m && find(t, path).is_some())
        .collect();
    if !allow.is_empty() {
        return Resolution::MethodNotAllowed {
            allow: allow.join(", "),
        };
    }
    Resolution::NotFound
}

/// gin.go `redirectTrailingSlash`: the new `URL.Path`, the trailing slash removed (or
/// added). An `X-Forwarded-Prefix` header is path.Clean'ed, stripped of characters outside
/// `[a-zA-Z0-9/-]`, its repeated slashes collapsed, and put in front.
pub fn trailing_slash_target(prefix_header: Option<&str>, path: &str) -> String {
    let p = forwarded_prefix(prefix_header, path);
    match p.strip_suffix('/') {
        Some(shorter) if p.len() > 1 => shorter.to_string(),
        _ => format!("{p}/"),
    }
}

fn forwarded_prefix(header: Option<&str>, path: &str) -> String {
    let prefix = crate::gourl::path_clean(header.unwrap_or(""));
    if prefix == "." {
        return path.to_string();
    }
    let safe: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '/' || *c == '-')
        .collect();
    let mut collapsed = String::with_capacity(safe.len());
    for c in safe.chars() {
        if !(c == '/' && collapsed.ends_with('/')) {
            collapsed.push(c);
        }
    }
    format!("{collapsed}/{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: &str, path: &str) -> Resolution {
        resolve(&Method::from_bytes(method.as_bytes()).unwrap(), path)
    }

    #[test]
    fn routes_and_params() {
        assert_eq!(
            r("POST", "/api/pull"),
            Resolution::Handler {
                route: Route::Pull,
                pattern: "/api/pull",
                param: None
            }
        );
        assert_eq!(
            r("HEAD", "/api/blobs/sha256:ab"),
            Resolution::Handler {
                route: Route::Blob,
                pattern: "/api/blobs/:digest",
                param: Some("sha256:ab".into())
            }
        );
        // Route names are case-sensitive (RedirectFixedPath = false).
        assert_eq!(r("POST", "/API/pull"), Resolution::NotFound);
        assert_eq!(r("POST", "/api/Pull"), Resolution::NotFound);
        // A decoded %2F inside a param splits it: no route.
        assert_eq!(r("POST", "/api/blobs/sha256/ab"), Resolution::NotFound);
        assert_eq!(r("POST", "/api/blobs/"), Resolution::NotFound);
    }

    #[test]
    fn trailing_slash_redirects() {
        assert_eq!(
            r("POST", "/api/pull/"),
            Resolution::Redirect {
                status: 307,
                path: "/api/pull".into()
            }
        );
        assert_eq!(
            r("GET", "/api/tags/"),
            Resolution::Redirect {
                status: 301,
                path: "/api/tags".into()
            }
        );
        assert_eq!(
            r("HEAD", "/api/tags/"),
            Resolution::Redirect {
                status: 307,
                path: "/api/tags".into()
            }
        );
        assert_eq!(
            r("GET", "/v1/models/"),
            Resolution::Redirect {
                status: 301,
                path: "/v1/models".into()
            }
        );
        assert_eq!(
            r("POST", "/api/blobs/x/"),
            Resolution::Redirect {
                status: 307,
                path: "/api/blobs/x".into()
            }
        );
        // Only the request method's own tree recommends: GET /api/pull/ is a 404
        // (no tree matches /api/pull/ exactly for the 405 check either).
        assert_eq!(r("GET", "/api/pull/"), Resolution::NotFound);
        // A method without a tree gets no redirect.
        assert_eq!(r("PUT", "/api/pull/"), Resolution::NotFound);
    }

    #[test]
    fn method_not_allowed_lists_trees_in_order() {
        assert_eq!(
            r("GET", "/api/pull"),
            Resolution::MethodNotAllowed {
                allow: "POST".into()
            }
        );
        assert_eq!(
            r("POST", "/"),
            Resolution::MethodNotAllowed {
                allow: "HEAD, GET".into()
            }
        );
        assert_eq!(
            r("GET", "/api/blobs/x"),
            Resolution::MethodNotAllowed {
                allow: "HEAD, POST".into()
            }
        );
        assert_eq!(
            r("PUT", "/api/tags"),
            Resolution::MethodNotAllowed {
                allow: "HEAD, GET".into()
            }
        );
        assert_eq!(
            r("OPTIONS", "/api/delete"),
            Resolution::MethodNotAllowed {
                allow: "DELETE".into()
            }
        );
    }

    #[test]
    fn forwarded_prefix_is_sanitised() {
        assert_eq!(trailing_slash_target(None, "/api/pull/"), "/api/pull");
        assert_eq!(
            trailing_slash_target(Some("/proxy"), "/api/pull/"),
            "/proxy//api/pull"
        );
        assert_eq!(forwarded_prefix(Some("/a<b>//c"), "/x"), "/ab/c//x");
    }
}
