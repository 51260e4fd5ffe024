//! Statistics published on a schedule (`[[aggregate.emit]]`): every
//! `every`, each group's `stat` over the last `window` of event time,
//! merged over every node, to `subject` (`{group}` replaced).
//!
//! A message:
//!
//! ```json
//! {"category":"shoes","stat":"mean","value":41.5,"count":12,
//!  "window_start":1764000000,"window_end":1764000300,
//!  "timestamp_of_calculation":1764000299.5,"node":"n1"}
//! ```
//!
//! - **Idle groups**: a group without an event in the window, but with
//!   one within `max_window`, is still published every tick, with count 0
//!   and a `null` value, so that a dashboard sees it go quiet.
//! - **One emitter per group**: the node serving the group's hash shard
//!   (FNV-1a-32 of its name mod `shards`, the function events are sharded
//!   by) publishes it; the others skip it. Groups spread over the nodes as
//!   shards do, and when a node dies its groups move with its shards, so
//!   they resume within the lease TTL plus one tick.
//! - A merge that lacks a node or shards says so as the queries do
//!   (`"partial":true`, `missing_shards`, `missing_nodes`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::{EmitSettings, Stat};
use crate::engine::shard::shard_of;
use crate::engine::unix_ms;
use crate::pipeline::ShardState;
use crate::shared::Shared;
use crate::stages::query::{Peers, gather, number, seconds};
use crate::stages::{Aggregate, Summary};
use crate::transport::subscription::publish;

/// The value of `stat` for `summary` (`None`: no events, or none to tell).
pub fn value_of(stat: Stat, summary: Option<&Summary>) -> Option<f64> {
    let s = summary.filter(|s| s.count > 0);
    match stat {
        Stat::Count => Some(s.map_or(0.0, |s| s.count as f64)),
        Stat::Sum => s.map(|s| s.sum),
        Stat::Mean => s.map(|s| s.sum / s.count as f64),
        Stat::Min => s.map(|s| s.min),
        Stat::Max => s.map(|s| s.max),
        Stat::Quantile(q) => s.and_then(|s| s.sketch.quantile(q)),
        // Its items are the answer.
        Stat::Top(_) => None,
    }
}

/// `,"items":[{"item":..,"total":..,"error":..},..],"bound":W/m` of a
/// `top(k)`: the items largest first, each total at most `error` above
/// the true total, `bound` the most any error may be.
fn items(k: usize, summary: Option<&Summary>, body: &mut String) {
    let top = summary.map(|s| &s.top);
    let items: Vec<Value> = top
        .map(|t| t.top(k))
        .unwrap_or_default()
        .into_iter()
        .map(|c| json!({ "item": &*c.item, "total": c.total, "error": c.error }))
        .collect();
    body.push_str(&format!(
        ",\"items\":{},\"bound\":{}",
        Value::Array(items),
        number(top.map_or(0.0, |t| t.bound()))
    ));
}

/// Whether this node publishes `group`: it serves the group's hash shard.
fn emits_group(ctx: &Shared, group: &str) -> bool {
    let ownership = ctx.pipeline.ownership();
    ownership.state(shard_of(group, ownership.shards())) == ShardState::Ready
}

/// How often the groups with an event within `max_window` (the idle
/// ones included) are gathered again; in between, the groups of each
/// tick's windows are added to them.
const KNOWN_EVERY: Duration = Duration::from_secs(1);

/// Publishes `emits` of `agg` (all with the same `every_ms`) every
/// `every_ms`, until aborted: one gather a tick per distinct window.
pub async fn run(ctx: Arc<Shared>, peers: Arc<Peers>, agg: Arc<Aggregate>, emits: Vec<EmitSettings>) {
    let Some(every) = emits.first().map(|e| e.every_ms) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut known_at: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let ownership = ctx.pipeline.ownership();
        if (0..ownership.shards()).all(|s| ownership.state(s) != ShardState::Ready) {
            continue;
        }
        let now = unix_ms();
        let request = |(start, end): (u64, u64)| json!({ "aggregate": agg.settings.name, "group": null, "start_ms": start, "end_ms": end });
        if known_at.is_none_or(|at| at.elapsed() >= KNOWN_EVERY) {
            let (start, end) = agg.last(agg.settings.max_window_ms, now);
            let names = json!({
                "aggregate": agg.settings.name, "group": null, "start_ms": start, "end_ms": end, "names_only": true,
            });
            match gather(&ctx, &peers, &agg, &names).await {
                Ok((all, missing)) => {
                    known = all.into_keys().collect();
                    if missing.is_empty() {
                        known_at = Some(tokio::time::Instant::now());
                    }
                }
                Err(e) => tracing::warn!(message = "Cannot gather the groups to emit.", error = %e),
            }
        }
        let mut windows: Vec<u64> = emits.iter().map(|e| e.window_ms).collect();
        windows.sort_unstable();
        windows.dedup();
        let mut gathered = HashMap::new();
        for window in windows {
            let bounds = agg.last(window, now);
            match gather(&ctx, &peers, &agg, &request(bounds)).await {
                Ok((summaries, missing)) => {
                    known.extend(summaries.keys().cloned());
                    gathered.insert(window, (bounds, summaries, missing));
                }
                Err(e) => tracing::warn!(message = "Cannot gather the summaries to emit.", error = %e),
            }
        }
        for emit in &emits {
            let Some(((start, end), window, missing)) = gathered.get(&emit.window_ms) else {
                continue;
            };
            let stat = emit.stat.name();
            for group in known.iter().filter(|g| emits_group(&ctx, g)) {
                let summary = window.get(group.as_str());
                let value = value_of(emit.stat, summary);
                let count = summary.map_or(0, |s| s.count);
                let mut body = format!(
                    "{{{}:{},\"stat\":{},\"value\":{},\"count\":{count},\"window_start\":{},\"window_end\":{},\"timestamp_of_calculation\":{},\"node\":{}",
                    Value::from(agg.settings.group.as_str()),
                    Value::from(group.as_str()),
                    Value::from(stat.as_str()),
                    value.map_or_else(|| "null".to_owned(), number),
                    seconds(*start),
                    seconds(*end),
                    seconds(now),
                    Value::from(peers.node.as_str()),
                );
                if let Stat::Top(k) = emit.stat {
                    items(k, summary, &mut body);
                }
                missing.append_to(&mut body);
                body.push('}');
                publish(
                    &ctx,
                    Subject::from(subject(&emit.subject, group)),
                    Bytes::from(body),
                )
                .await;
            }
        }
    }
}

/// `template` with `{group}` replaced: by the group, or `_` when it is not
/// a subject token.
pub fn subject(template: &str, group: &str) -> String {
    let token_ok = !group.is_empty() && !group.contains(|c: char| c.is_whitespace() || ".*>".contains(c));
    template.replace("{group}", if token_ok { group } else { "_" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stat_of_a_summary_and_of_none() {
        let mut s = Summary::new(0.01);
        for x in [4.0, 1.0, 10.0, 5.0] {
            s.merge(&{
                let mut one = Summary::new(0.01);
                one.count = 1;
                one.sum = x;
                one.min = x;
                one.max = x;
                one.sketch.add(x);
                one
            });
        }
        assert_eq!(value_of(Stat::Count, Some(&s)), Some(4.0));
        assert_eq!(value_of(Stat::Sum, Some(&s)), Some(20.0));
        assert_eq!(value_of(Stat::Mean, Some(&s)), Some(5.0));
        assert_eq!(value_of(Stat::Min, Some(&s)), Some(1.0));
        assert_eq!(value_of(Stat::Max, Some(&s)), Some(10.0));
        let median = value_of(Stat::Quantile(0.5), Some(&s)).unwrap();
        assert!((median - 4.0).abs() <= 0.04 * 4.0 + 1.0, "{median}");
        assert_eq!(value_of(Stat::Count, None), Some(0.0), "an idle group counts 0");
        for stat in [Stat::Sum, Stat::Mean, Stat::Min, Stat::Max, Stat::Quantile(0.5)] {
            assert_eq!(value_of(stat, None), None, "{stat:?} of an idle group is null");
            assert_eq!(value_of(stat, Some(&Summary::new(0.01))), None);
        }
        assert_eq!(subject("stats.{group}.mean", "shoes"), "stats.shoes.mean");
        assert_eq!(subject("stats.{group}", "a.b"), "stats._");
        assert_eq!(Stat::parse("quantile(0.99)"), Some(Stat::Quantile(0.99)));
        assert_eq!(Stat::parse("quantile(2)"), None);
        assert_eq!(Stat::Quantile(0.5).name(), "quantile(0.5)");
    }
}
