//! Choosing an instance for a request that needs no admission (metadata, management): the ready
//! instance with the most spare slots, rotating among equals so load spreads.

use super::{Instance, Registry};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

static ROTATION: AtomicUsize = AtomicUsize::new(0);

/// The ready instance with the lowest in-flight load relative to its slots; `exclude` skips
/// instances already tried for this request when another is available.
pub fn least_loaded(registry: &Registry, exclude: &[usize]) -> Option<Arc<Instance>> {
    let all = registry.all();
    if all.is_empty() {
        return None;
    }
    let start = ROTATION.fetch_add(1, Ordering::Relaxed) % all.len();
    let pick = |skip_excluded: bool| {
        let mut best: Option<(&Arc<Instance>, f64)> = None;
        for offset in 0..all.len() {
            let inst = &all[(start + offset) % all.len()];
            if !inst.is_ready() || (skip_excluded && exclude.contains(&inst.index)) {
                continue;
            }
            let load = inst.in_flight() as f64 / inst.num_parallel as f64;
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((inst, load));
            }
        }
        best.map(|(i, _)| i.clone())
    };
    pick(true).or_else(|| pick(false))
}
