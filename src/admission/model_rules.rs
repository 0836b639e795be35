//! The `models:` rules as dispatch enforces them: which instances may serve a model, how many of
//! its requests may run at once (across the fleet and per instance), and which models are
//! pinned. Counts are per model: a rule matching several models limits each one separately, as
//! Ollama's `OLLAMA_NUM_PARALLEL` applies to each loaded model.
//!
//! A request over a limit is not refused: placement answers "no slot" for it, so it stays queued
//! and the waiters of other clients are dispatched past it; it is granted when a request for its
//! model ends (every release re-runs dispatch).

use crate::config::{ModelRuleConfig, ModelRulesConfig};
use crate::upstream::Instance;
use std::collections::HashMap;
use std::sync::Arc;

/// The rules, resolved against the instance list, and the requests running under them.
#[derive(Debug, Default)]
pub struct ModelRules {
    config: ModelRulesConfig,
    /// Instance names by scheduler position.
    names: Vec<String>,
    /// Requests running per (instance position, model), only for models a limit applies to.
    running: HashMap<(usize, String), usize>,
}

impl ModelRules {
    #[cfg(test)]
    pub fn new(config: ModelRulesConfig, instances: &[Arc<Instance>]) -> ModelRules {
        ModelRules {
            config,
            names: instances.iter().map(|i| i.name.clone()).collect(),
            ..ModelRules::default()
        }
    }

    /// New rules (a reload): the counts of requests running stay.
    pub fn reconfigure(&mut self, config: ModelRulesConfig, instances: &[Arc<Instance>]) {
        self.config = config;
        self.set_instances(instances);
    }

    /// The instance set changed (a reload added one): names by position again.
    pub fn set_instances(&mut self, instances: &[Arc<Instance>]) {
        self.names = instances.iter().map(|i| i.name.clone()).collect();
    }

    fn rule(&self, model: &str) -> Option<&ModelRuleConfig> {
        self.config.rule_for(model).map(|(_, r)| r)
    }

    fn limited(&self, model: &str) -> bool {
        self.rule(model)
            .is_some_and(|r| r.max_concurrent.is_some() || r.max_concurrent_per_instance.is_some())
    }

    /// Whether a rule names the instances `model` may run on.
    pub fn restricted(&self, model: &str) -> bool {
        self.rule(model).is_some_and(|r| !r.instances.is_empty())
    }

    /// Whether instance `pos` may serve `model`.
    pub fn allowed(&self, pos: usize, model: &str) -> bool {
        match (self.rule(model), self.names.get(pos)) {
            (Some(rule), Some(name)) => rule.allows(name),
            _ => true,
        }
    }

    /// Whether `model` runs as many requests as its `max_concurrent` allows.
    pub fn fleet_full(&self, model: &str) -> bool {
        let Some(limit) = self.rule(model).and_then(|r| r.max_concurrent) else {
            return false;
        };
        let running: usize = self
            .running
            .iter()
            .filter(|((_, m), _)| m == model)
            .map(|(_, n)| n)
            .sum();
        running >= limit
    }

    /// Whether `model` runs as many requests on `pos` as `max_concurrent_per_instance` allows.
    pub fn instance_full(&self, pos: usize, model: &str) -> bool {
        let Some(limit) = self.rule(model).and_then(|r| r.max_concurrent_per_instance) else {
            return false;
        };
        self.running
            .get(&(pos, model.to_string()))
            .is_some_and(|n| *n >= limit)
    }

    /// Whether `model` is pinned (kept loaded with `keep_alive: -1`).
    pub fn pinned(&self, model: &str) -> bool {
        self.config.pinned(model)
    }

    /// A request for `model` got a slot on `pos`.
    pub fn started(&mut self, pos: usize, model: &str) {
        if self.limited(model) {
            *self.running.entry((pos, model.to_string())).or_default() += 1;
        }
    }

    /// A request for `model` on `pos` gave its slot back.
    pub fn finished(&mut self, pos: usize, model: &str) {
        let key = (pos, model.to_string());
        if let Some(n) = self.running.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&key);
            }
        }
    }
}

/// The models pinned on an instance named `name` that has `installed` (in `model_key` form):
/// each installed model whose rule pins it and allows the instance.
pub fn pinned_models(config: &ModelRulesConfig, name: &str, installed: &[String]) -> Vec<String> {
    installed
        .iter()
        .filter(|m| {
            config
                .rule_for(m)
                .is_some_and(|(_, r)| r.pinned && r.allows(name))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelRuleConfig;

    fn rules() -> ModelRulesConfig {
        ModelRulesConfig {
            rules: vec![
                ModelRuleConfig {
                    pattern: "big*".into(),
                    max_concurrent: Some(3),
                    max_concurrent_per_instance: Some(2),
                    instances: vec!["b".into()],
                    pinned: true,
                },
                ModelRuleConfig {
                    pattern: "*".into(),
                    max_concurrent: None,
                    max_concurrent_per_instance: None,
                    instances: vec![],
                    pinned: false,
                },
            ],
        }
    }

    #[test]
    fn limits_count_per_model_and_instance() {
        let mut r = ModelRules {
            config: rules(),
            names: vec!["a".into(), "b".into()],
            ..ModelRules::default()
        };
        assert!(!r.allowed(0, "big:latest") && r.allowed(1, "big:latest"));
        assert!(r.allowed(0, "small:latest") && r.restricted("big:1"));
        r.started(1, "big:latest");
        r.started(1, "big:latest");
        assert!(r.instance_full(1, "big:latest") && !r.fleet_full("big:latest"));
        // Another model of the same rule has its own count.
        assert!(!r.instance_full(1, "big:2"));
        r.started(0, "big:latest");
        assert!(r.fleet_full("big:latest"));
        r.finished(1, "big:latest");
        assert!(!r.fleet_full("big:latest") && !r.instance_full(1, "big:latest"));
        // Unlimited models are not counted at all.
        r.started(0, "small:latest");
        assert!(!r.running.contains_key(&(0, "small:latest".to_string())));
        assert_eq!(
            pinned_models(&rules(), "b", &["big:latest".into(), "x:latest".into()]),
            ["big:latest"]
        );
        assert!(pinned_models(&rules(), "a", &["big:latest".into()]).is_empty());
    }
}
