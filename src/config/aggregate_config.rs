//! `[[aggregate]]`: what the aggregate stage computes, as written
//! ([`AggregateConfig`]) and checked ([`AggregateSettings`]).

use serde::{Deserialize, Serialize};

use super::{ConfigError, parse_duration_ms};
use crate::engine::table::MAX_WINDOW_MS;

/// One `[[aggregate]]`: count, sum, min, max and quantiles of a numeric
/// field per group, in panes of event time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    /// How queries name it (`"aggregate"`). Default: the `group` field.
    pub name: String,
    /// Top-level text field that groups events, e.g. `metric_name`. Required.
    pub group: String,
    /// Top-level numeric field aggregated, e.g. `metric_value`. Required.
    /// An event without a number there is accepted and counted as skipped.
    pub value: String,
    /// Top-level field of event time, e.g. `timestamp`; empty for arrival
    /// time. Default empty.
    pub time: String,
    /// Unit of `time`: `s` or `ms`. Default `s`.
    pub time_unit: String,
    /// Slice of time kept as one count/sum/min/max/sketch. Default `1s`.
    pub pane: String,
    /// Longest window a query may ask for. Default `1h`.
    pub max_window: String,
    /// How long after its pane ends an event is still taken; later ones are
    /// counted and dropped. Default `5s`.
    pub lateness: String,
    /// Relative accuracy of quantiles, in percent (DDSketch). Default `1`.
    pub accuracy_percent: String,
    /// Publish each group's median to `<prefix>.median.<group>` this often;
    /// empty: never. Default empty.
    pub emit_every: String,
    /// The window of event time those medians cover. Default `5s`.
    pub emit_window: String,
    /// Top-level text field naming the item `top(k)` ranks by the total
    /// of `value`, e.g. `product_id`. Default empty (no `top(k)`).
    pub item: String,
    /// Which accepted events the aggregate takes: a CEL condition over
    /// `event`, as routing rules write them (e.g. `event.type ==
    /// "ORDER_PLACED"`); empty: every event. An event whose condition fails
    /// to evaluate is not taken. Default empty.
    pub when: String,
    /// Statistics published on a schedule (`[[aggregate.emit]]`, any
    /// number). Default none.
    pub emit: Vec<EmitConfig>,
}

/// One `[[aggregate.emit]]`: a statistic of each group over a moving
/// window of event time, published every `every`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmitConfig {
    /// `count`, `sum`, `mean`, `min`, `max` or `quantile(q)` with `q` in
    /// 0..1. Required.
    pub stat: String,
    /// The event time covered, ending now. At most `max_window`. Default `5m`.
    pub window: String,
    /// How often. 10 ms to 1 h. Default `1s`.
    pub every: String,
    /// Where each group's message goes; `{group}` is replaced by the group
    /// (`_` when the group is not a subject token). Required.
    pub subject: String,
}

impl Default for EmitConfig {
    fn default() -> Self {
        Self {
            stat: String::new(),
            window: "5m".into(),
            every: "1s".into(),
            subject: String::new(),
        }
    }
}

/// What an emission publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stat {
    Count,
    Sum,
    Mean,
    Min,
    Max,
    /// The `q` quantile, from the sketches (within `accuracy_percent`).
    Quantile(f64),
    /// The `k` items with the largest total of the value (Space-Saving,
    /// within its bound).
    Top(usize),
}

impl Stat {
    /// `count`, `sum`, `mean`, `min`, `max`, `quantile(0.99)`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        Some(match text {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "mean" => Self::Mean,
            "min" => Self::Min,
            "max" => Self::Max,
            _ if text.starts_with("top(") => {
                let k: usize = text
                    .strip_prefix("top(")?
                    .strip_suffix(')')?
                    .trim()
                    .parse()
                    .ok()?;
                Self::Top(Some(k).filter(|k| (1..=1000).contains(k))?)
            }
            _ => {
                let q: f64 = text
                    .strip_prefix("quantile(")?
                    .strip_suffix(')')?
                    .trim()
                    .parse()
                    .ok()?;
                Self::Quantile(Some(q).filter(|q| (0.0..=1.0).contains(q))?)
            }
        })
    }

    /// As written in the configuration and the messages.
    pub fn name(self) -> String {
        match self {
            Self::Count => "count".into(),
            Self::Sum => "sum".into(),
            Self::Mean => "mean".into(),
            Self::Min => "min".into(),
            Self::Max => "max".into(),
            Self::Quantile(q) => format!("quantile({q})"),
            Self::Top(k) => format!("top({k})"),
        }
    }
}

/// One `[[aggregate.emit]]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct EmitSettings {
    pub stat: Stat,
    pub window_ms: u64,
    pub every_ms: u64,
    /// May hold `{group}`.
    pub subject: String,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            group: String::new(),
            value: String::new(),
            time: String::new(),
            time_unit: "s".into(),
            pane: "1s".into(),
            max_window: "1h".into(),
            lateness: "5s".into(),
            accuracy_percent: "1".into(),
            emit_every: String::new(),
            emit_window: "5s".into(),
            item: String::new(),
            when: String::new(),
            emit: Vec::new(),
        }
    }
}

impl AggregateConfig {
    /// Checks the fields of the `i`th aggregate (`i` names it in errors).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first field that cannot be used.
    pub fn validate(&self, i: usize) -> Result<AggregateSettings, ConfigError> {
        let field = |name: &str| format!("aggregate[{i}].{name}");
        let duration = |name: &str, value: &str, max: u64| {
            parse_duration_ms(value)
                .filter(|ms| (1..=max).contains(ms))
                .ok_or_else(|| {
                    ConfigError::field(&field(name), value, "a duration such as \"1s\", \"5m\", \"1h\"")
                })
        };
        for (name, value) in [("group", &self.group), ("value", &self.value)] {
            if value.is_empty() {
                return Err(ConfigError::field(&field(name), value, "a top-level field name"));
            }
        }
        let time_unit_ms = match self.time_unit.as_str() {
            "s" => 1000,
            "ms" => 1,
            other => return Err(ConfigError::field(&field("time_unit"), other, "\"s\" or \"ms\"")),
        };
        let pane_ms = duration("pane", &self.pane, 3_600_000)?;
        let max_window_ms = duration("max_window", &self.max_window, MAX_WINDOW_MS)?;
        if max_window_ms / pane_ms > 1_000_000 {
            return Err(ConfigError::field(
                &field("max_window"),
                &self.max_window,
                "at most a million panes (make `pane` longer)",
            ));
        }
        let lateness_ms = parse_duration_ms(&self.lateness).ok_or_else(|| {
            ConfigError::field(&field("lateness"), &self.lateness, "a duration such as \"5s\"")
        })?;
        let alpha = self
            .accuracy_percent
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| *p >= 0.01 && *p <= 50.0)
            .ok_or_else(|| {
                ConfigError::field(&field("accuracy_percent"), &self.accuracy_percent, "0.01 to 50")
            })?
            / 100.0;
        let emit_every_ms = match self.emit_every.trim() {
            "" => None,
            every => Some(duration("emit_every", every, 3_600_000)?),
        };
        let emit_window_ms = duration("emit_window", &self.emit_window, max_window_ms)?;
        let emit = self
            .emit
            .iter()
            .enumerate()
            .map(|(j, e)| {
                let name = |n: &str| field(&format!("emit[{j}].{n}"));
                let stat = Stat::parse(&e.stat).ok_or_else(|| {
                    ConfigError::field(
                        &name("stat"),
                        &e.stat,
                        "count, sum, mean, min, max, quantile(q) with q from 0 to 1, or top(k) with k from 1 to 1000",
                    )
                })?;
                if matches!(stat, Stat::Top(_)) && self.item.is_empty() {
                    return Err(ConfigError::field(
                        &name("stat"),
                        &e.stat,
                        "top(k) with `item` set on the aggregate (the field it ranks, e.g. \"product_id\")",
                    ));
                }
                let window_ms = parse_duration_ms(&e.window)
                    .filter(|ms| (1..=max_window_ms).contains(ms))
                    .ok_or_else(|| ConfigError::field(&name("window"), &e.window, "1ms to max_window, e.g. \"5m\""))?;
                let every_ms = parse_duration_ms(&e.every)
                    .filter(|ms| (10..=3_600_000).contains(ms))
                    .ok_or_else(|| ConfigError::field(&name("every"), &e.every, "10ms to 1h, e.g. \"1s\""))?;
                let subject_ok = !e.subject.is_empty()
                    && e.subject
                        .split('.')
                        .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ']));
                if !subject_ok {
                    return Err(ConfigError::field(
                        &name("subject"),
                        &e.subject,
                        "a NATS subject without wildcards, may contain {group}, e.g. \"stats.sales.mean.{group}\"",
                    ));
                }
                Ok(EmitSettings {
                    stat,
                    window_ms,
                    every_ms,
                    subject: e.subject.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Space-Saving keeps ten counters for each item reported.
        let top_counters = emit
            .iter()
            .filter_map(|e| match e.stat {
                Stat::Top(k) => Some(10 * k),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        Ok(AggregateSettings {
            when: self.when.clone(),
            item: self.item.clone(),
            top_counters,
            emit,
            name: if self.name.is_empty() {
                self.group.clone()
            } else {
                self.name.clone()
            },
            group: self.group.clone(),
            value: self.value.clone(),
            time: self.time.clone(),
            time_unit_ms,
            pane_ms,
            max_window_ms,
            lateness_ms,
            alpha,
            emit_every_ms,
            emit_window_ms,
        })
    }
}

/// One `[[aggregate]]` of the configuration, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateSettings {
    /// How queries name it; the group field unless set.
    pub name: String,
    /// The top-level field whose text groups events (e.g. `metric_name`).
    pub group: String,
    /// The top-level numeric field aggregated (e.g. `metric_value`).
    pub value: String,
    /// The top-level field of event time; empty for arrival time.
    pub time: String,
    /// Milliseconds per unit of `time` (1000 for seconds, 1 for ms).
    pub time_unit_ms: u64,
    pub pane_ms: u64,
    /// The longest window a query may ask for.
    pub max_window_ms: u64,
    pub lateness_ms: u64,
    /// Relative accuracy of the quantile sketches.
    pub alpha: f64,
    /// Publish each group's median this often (`None`: never) ...
    pub emit_every_ms: Option<u64>,
    /// ... over this much of the latest event time.
    pub emit_window_ms: u64,
    /// Statistics published on a schedule.
    pub emit: Vec<EmitSettings>,
    /// The item field of `top(k)`; empty: none.
    pub item: String,
    /// The condition on the events taken; empty: all.
    pub when: String,
    /// Counters each pane keeps per group for `top(k)`: ten times the
    /// largest `k` (0: no `top(k)`).
    pub top_counters: usize,
}

/// The top-level fields the aggregates read, each once, in the order of
/// the configuration: the batch path reads them with each line's key
/// ([`crate::engine::dedup::EngineConfig::capture`]) and hands them over
/// with the accepted lines.
pub fn captured_fields(settings: &[AggregateSettings]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in settings {
        for name in [&s.group, &s.value, &s.time, &s.item] {
            if !name.is_empty() && !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    names
}
