//! Who waits, for operators (`/status`, the status page): each queued request's client, model,
//! priority and wait, in the order the queue would serve them now. Read-only, taken under the
//! scheduler's lock like [`super::AdmissionSnapshot`]; O(n log n) in the waiters, so it is for
//! the admin listener, not the request path.

use super::Admission;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterView {
    /// 1 = served next (if a slot frees now and nothing else arrives).
    pub position: usize,
    /// The unit of fairness: the API key's name, else `X-Client-Id` (or the configured header),
    /// else the client's address.
    pub client: Arc<str>,
    pub model: Option<String>,
    pub priority: i32,
    pub body_bytes: u64,
    pub waited: Duration,
}

impl Admission {
    /// Every queued request, in serving order.
    pub fn waiters(&self) -> Vec<WaiterView> {
        let now = Instant::now();
        let st = self.shared.lock();
        let epoch = self.shared.epoch(now);
        let overdue_before = now.checked_sub(self.shared.starvation_bound());
        st.queue
            .serving_order(epoch, overdue_before)
            .into_iter()
            .filter_map(|seq| st.queue.get(seq))
            .enumerate()
            .map(|(i, e)| WaiterView {
                position: i + 1,
                client: e.client.clone(),
                model: e.item.model.clone(),
                priority: e.priority,
                body_bytes: e.bytes,
                waited: now.saturating_duration_since(e.enqueued),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AdmitRequest, Admitted, QueueConfig};
    use super::*;

    /// With no instance ready everything queues; the view lists the waiters in the order the
    /// queue serves them: round robin between clients, FIFO within one, priority first.
    #[tokio::test]
    async fn waiters_in_serving_order() {
        let admission = Admission::new(QueueConfig::default(), Vec::new());
        let mut held = Vec::new();
        for (client, model, priority) in [
            ("alice", "a", 0),
            ("alice", "b", 0),
            ("bob", "c", 0),
            ("carol", "d", 5),
        ] {
            match admission.admit(AdmitRequest::new(client).model(model).priority(priority)) {
                Ok(Admitted::Queued(w)) => held.push(w),
                _ => panic!("expected to queue"),
            }
        }
        let order = |view: &[WaiterView]| -> Vec<(usize, String, Option<String>)> {
            view.iter()
                .map(|w| (w.position, w.client.to_string(), w.model.clone()))
                .collect()
        };
        let view = admission.waiters();
        let named = |v: Vec<(usize, &str, Option<&str>)>| -> Vec<(usize, String, Option<String>)> {
            v.into_iter()
                .map(|(p, c, m)| (p, c.to_string(), m.map(str::to_string)))
                .collect()
        };
        assert_eq!(
            order(&view),
            named(vec![
                (1, "carol", Some("d")),
                (2, "alice", Some("a")),
                (3, "bob", Some("c")),
                (4, "alice", Some("b")),
            ])
        );
        assert_eq!(view[0].priority, 5);
        assert!(view[1].waited >= view[2].waited, "alice came before bob");
        // Reading the view changes nothing: the same order twice, and the queue still holds all.
        assert_eq!(order(&admission.waiters()), order(&view));
        assert_eq!(admission.snapshot().queued, 4);
        drop(held);
        assert!(admission.waiters().is_empty());
    }

    /// A client whose turn has waited past the starvation bound is listed first, as dispatch
    /// would serve it, whatever the priorities behind it.
    #[tokio::test(start_paused = true)]
    async fn a_client_past_the_starvation_bound_is_listed_first() {
        let config = QueueConfig {
            max_wait: Duration::from_secs(40),
            ..QueueConfig::default()
        };
        let admission = Admission::new(config, Vec::new());
        let mut held = Vec::new();
        let mut admit = |client: &str, priority: i32| match admission
            .admit(AdmitRequest::new(client).priority(priority))
        {
            Ok(Admitted::Queued(w)) => held.push(w),
            _ => panic!("expected to queue"),
        };
        admit("low", -100);
        tokio::time::advance(Duration::from_secs(20)).await;
        admit("high", 100);
        let clients: Vec<String> = admission
            .waiters()
            .iter()
            .map(|w| w.client.to_string())
            .collect();
        assert_eq!(clients, ["low", "high"]);
    }
}
