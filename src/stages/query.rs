//! The aggregates over NATS request-reply, merged across sidecars.
//!
//! | subject | who | what |
//! |---|---|---|
//! | `<prefix>.agg.query` | anyone, request (queue group) | count, sum, avg, min, max of a group over a window |
//! | `<prefix>.agg.quantile` | anyone, request (queue group) | quantile `q` of a group over a window |
//! | `<prefix>.agg.partial` | sidecars, request (every node) | one node's summary of its ready shards |
//! | `<prefix>.median.<group>` | sidecar, publish | each group's median every `emit_every` |
//!
//! Panes are per node: an event counts in the panes of the node that
//! accepted it (and of the node that adopted them, see
//! [`super::replica`]). The node a query reaches starts from its own
//! summary; unless it serves every shard and knows of no other live node,
//! it asks every node for theirs and merges each node's reply once, as
//! they come. It answers once every shard is served by a node that
//! answered and every live node answered, or after [`PARTIAL_WAIT`] with
//! `"partial":true` and the shards missing; a reply also says
//! `"missing_nodes"` when a live node did not answer or a gone node's panes
//! are not adopted yet (see [`super::replica`]). Medians are published by the
//! node that serves shard 0, from the merge of every node's sketches.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Message, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::cluster::Membership;
use crate::config::parse_duration_ms;
use crate::engine::unix_ms;
use crate::observe::metrics::{Endpoint, Metrics};
use crate::pipeline::ShardState;
use crate::shared::Shared;
use crate::stages::{Aggregate, Stages, Summary};
use crate::transport::subscription::{publish, reply_error};

/// Longest a query waits for the other nodes' summaries.
pub const PARTIAL_WAIT: Duration = Duration::from_millis(500);
/// Queries answered at once on a node; more get 503 at once.
const MAX_QUERIES: usize = 256;
/// How often panes out of every window are dropped.
const EVICT_EVERY: Duration = Duration::from_secs(1);

fn query_subject(prefix: &str) -> String {
    format!("{prefix}.agg.query")
}
fn quantile_subject(prefix: &str) -> String {
    format!("{prefix}.agg.quantile")
}
fn partial_subject(prefix: &str) -> String {
    format!("{prefix}.agg.partial")
}

/// Subscribes to the query subjects and starts the median publishers and
/// the eviction; the tasks run until aborted.
///
/// # Errors
///
/// If a subscription cannot be made.
pub async fn serve(
    ctx: Arc<Shared>,
    stages: Arc<Stages>,
    node: String,
    members: Option<Arc<Membership>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, async_nats::SubscribeError> {
    let peers = Arc::new(Peers { node, members });
    let prefix = ctx.subjects.prefix().to_owned();
    let group = format!("{prefix}.agg");
    let queries = ctx
        .client
        .queue_subscribe(query_subject(&prefix), group.clone())
        .await?;
    let quantiles = ctx
        .client
        .queue_subscribe(quantile_subject(&prefix), group)
        .await?;
    let partials = ctx.client.subscribe(partial_subject(&prefix)).await?;
    let mut tasks = Vec::new();
    let (c, p, s) = (ctx.clone(), peers.clone(), stages.clone());
    tasks.push(tokio::spawn(async move {
        let mut all = futures_util::stream::select(queries, quantiles);
        let running = Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES));
        while let Some(message) = all.next().await {
            let Ok(permit) = running.clone().try_acquire_owned() else {
                // A flood of queries is refused, not queued without bound.
                if let Some(to) = message.reply
                    && !c.subjects.is_ours(&to)
                {
                    reply_error(&c, to, 503, "busy: too many aggregate queries at once; retry").await;
                    c.metrics
                        .served(Endpoint::Aggregates, std::time::Instant::now(), true);
                }
                continue;
            };
            let (c, p, s) = (c.clone(), p.clone(), s.clone());
            let started = std::time::Instant::now();
            tokio::spawn(async move {
                let error = query(&c, &p, &s, message).await;
                c.metrics.served(Endpoint::Aggregates, started, error);
                drop(permit);
            });
        }
    }));
    let (c, p, s) = (ctx.clone(), peers.clone(), stages.clone());
    tasks.push(tokio::spawn(async move {
        let mut partials = partials;
        while let Some(message) = partials.next().await {
            partial(&c, &p, &s, message).await;
        }
    }));
    for agg in &stages.aggregates {
        if let Some(every) = agg.settings.emit_every_ms {
            let (c, p, a) = (ctx.clone(), peers.clone(), agg.clone());
            tasks.push(tokio::spawn(emit_medians(c, p, a, Duration::from_millis(every))));
        }
        // One task per schedule: emissions due together share their gathers.
        let mut schedules: std::collections::BTreeMap<u64, Vec<_>> = Default::default();
        for emit in &agg.settings.emit {
            schedules.entry(emit.every_ms).or_default().push(emit.clone());
        }
        for emits in schedules.into_values() {
            let (c, p, a) = (ctx.clone(), peers.clone(), agg.clone());
            tasks.push(tokio::spawn(super::emit::run(c, p, a, emits)));
        }
    }
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVICT_EVERY);
        loop {
            tick.tick().await;
            stages.evict();
        }
    }));
    Ok(tasks)
}

/// What a query asks: which group, which panes, which quantile.
struct Asked {
    group: String,
    start_ms: u64,
    end_ms: u64,
    q: f64,
}

fn asked(agg: &Aggregate, query: &Value, now_ms: u64) -> Result<Asked, String> {
    let s = &agg.settings;
    let group = query[&s.group]
        .as_str()
        .ok_or_else(|| format!("{:?} must be the group's name (text)", s.group))?
        .to_owned();
    let (start_ms, end_ms) = match (query.get("window"), query.get("start"), query.get("end")) {
        (Some(w), None, None) => {
            let ms = w
                .as_str()
                .and_then(parse_duration_ms)
                .filter(|&ms| ms > 0)
                .ok_or("\"window\" must be a duration such as \"60s\"")?;
            if ms > s.max_window_ms {
                return Err(format!(
                    "window {} ms is longer than this aggregate keeps (max_window {} ms)",
                    ms, s.max_window_ms
                ));
            }
            agg.last(ms, now_ms)
        }
        (None, Some(start), Some(end)) => {
            let secs = |v: &Value| v.as_f64().filter(|x| x.is_finite() && *x >= 0.0);
            let (Some(start), Some(end)) = (secs(start), secs(end)) else {
                return Err("\"start\" and \"end\" must be Unix seconds".into());
            };
            if start >= end {
                return Err("\"start\" must be before \"end\"".into());
            }
            agg.aligned((start * 1000.0) as u64, (end * 1000.0).ceil() as u64)
        }
        _ => return Err("give \"window\" (e.g. \"60s\"), or \"start\" and \"end\" (Unix seconds)".into()),
    };
    let q = match query.get("q") {
        None => 0.5,
        Some(q) => q
            .as_f64()
            .filter(|q| (0.0..=1.0).contains(q))
            .ok_or("\"q\" must be a number from 0 to 1")?,
    };
    Ok(Asked {
        group,
        start_ms,
        end_ms,
        q,
    })
}

/// Unix seconds of `ms`: whole when it is, else with the fraction.
pub(super) fn seconds(ms: u64) -> Value {
    if ms.is_multiple_of(1000) {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

pub(super) fn number(x: f64) -> String {
    serde_json::to_string(&x).unwrap_or_else(|_| "null".into())
}

/// Answers one query; whether the reply was an error.
async fn query(ctx: &Shared, peers: &Peers, stages: &Stages, message: Message) -> bool {
    let Some(to) = message.reply.clone() else {
        return false;
    };
    if ctx.subjects.is_ours(&to) {
        Metrics::inc(&ctx.metrics.refused_replies);
        return false;
    }
    let quantile = message.subject.ends_with(".agg.quantile");
    let parsed = serde_json::from_slice::<Value>(&message.payload)
        .map_err(|e| format!("the query is not JSON: {e}"))
        .and_then(|query| {
            let agg = stages.find(&query)?.clone();
            let asked = asked(&agg, &query, unix_ms())?;
            Ok((agg, asked))
        });
    let (agg, asked) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // An aggregate named that does not exist: 404, as over HTTP.
            let named = serde_json::from_slice::<Value>(&message.payload)
                .ok()
                .and_then(|q| q.get("aggregate").and_then(Value::as_str).map(str::to_owned));
            let code = match named {
                Some(name) if stages.named(&name).is_none() => 404,
                _ => 400,
            };
            reply_error(ctx, to, code, &e).await;
            return true;
        }
    };
    let request = json!({
        "aggregate": agg.settings.name,
        "group": asked.group,
        "start_ms": asked.start_ms,
        "end_ms": asked.end_ms,
    });
    let (merged, missing) = match gather(ctx, peers, &agg, &request).await {
        Ok(gathered) => gathered,
        Err(e) => {
            reply_error(ctx, to, 503, &e).await;
            return true;
        }
    };
    let summary = merged
        .get(&asked.group)
        .cloned()
        .unwrap_or_else(|| Summary::new(agg.settings.alpha));
    // The documented reply, field by field in this order.
    let s = &summary;
    let mut body = format!(
        "{{{}:{},\"time_window_start\":{},\"time_window_end\":{}",
        Value::from(agg.settings.group.as_str()),
        Value::from(asked.group.as_str()),
        seconds(asked.start_ms),
        seconds(asked.end_ms),
    );
    let some = s.count > 0;
    let or_null = |x: f64| if some { number(x) } else { "null".into() };
    if quantile {
        body.push_str(&format!(
            ",\"q\":{},\"count\":{},\"value\":{}",
            number(asked.q),
            s.count,
            s.sketch.quantile(asked.q).map_or("null".into(), number)
        ));
    } else {
        body.push_str(&format!(
            ",\"count\":{},\"sum\":{},\"avg\":{},\"min\":{},\"max\":{}",
            s.count,
            number(s.sum),
            or_null(s.sum / s.count.max(1) as f64),
            or_null(s.min),
            or_null(s.max),
        ));
    }
    missing.append_to(&mut body);
    body.push('}');
    publish(ctx, to, body.into()).await;
    false
}

/// This node's ready shards and its summaries of `request` (one group, or
/// every group when `"group"` is null).
fn local(ctx: &Shared, agg: &Aggregate, request: &Value) -> (Vec<u32>, HashMap<String, Summary>) {
    let ownership = ctx.pipeline.ownership();
    let ready = (0..ownership.shards())
        .filter(|&s| ownership.state(s) == ShardState::Ready)
        .collect();
    let (start, end) = (
        request["start_ms"].as_u64().unwrap_or(0),
        request["end_ms"].as_u64().unwrap_or(0),
    );
    // The names alone (which groups have events), for the emissions.
    if request["names_only"] == true {
        return (ready, agg.groups_in(start, end));
    }
    let summaries = match request["group"].as_str() {
        Some(group) => [(group.to_owned(), agg.summary(group, start, end))]
            .into_iter()
            .collect(),
        None => agg.summaries(start, end),
    };
    (ready, summaries)
}

/// What a merged reply lacks: shards no node that answered serves, and
/// nodes whose panes are not in it (live ones that did not answer in
/// time, gone ones not adopted yet).
#[derive(Debug, Default)]
pub(super) struct Missing {
    shards: Vec<u32>,
    nodes: Vec<String>,
}

impl Missing {
    /// Whether the merge lacks nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.shards.is_empty() && self.nodes.is_empty()
    }

    /// `,"partial":true,"missing_shards":[..],"missing_nodes":[..]` (each
    /// list only when not empty), or nothing.
    pub(super) fn append_to(&self, body: &mut String) {
        if self.shards.is_empty() && self.nodes.is_empty() {
            return;
        }
        body.push_str(",\"partial\":true");
        if !self.shards.is_empty() {
            body.push_str(&format!(",\"missing_shards\":{}", json!(self.shards)));
        }
        if !self.nodes.is_empty() {
            body.push_str(&format!(",\"missing_nodes\":{}", json!(self.nodes)));
        }
    }
}

/// This node's name, and what the lease keeper knows of the others.
pub struct Peers {
    pub node: String,
    /// The live nodes (durability `replicated`): a query waits for each.
    pub members: Option<Arc<Membership>>,
}

/// This node's summaries of `request`, merged with every other node's;
/// returns them per group with what the merge lacks.
///
/// Panes are per node, so each node's summaries count once, whichever
/// shards it serves now. It waits until every shard is served by a node
/// that answered and every live node (as the lease keeper last listed
/// them) answered, or for [`PARTIAL_WAIT`].
pub(super) async fn gather(
    ctx: &Shared,
    peers: &Peers,
    agg: &Aggregate,
    request: &Value,
) -> Result<(HashMap<String, Summary>, Missing), String> {
    let shards = ctx.pipeline.ownership().shards();
    // Panes that may be adopted by now are left out, and this node is
    // named missing.
    let trusted = peers.members.as_ref().is_none_or(|m| m.panes_trusted());
    let (ready, mut merged) = match trusted {
        true => local(ctx, agg, request),
        false => (Vec::new(), HashMap::new()),
    };
    let mut covered: BTreeSet<u32> = ready.into_iter().collect();
    let mut answered = BTreeSet::new();
    if trusted {
        answered.insert(peers.node.clone());
    }
    let expected = peers.members.as_ref().and_then(|m| m.live()).unwrap_or_default();
    let done = |covered: &BTreeSet<u32>, answered: &BTreeSet<String>| {
        covered.len() == shards as usize && expected.iter().all(|n| answered.contains(n))
    };
    if !done(&covered, &answered) {
        let inbox = ctx.client.new_inbox();
        let mut replies = ctx
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        ctx.client
            .publish_with_reply(
                partial_subject(ctx.subjects.prefix()),
                inbox,
                request.to_string().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + PARTIAL_WAIT;
        while !done(&covered, &answered) {
            let reply = match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => break,
                Ok(Some(m)) => m,
                _ => break,
            };
            let Ok(reply) = serde_json::from_slice::<Value>(&reply.payload) else {
                continue;
            };
            // This node's own reply, or a node heard from already.
            let (Some(node), Some(theirs), Some(groups)) = (
                reply["node"].as_str(),
                reply["shards"].as_array(),
                reply["groups"].as_object(),
            ) else {
                continue;
            };
            if answered.contains(node) {
                continue;
            }
            let mut summaries = Vec::new();
            for (group, summary) in groups {
                match Summary::from_json(summary) {
                    Some(s) if (s.sketch.alpha() - agg.settings.alpha).abs() < f64::EPSILON => {
                        summaries.push((group, s))
                    }
                    _ => {
                        return Err(
                            "a node sent a summary of another accuracy or shape; are the configurations the same?".into(),
                        );
                    }
                }
            }
            answered.insert(node.to_owned());
            covered.extend(theirs.iter().filter_map(Value::as_u64).map(|s| s as u32));
            for (group, s) in summaries {
                merged
                    .entry(group.clone())
                    .or_insert_with(|| Summary::new(agg.settings.alpha))
                    .merge(&s);
            }
        }
    }
    let mut nodes: Vec<String> = expected.into_iter().filter(|n| !answered.contains(n)).collect();
    if !trusted && !nodes.contains(&peers.node) {
        nodes.push(peers.node.clone());
    }
    if let Some(members) = &peers.members {
        nodes.extend(members.orphans());
    }
    let missing = Missing {
        shards: (0..shards).filter(|s| !covered.contains(s)).collect(),
        nodes,
    };
    Ok((merged, missing))
}

/// One node's summaries of its ready shards: of one group, or of every
/// group when `"group"` is null.
async fn partial(ctx: &Shared, peers: &Peers, stages: &Stages, message: Message) {
    let Some(to) = message.reply.clone() else { return };
    if ctx.subjects.is_ours(&to) {
        Metrics::inc(&ctx.metrics.refused_replies);
        return;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&message.payload) else {
        return reply_error(ctx, to, 400, "not JSON").await;
    };
    let Ok(agg) = stages.find(&request) else {
        return reply_error(ctx, to, 404, "no such aggregate here").await;
    };
    if request["start_ms"].as_u64().is_none() || request["end_ms"].as_u64().is_none() {
        return reply_error(ctx, to, 400, "start_ms and end_ms").await;
    }
    if peers.members.as_ref().is_some_and(|m| !m.panes_trusted()) {
        // Its panes may be adopted: the querier counts it missing.
        return reply_error(
            ctx,
            to,
            503,
            "this node's panes are being checked (its heartbeat lapsed)",
        )
        .await;
    }
    let (ready, summaries) = local(ctx, agg, &request);
    let groups: serde_json::Map<String, Value> =
        summaries.into_iter().map(|(g, s)| (g, s.to_json())).collect();
    let body = json!({ "node": peers.node, "shards": ready, "groups": groups });
    publish(ctx, to, body.to_string().into()).await;
}

/// Every `every`, on the node serving shard 0: each group's median over
/// the last `emit_window` of event time, merged over every node, to
/// `<prefix>.median.<group>`.
async fn emit_medians(ctx: Arc<Shared>, peers: Arc<Peers>, agg: Arc<Aggregate>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if ctx.pipeline.ownership().state(0) != ShardState::Ready {
            continue;
        }
        let now = unix_ms();
        let (start, end) = agg.last(agg.settings.emit_window_ms, now);
        let request = json!({
            "aggregate": agg.settings.name,
            "group": null,
            "start_ms": start,
            "end_ms": end,
        });
        let (merged, missing) = match gather(&ctx, &peers, &agg, &request).await {
            Ok(gathered) => gathered,
            Err(e) => {
                tracing::warn!(message = "Cannot gather the sketches for the medians.", error = %e);
                continue;
            }
        };
        for (group, summary) in merged {
            let Some(median) = summary.sketch.quantile(0.5) else {
                continue;
            };
            if group.is_empty() || group.contains(|c: char| c.is_whitespace() || ".*>".contains(c)) {
                // Not a subject token: published under `_` with its name.
                publish_median(
                    &ctx,
                    &agg,
                    &format!("{}.median._", ctx.subjects.prefix()),
                    &group,
                    median,
                    now,
                    &missing,
                )
                .await;
                continue;
            }
            let subject = format!("{}.median.{group}", ctx.subjects.prefix());
            publish_median(&ctx, &agg, &subject, &group, median, now, &missing).await;
        }
    }
}

async fn publish_median(
    ctx: &Shared,
    agg: &Aggregate,
    subject: &str,
    group: &str,
    median: f64,
    now_ms: u64,
    missing: &Missing,
) {
    let mut body = format!(
        "{{{}:{},\"median_value\":{},\"timestamp_of_calculation\":{}",
        Value::from(agg.settings.group.as_str()),
        Value::from(group),
        number(median),
        seconds(now_ms),
    );
    missing.append_to(&mut body);
    body.push('}');
    publish(ctx, Subject::from(subject), Bytes::from(body)).await;
}
