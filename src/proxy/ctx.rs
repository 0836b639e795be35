//! What one request has learned so far: the context Pingora hands every hook. Its fields are
//! private to `proxy/`; where one stage alone writes a field it is named beside it. `outcome`
//! and `status` are set wherever the request ends (`respond::reject` for the sidecar's own
//! answers, the relay, the conductor's `logging` for the ordinary proxy path).

use super::{canonical, retry, route, tap, usage};
use crate::app::{ActiveGuard, App};
use crate::metrics::Outcome;
use crate::reject::Reject;
use crate::upstream::{InFlightGuard, Instance};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the parent request hands its subrequest: the instance chosen and the request id.
#[derive(Clone)]
pub struct Dispatch {
    pub instance: Arc<Instance>,
    /// The parent's configuration generation: the subrequest decides under the same rules.
    pub app: Arc<App>,
    pub request_id: String,
    /// The length of the body handed over, which the subrequest's `Content-Length` must say
    /// (Pingora builds the subrequest from the client's raw header, and the body may have been
    /// extended: `usage.rs`).
    pub body_length: usize,
}

pub struct RequestCtx {
    /// The configuration generation this request runs under, taken once when it arrived
    /// (`App::current`): a reload changes the rules for later requests only.
    pub(super) app: Arc<App>,
    /// Classification (`request_filter`).
    pub(super) route: route::Route,
    /// The canonical path (`canonical::path_view`): the decoded path gin routes on, or why the
    /// target was refused (`request_filter`).
    pub(super) path: Result<canonical::PathView, canonical::PathRefusal>,
    pub(super) request_id: String,
    pub(super) started: Instant,
    /// Set in a subrequest: the instance its parent was admitted to.
    pub(super) dispatch: Option<Dispatch>,
    /// Keeps the request counted for the shutdown drain.
    pub(super) active: Option<ActiveGuard>,
    /// The instance currently serving the request, counted as in flight there (`upstream_peer`).
    pub(super) upstream: Option<InFlightGuard>,
    /// A model-management slot, held until the request ends.
    pub(super) management_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Instances tried so far (by registry index), on the ordinary proxy path.
    pub(super) tried: Vec<usize>,
    /// The upstream response's content type, for an in-band error if the stream breaks.
    pub(super) response_content_type: Option<String>,
    /// The body was read by the sidecar (`request_body::read`): `100 Continue` is answered and
    /// the connection is reusable after an answer of its own.
    pub(super) body_read: bool,
    // What the request path learns, for the access log and metrics.
    pub(super) model: Option<String>,
    /// The session the request gives its model in Ollama, when the body names a `keep_alive`.
    pub(super) keep_alive: Option<crate::keep_alive::KeepAlive>,
    /// The client's identity for fairness: a key's name, or `client_id_header`, or its address.
    pub(super) client: Option<Arc<str>>,
    /// The instance the inference path was admitted to.
    pub(super) instance: Option<String>,
    /// Why admission chose that instance (`admission::Reason`; the inference path).
    pub(super) placement: Option<&'static str>,
    pub(super) queue_wait: Option<Duration>,
    pub(super) first_byte: Option<Duration>,
    /// The status the client got (a relayed one, or the sidecar's own).
    pub(super) status: u16,
    pub(super) request_bytes: u64,
    pub(super) response_bytes: u64,
    pub(super) outcome: Outcome,
    /// The sidecar's own answer, when it gave one (`respond::reject`).
    pub(super) reject: Option<Reject>,
    /// Reads the relayed response for tokens and in-band errors.
    pub(super) tap: tap::StreamTap,
    /// Takes out the usage event the sidecar asked for on the client's behalf (`usage.rs`).
    pub(super) usage_strip: usage::UsageStrip,
    /// Retries made, and why.
    pub(super) retries: u32,
    pub(super) retry_reasons: Vec<retry::RetryReason>,
    /// What access control learned (the API key, its in-flight count).
    pub(super) policy: crate::policy::RequestPolicy,
    /// The response offered keep-alive (counted for a binary upgrade's hand-over).
    pub(super) keepalive_promise: Option<crate::upgrade::KeepAlivePromise>,
}

impl RequestCtx {
    pub(super) fn new(app: Arc<App>) -> RequestCtx {
        RequestCtx {
            app,
            route: route::classify(&http::Method::GET, "/"),
            path: Ok(canonical::PathView::Routed(b"/".to_vec())),
            request_id: String::new(),
            started: Instant::now(),
            dispatch: None,
            active: None,
            upstream: None,
            management_permit: None,
            tried: Vec::new(),
            response_content_type: None,
            body_read: false,
            model: None,
            keep_alive: None,
            client: None,
            instance: None,
            placement: None,
            queue_wait: None,
            first_byte: None,
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
            outcome: Outcome::Pending,
            reject: None,
            tap: tap::StreamTap::default(),
            usage_strip: usage::UsageStrip::default(),
            retries: 0,
            retry_reasons: Vec::new(),
            policy: Default::default(),
            keepalive_promise: None,
        }
    }

    pub(super) fn instance_name(&self) -> Option<&str> {
        self.upstream
            .as_ref()
            .map(|g| g.instance().name.as_str())
            .or(self.instance.as_deref())
    }

    pub(super) fn is_subrequest(&self) -> bool {
        self.dispatch.is_some()
    }
}
