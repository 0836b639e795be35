//! The waiting room: per-client FIFO queues, served round robin between clients, highest
//! effective priority first. Pure data structure (no locking, no clocks of its own).
//!
//! Ordering, in one place:
//! - A client with waiters has one *turn* in the ring. The turn's key is
//!   `head priority - epoch the turn began`; the ring serves the highest key first and, among equal
//!   keys, the turn that began first (`turn` sequence number): plain round robin.
//! - Epochs are whole `aging` periods on one clock, so a turn's effective priority
//!   `head priority + (epoch now - epoch it began)` grows by one per period waited while the order
//!   of keys never changes with time. Every operation is O(log n): no rescans as time passes.
//! - Serving a client ends its turn; if it still has waiters it starts a new turn at the back
//!   (key from the current epoch), so a backlog never ages while its owner is being served and a
//!   flood cannot outrank a newcomer.
//! - Within a client: higher priority first, then arrival order (FIFO).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::time::Instant;

/// One queued request.
pub(crate) struct Entry<T> {
    pub client: Arc<str>,
    pub priority: i32,
    pub bytes: u64,
    pub enqueued: Instant,
    pub item: T,
}

struct ClientQueue {
    /// (priority high first, arrival sequence).
    waiters: BTreeSet<(Reverse<i32>, u64)>,
    /// Epoch in which the client's current turn began.
    since: i64,
    /// Position of the turn among equal keys (global, increasing).
    turn: u64,
    /// The ring key currently stored for this client.
    key: i64,
    /// When the current turn began (queued, or last served): how long the client has waited.
    turn_began: Instant,
}

impl ClientQueue {
    fn head_priority(&self) -> Option<i32> {
        self.waiters.first().map(|(Reverse(p), _)| *p)
    }
}

fn ring_key(priority: i32, since: i64) -> i64 {
    i64::from(priority).saturating_sub(since)
}

pub(crate) struct FairQueue<T> {
    /// Every waiter by arrival sequence; the first is the oldest.
    entries: BTreeMap<u64, Entry<T>>,
    clients: HashMap<Arc<str>, ClientQueue>,
    /// (key, high first; turn, first come first) -> client.
    ring: BTreeMap<(Reverse<i64>, u64), Arc<str>>,
    /// (turn began, turn) -> client: whose turn has waited longest, for the starvation bound.
    by_turn_start: BTreeMap<(Instant, u64), Arc<str>>,
    next_seq: u64,
    next_turn: u64,
    bytes: u64,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            entries: BTreeMap::new(),
            clients: HashMap::new(),
            ring: BTreeMap::new(),
            by_turn_start: BTreeMap::new(),
            next_seq: 0,
            next_turn: 0,
            bytes: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// The longest-waiting entry.
    pub fn oldest(&self) -> Option<&Entry<T>> {
        self.entries.first_key_value().map(|(_, e)| e)
    }

    /// Queues an entry; `epoch` is the current aging epoch. Returns its id.
    pub fn push(&mut self, entry: Entry<T>, epoch: i64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes = self.bytes.saturating_add(entry.bytes);
        let priority = entry.priority;
        match self.clients.get_mut(&entry.client) {
            Some(cq) => {
                let before = cq.head_priority();
                cq.waiters.insert((Reverse(priority), seq));
                if before.is_none_or(|b| priority > b) {
                    // New head: same turn, re-keyed for the higher priority.
                    self.ring.remove(&(Reverse(cq.key), cq.turn));
                    cq.key = ring_key(priority, cq.since);
                    self.ring
                        .insert((Reverse(cq.key), cq.turn), entry.client.clone());
                }
            }
            None => {
                let turn = self.next_turn;
                self.next_turn += 1;
                let key = ring_key(priority, epoch);
                let mut waiters = BTreeSet::new();
                waiters.insert((Reverse(priority), seq));
                self.ring.insert((Reverse(key), turn), entry.client.clone());
                self.by_turn_start
                    .insert((entry.enqueued, turn), entry.client.clone());
                self.clients.insert(
                    entry.client.clone(),
                    ClientQueue {
                        waiters,
                        since: epoch,
                        turn,
                        key,
                        turn_began: entry.enqueued,
                    },
                );
            }
        }
        self.entries.insert(seq, entry);
        seq
    }

    /// The entry `pop` would return next.
    #[cfg(test)]
    pub fn peek(&self) -> Option<&Entry<T>> {
        let (_, client) = self.ring.first_key_value()?;
        let (_, seq) = self.clients.get(client)?.waiters.first()?;
        self.entries.get(seq)
    }

    /// Takes the next entry by fairness; the served client starts a new turn at the back.
    #[cfg(test)]
    pub fn pop(&mut self, epoch: i64) -> Option<(u64, Entry<T>)> {
        let (_, client) = self.ring.first_key_value()?;
        let client = client.clone();
        self.pop_client(&client, epoch)
    }

    /// Takes `client`'s next entry;
    /// the client starts a new turn at the back, as with `pop`.
    #[cfg(test)]
    pub fn pop_client(&mut self, client: &Arc<str>, epoch: i64) -> Option<(u64, Entry<T>)> {
        let (_, seq) = *self.clients.get(client)?.waiters.first()?;
        self.take(seq, epoch, Instant::now()).map(|e| (seq, e))
    }

    /// Takes one queued entry to serve it (`now`), wherever it is in its client's queue (a
    /// waiter behind a retry that cannot use the free slot). Serving ends the client's turn: if
    /// it still has waiters, it starts a new turn at the back.
    pub fn take(&mut self, seq: u64, epoch: i64, now: Instant) -> Option<Entry<T>> {
        let entry = self.entries.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        let client = entry.client.clone();
        if let Some(cq) = self.clients.get_mut(&client) {
            self.ring.remove(&(Reverse(cq.key), cq.turn));
            self.by_turn_start.remove(&(cq.turn_began, cq.turn));
            cq.waiters.remove(&(Reverse(entry.priority), seq));
            match cq.head_priority() {
                None => {
                    self.clients.remove(&client);
                }
                Some(p) => {
                    cq.since = epoch;
                    cq.turn = self.next_turn;
                    self.next_turn += 1;
                    cq.key = ring_key(p, epoch);
                    cq.turn_began = now;
                    self.ring.insert((Reverse(cq.key), cq.turn), client.clone());
                    self.by_turn_start.insert((now, cq.turn), client);
                }
            }
        }
        Some(entry)
    }

    /// Clients with waiters, in the order `pop` would serve them.
    pub fn clients_in_turn(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.ring.values()
    }

    /// One client's waiters in the order it would be served (priority, then arrival).
    pub fn client_entries<'a>(
        &'a self,
        client: &Arc<str>,
    ) -> impl Iterator<Item = (u64, &'a Entry<T>)> + 'a {
        self.clients
            .get(client)
            .into_iter()
            .flat_map(|cq| cq.waiters.iter())
            .filter_map(|(_, seq)| self.entries.get(seq).map(|e| (*seq, e)))
    }

    /// Clients whose current turn began at or before `cutoff` (past the starvation bound),
    /// the longest-waiting turn first.
    pub fn turns_begun_before(&self, cutoff: Instant) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.by_turn_start
            .iter()
            .take_while(move |((began, _), _)| *began <= cutoff)
            .map(|(_, client)| client)
    }

    /// Waiters queued at or before `cutoff`, oldest first.
    pub fn queued_before(&self, cutoff: Instant) -> impl Iterator<Item = (u64, &Entry<T>)> + '_ {
        self.entries
            .iter()
            .take_while(move |(_, e)| e.enqueued <= cutoff)
            .map(|(seq, e)| (*seq, e))
    }

    /// Removes a queued entry (cancelled, expired); `None` if it is no longer queued.
    pub fn remove(&mut self, seq: u64) -> Option<Entry<T>> {
        let entry = self.entries.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        if let Some(cq) = self.clients.get_mut(&entry.client) {
            let before = cq.head_priority();
            cq.waiters.remove(&(Reverse(entry.priority), seq));
            let after = cq.head_priority();
            if after != before {
                self.ring.remove(&(Reverse(cq.key), cq.turn));
                match after {
                    None => {
                        self.by_turn_start.remove(&(cq.turn_began, cq.turn));
                        self.clients.remove(&entry.client);
                    }
                    Some(p) => {
                        cq.key = ring_key(p, cq.since);
                        self.ring
                            .insert((Reverse(cq.key), cq.turn), entry.client.clone());
                    }
                }
            }
        }
        Some(entry)
    }

    /// Every queued entry's id in the order dispatch would serve them if nothing changed
    /// meanwhile (read-only: replays the ring on a copy of the turn keys); `overdue_before`: the
    /// starvation bound's cutoff.
    pub fn serving_order(&self, epoch: i64, overdue_before: Option<Instant>) -> Vec<u64> {
        let mut ring = self.ring.clone();
        let mut waiters: HashMap<&Arc<str>, Vec<(Reverse<i32>, u64)>> = self
            .clients
            .iter()
            .map(|(c, q)| (c, q.waiters.iter().rev().copied().collect()))
            .collect();
        let mut next_turn = self.next_turn;
        let mut order = Vec::with_capacity(self.entries.len());
        // Clients whose turn is past the starvation bound are served first, longest first; each
        // then starts a fresh turn at the back of the ring.
        let overdue = overdue_before
            .map(|cutoff| self.turns_begun_before(cutoff).collect::<Vec<_>>())
            .unwrap_or_default();
        for client in overdue {
            let Some(cq) = self.clients.get(client) else {
                continue;
            };
            ring.remove(&(Reverse(cq.key), cq.turn));
            let Some(queue) = waiters.get_mut(client) else {
                continue;
            };
            let Some((_, seq)) = queue.pop() else {
                continue;
            };
            order.push(seq);
            if let Some((Reverse(p), _)) = queue.last() {
                ring.insert((Reverse(ring_key(*p, epoch)), next_turn), client.clone());
                next_turn += 1;
            }
        }
        while let Some((_, client)) = ring.pop_first() {
            let Some(queue) = waiters.get_mut(&client) else {
                continue;
            };
            let Some((_, seq)) = queue.pop() else {
                continue;
            };
            order.push(seq);
            if let Some((Reverse(p), _)) = queue.last() {
                ring.insert((Reverse(ring_key(*p, epoch)), next_turn), client);
                next_turn += 1;
            }
        }
        order
    }

    /// A queued entry by id.
    pub fn get(&self, seq: u64) -> Option<&Entry<T>> {
        self.entries.get(&seq)
    }

    /// Empties the queue, returning every entry in arrival order.
    pub fn drain(&mut self) -> Vec<Entry<T>> {
        self.ring.clear();
        self.by_turn_start.clear();
        self.clients.clear();
        self.bytes = 0;
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, priority: i32, item: u32) -> Entry<u32> {
        Entry {
            client: Arc::from(client),
            priority,
            bytes: 10,
            enqueued: Instant::now(),
            item,
        }
    }

    fn pop_items(q: &mut FairQueue<u32>, epoch: i64, n: usize) -> Vec<u32> {
        (0..n)
            .filter_map(|_| q.pop(epoch).map(|(_, e)| e.item))
            .collect()
    }

    #[test]
    fn round_robin_between_clients_fifo_within() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push(entry("a", 0, i), 0);
        }
        q.push(entry("b", 0, 100), 0);
        q.push(entry("c", 0, 200), 0);
        q.push(entry("b", 0, 101), 0);
        assert_eq!(q.len(), 8);
        assert_eq!(q.bytes(), 80);
        assert_eq!(q.clients(), 3);
        assert_eq!(pop_items(&mut q, 0, 8), vec![0, 100, 200, 1, 101, 2, 3, 4]);
        assert!(q.is_empty());
        assert_eq!(q.clients(), 0);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn priority_first_then_aging_wins() {
        let mut q = FairQueue::default();
        q.push(entry("low", 0, 1), 0);
        q.push(entry("high", 2, 2), 0);
        q.push(entry("high", 2, 3), 0);
        q.push(entry("high", 2, 4), 0);
        // Served at epoch 0: high's next turn has key 2 - 0 = 2 > low's 0.
        assert_eq!(pop_items(&mut q, 0, 1), vec![2]);
        // Served at epoch 1: high's next turn has key 2 - 1 = 1, still above low.
        assert_eq!(pop_items(&mut q, 1, 1), vec![3]);
        // Served at epoch 2: high's next turn has key 0 == low's, and low's turn began first.
        q.push(entry("high", 2, 5), 2);
        assert_eq!(pop_items(&mut q, 2, 1), vec![4]);
        assert_eq!(pop_items(&mut q, 2, 1), vec![1]);
        assert_eq!(pop_items(&mut q, 2, 1), vec![5]);
    }

    #[test]
    fn within_client_priority_then_fifo() {
        let mut q = FairQueue::default();
        q.push(entry("a", 0, 1), 0);
        q.push(entry("a", 0, 2), 0);
        q.push(entry("a", 5, 3), 0);
        assert_eq!(pop_items(&mut q, 0, 3), vec![3, 1, 2]);
    }

    #[test]
    fn remove_keeps_structure_consistent() {
        let mut q = FairQueue::default();
        let a1 = q.push(entry("a", 0, 1), 0);
        let a2 = q.push(entry("a", 3, 2), 0);
        let b1 = q.push(entry("b", 1, 3), 0);
        assert_eq!(q.peek().map(|e| e.item), Some(2));
        assert!(q.remove(a2).is_some());
        assert!(q.remove(a2).is_none());
        assert_eq!(q.peek().map(|e| e.item), Some(3));
        assert!(q.remove(b1).is_some());
        assert_eq!(q.clients(), 1);
        assert_eq!(q.oldest().map(|e| e.item), Some(1));
        assert!(q.remove(a1).is_some());
        assert!(q.is_empty());
        assert_eq!(q.clients(), 0);
        assert!(q.peek().is_none());
        assert!(q.pop(0).is_none());
    }

    #[test]
    fn drain_returns_arrival_order() {
        let mut q = FairQueue::default();
        q.push(entry("b", 0, 1), 0);
        q.push(entry("a", 9, 2), 0);
        assert_eq!(
            q.drain().into_iter().map(|e| e.item).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(q.is_empty());
        assert_eq!(q.clients(), 0);
    }
}
