//! The `models` section: per-model rules by glob (concurrency limits, which instances may serve
//! a model, pinning). The first rule whose pattern matches a model applies to it, the others do
//! not: order rules from the most specific to the least, as firewall rules are read.

use super::{err, file, ConfigError};

/// One validated `models:` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRuleConfig {
    /// The glob, with `:latest` added to a plain name without a tag (as Ollama names models).
    pub pattern: String,
    pub max_concurrent: Option<usize>,
    pub max_concurrent_per_instance: Option<usize>,
    /// Instance names; empty: every instance.
    pub instances: Vec<String>,
    pub pinned: bool,
}

impl ModelRuleConfig {
    /// Whether this rule is about `model` (in `model_key` form).
    pub fn matches(&self, model: &str) -> bool {
        crate::policy::glob::matches(&self.pattern, model)
    }

    /// Whether instance `name` may serve the models this rule matches.
    pub fn allows(&self, name: &str) -> bool {
        self.instances.is_empty() || self.instances.iter().any(|i| i == name)
    }
}

/// The validated `models` section, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRulesConfig {
    pub rules: Vec<ModelRuleConfig>,
}

impl ModelRulesConfig {
    /// The rule for `model` (in `model_key` form) and its index: the first that matches.
    pub fn rule_for(&self, model: &str) -> Option<(usize, &ModelRuleConfig)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(model))
    }

    /// Whether the rule for `model` (in `model_key` form) pins it.
    pub fn pinned(&self, model: &str) -> bool {
        self.rule_for(model).is_some_and(|(_, r)| r.pinned)
    }
}

/// A name without a wildcard and without a tag means its `:latest`, as Ollama reads it.
fn normalized(pattern: &str) -> String {
    let wild = pattern.contains(['*', '?']);
    let last = pattern.rsplit('/').next().unwrap_or(pattern);
    if wild || last.contains(':') {
        pattern.to_string()
    } else {
        format!("{pattern}:latest")
    }
}

pub(super) fn validate(
    rules: &[file::ModelRule],
    instances: &[file::Instance],
    source: &str,
) -> Result<ModelRulesConfig, ConfigError> {
    let mut out = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let at = |key: &str| format!("models[{i}].{key}");
        let p = &rule.pattern;
        if p.trim().is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                source,
                at("match"),
                format!("`{p}`: expected a model name pattern such as `llama3*` (no spaces)"),
            ));
        }
        for (key, limit) in [
            ("max_concurrent", rule.max_concurrent),
            (
                "max_concurrent_per_instance",
                rule.max_concurrent_per_instance,
            ),
        ] {
            if limit == Some(0) {
                return Err(err(
                    source,
                    at(key),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
        for (j, name) in rule.instances.iter().enumerate() {
            if !instances.iter().any(|inst| &inst.name == name) {
                return Err(err(
                    source,
                    format!("models[{i}].instances[{j}]"),
                    format!("`{name}` is not the name of an instance in `instances`"),
                ));
            }
        }
        out.push(ModelRuleConfig {
            pattern: normalized(p),
            max_concurrent: rule.max_concurrent,
            max_concurrent_per_instance: rule.max_concurrent_per_instance,
            instances: rule.instances.clone(),
            pinned: rule.pinned,
        });
    }
    Ok(ModelRulesConfig { rules: out })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse_err, parse_ok};

    const TWO: &str = "instances:\n  - name: gpu0\n    url: x:1\n  - name: gpu1\n    url: x:2\n";

    #[test]
    fn rules_validate_and_the_first_match_wins() {
        let c = parse_ok(&format!(
            "{TWO}models:\n  - match: llama3.2\n    max_concurrent: 4\n    \
             max_concurrent_per_instance: 1\n    instances: [gpu0]\n    pinned: true\n  \
             - match: \"llama3*\"\n    instances: [gpu1]\n"
        ));
        let m = &c.models;
        assert_eq!(m.rules[0].pattern, "llama3.2:latest");
        let (i, r) = m.rule_for("llama3.2:latest").unwrap();
        assert_eq!((i, r.max_concurrent, r.pinned), (0, Some(4), true));
        assert!(r.allows("gpu0") && !r.allows("gpu1"));
        let (i, r) = m.rule_for("llama3.1:8b").unwrap();
        assert_eq!((i, r.max_concurrent), (1, None));
        assert!(m.rule_for("qwen3:8b").is_none());
        assert!(parse_ok(TWO).models.rules.is_empty());
    }

    #[test]
    fn bad_rules_name_their_key() {
        assert_eq!(
            parse_err(&format!(
                "{TWO}models:\n  - match: a\n    max_concurrent: 0\n"
            )),
            "test.yaml: models[0].max_concurrent: must be at least 1 (leave it out for no limit)"
        );
        assert_eq!(
            parse_err(&format!("{TWO}models:\n  - match: a\n    instances: [gpu9]\n")),
            "test.yaml: models[0].instances[0]: `gpu9` is not the name of an instance in `instances`"
        );
        assert!(parse_err(&format!("{TWO}models:\n  - match: \"a b\"\n"))
            .starts_with("test.yaml: models[0].match: `a b`"));
        assert!(parse_err(&format!("{TWO}models:\n  - max_concurrent: 2\n")).contains("match"));
    }
}
