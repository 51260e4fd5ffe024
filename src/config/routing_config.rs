//! `[routing]`: the routing rules in force at start (the KV key `rules`
//! replaces them at run time; see `route`).

use serde::{Deserialize, Serialize};

/// A rule set as written: `[routing]` in the configuration, or the KV
/// key `rules` (the same in TOML, or as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSpec {
    /// Where an event goes when no rule stops it; `""`: nowhere. Absent:
    /// the `output_subject`.
    pub default: Option<String>,
    /// Where events whose evaluation failed go; `""`: counted and dropped.
    pub error_subject: String,
    /// The rules, in order.
    pub rule: Vec<RuleSpec>,
}

/// One `[[routing.rule]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleSpec {
    /// Names its counters: letters, digits, `_` and `-`; unique in the set.
    pub name: String,
    /// The condition, in CEL, over `event`, `key` and `shard`.
    pub when: String,
    /// Subjects a match goes to (none: matched and sent nowhere).
    pub to: Vec<String>,
    /// Also try the next rules after a match.
    #[serde(rename = "continue")]
    pub and_continue: bool,
    /// Count matches, send nothing, do not stop the list.
    pub shadow: bool,
}

impl RoutingSpec {
    /// Reads a set from TOML (or JSON, if it starts with `{`).
    ///
    /// # Errors
    ///
    /// Why the text is not a rule set.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim_start().starts_with('{') {
            return serde_json::from_str(text).map_err(|e| e.to_string());
        }
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| e.to_string())
    }
}
