//! The admission stage: a slot from the admission queue, waited for while the client is
//! watched. [`ClientWatch`] is the one "wait, but notice the client leaving" helper: the queue
//! wait, the pause before a retry and the relay all go through it.

use crate::admission::{AdmitRequest, Admitted, Permit, Refusal};
use crate::app::App;
use crate::reject::Reject;
use pingora_proxy::Session;
use std::future::Future;

/// Watches the client connection while the request waits for something else.
pub struct ClientWatch {
    /// Off once the client sent bytes of a next request (pipelined): they are not a departure.
    watching: bool,
}

impl ClientWatch {
    pub fn new() -> ClientWatch {
        ClientWatch { watching: true }
    }

    /// Awaits `work`, unless the client disconnects first (`None`). `work` is polled first, so
    /// an outcome that is ready wins over a departure seen at the same moment.
    pub async fn until<F: Future>(&mut self, session: &mut Session, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                read = session.as_downstream_mut().read_body_or_idle(true), if self.watching => {
                    match read {
                        Err(_) => return None,
                        Ok(_) => self.watching = false,
                    }
                }
            }
        }
    }
}

/// What admission decided for one attempt.
pub enum Admission {
    Granted(Permit),
    Refused(Reject),
    ClientGone,
}

/// Asks admission for a slot (so every request is counted there, even one whose client is
/// already gone), then waits for it while watching the client: one that disconnects leaves the
/// queue at once (dropping the wait is the cancellation). `model` is the name as the client
/// sent it, for a refusal's message.
pub async fn admit(
    app: &App,
    session: &mut Session,
    watch: &mut ClientWatch,
    request: AdmitRequest,
    model: Option<&str>,
) -> Admission {
    let refused = |refusal: &Refusal| refused(refusal, app, model);
    let waiting = match app.admission.admit(request) {
        Ok(Admitted::Now(permit)) => return Admission::Granted(permit),
        Ok(Admitted::Queued(waiting)) => waiting,
        Err(refusal) => return Admission::Refused(refused(&refusal)),
    };
    match watch.until(session, waiting.wait()).await {
        Some(Ok(permit)) => Admission::Granted(permit),
        Some(Err(refusal)) => Admission::Refused(refused(&refusal)),
        None => Admission::ClientGone,
    }
}

/// The answer to a request admission refused.
fn refused(refusal: &Refusal, app: &App, model: Option<&str>) -> Reject {
    match refusal {
        Refusal::QueueFull => Reject::QueueFull,
        Refusal::QueueBytesFull => Reject::QueueBytesFull,
        Refusal::WaitExpired { waited } => Reject::WaitExpired {
            waited: *waited,
            max_wait: app.config.admission.max_wait,
        },
        Refusal::Closed => Reject::ShuttingDown,
        Refusal::ModelUnavailable => Reject::ModelUnavailable {
            model: model.unwrap_or_default().to_string(),
        },
        Refusal::ModelRestricted => Reject::ModelRestricted {
            model: model.unwrap_or_default().to_string(),
        },
        Refusal::NotReadySoon { wait, cause } => Reject::NotReadySoon {
            wait: *wait,
            cause,
            max_wait: app.config.admission.max_wait,
        },
    }
}
