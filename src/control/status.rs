//! Each node's status: the `<prefix>.status` responder's side and the
//! CLI's `eventsieve status` (with the lease table in `replicated` mode).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::{Durability, Settings};
use crate::shared::Shared;

use super::{Window, format_ms, gather, reply_body};

/// This node: its shards, window and tables.
pub(super) async fn status(ctx: &Arc<Shared>, window: &Window, node: &str, started: Instant) -> Value {
    let owned = ctx.pipeline.ownership().owned();
    let ready = owned
        .iter()
        .filter(|&&s| ctx.pipeline.ownership().state(s) == crate::pipeline::ShardState::Ready)
        .count();
    let c = ctx.clone();
    let census = tokio::task::spawn_blocking(move || c.metrics.census.get(c.pipeline.dedup())).await;
    let (live, bytes) = census.map_or((0, 0), |c| (c.live, c.bytes));
    json!({
        "node": node,
        "shards": ctx.pipeline.ownership().shards(),
        "owned": owned,
        "ready": ready,
        "window": window.describe(ctx, node),
        "live_ids": live,
        "table_bytes": bytes,
        "verdicts": ctx.metrics.answered(),
        "uptime_s": started.elapsed().as_secs(),
        "rules": rules(ctx),
        "schema": schema(ctx),
        "sealed": ctx.pipeline.dedup().sealed_figures().map(|f| json!({
            "ids": f.ids,
            "generations": f.generations,
            "memory_bytes": f.memory_bytes,
            "disk_bytes": f.disk_bytes,
            "filter_probes": f.filter_probes,
            "block_reads": f.block_reads,
        })),
    })
}

/// The protobuf schema this node reads events by, and its last refusal
/// since; null for JSON input.
fn schema(ctx: &Shared) -> Value {
    let Some(schemas) = ctx.pipeline.dedup().config().format.schemas() else {
        return Value::Null;
    };
    let mut v = json!({ "revision": schemas.revision(), "message": schemas.current().name() });
    if let Some((revision, why)) = schemas.last_rejection() {
        v["rejected"] = json!({ "revision": revision, "error": why });
    }
    v
}

/// The routing rules this node runs, and its last refusal since.
fn rules(ctx: &Shared) -> Value {
    let set = ctx.router.current();
    let mut v = json!({ "revision": set.revision, "rules": set.len(), "compiled": set.compiled() });
    if let Some((revision, why)) = ctx.router.last_rejection() {
        v["rejected"] = json!({ "revision": revision, "error": why });
    }
    v
}

/// With `tier = "tiered"`: the sealed tier's ids, files, RAM and disk,
/// and what a verdict cost in it; empty otherwise.
fn sealed_line(s: &Value) -> String {
    let t = &s["sealed"];
    if t.is_null() {
        return String::new();
    }
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    let verdicts = s["verdicts"].as_u64().unwrap_or(0).max(1) as f64;
    format!(
        "  sealed {} ids in {} files: RAM {} B ({:.2} B/id), disk {} B; per verdict {:.2} filter probes, {:.4} block reads",
        n("ids"),
        n("generations"),
        n("memory_bytes"),
        n("memory_bytes") as f64 / n("ids").max(1) as f64,
        n("disk_bytes"),
        n("filter_probes") as f64 / verdicts,
        n("block_reads") as f64 / verdicts,
    )
}

/// `eventsieve status`: a line per node (or its reply as JSON).
///
/// # Errors
///
/// NATS unreachable, or no sidecar answered.
pub async fn status_command(settings: &Settings, json: bool) -> Result<Vec<String>, String> {
    let client = crate::nats::options::connect(&settings.config.nats, Arc::default())
        .await
        .map_err(|e| e.to_string())?;
    let subject = format!("{}.status", settings.config.subject_prefix);
    let replies = gather(&client, subject.clone(), Bytes::new()).await?;
    if replies.is_empty() {
        return Err(format!("no sidecar answered on {subject}"));
    }
    let mut lines = Vec::new();
    for reply in &replies {
        let s = reply_body(reply)?;
        if json {
            lines.push(s.to_string());
            continue;
        }
        let owned: Vec<u32> = serde_json::from_value(s["owned"].clone()).unwrap_or_default();
        let (live, bytes) = (
            s["live_ids"].as_u64().unwrap_or(0),
            s["table_bytes"].as_u64().unwrap_or(0),
        );
        let w = &s["window"];
        lines.push(format!(
            "{}  shards {} of {} ({} ready)  window {} (in force {})  live ids {live}  table {bytes} B ({:.1} B/id)  verdicts {}  up {} s",
            s["node"].as_str().unwrap_or("?"),
            shard_ranges(&owned),
            s["shards"],
            s["ready"],
            format_ms(w["window_ms"].as_u64().unwrap_or(0)),
            format_ms(w["in_force_ms"].as_u64().unwrap_or(0)),
            bytes as f64 / live.max(1) as f64,
            s["verdicts"],
            s["uptime_s"],
        ));
        let r = &s["rules"];
        let mut rules = format!("  rules revision {} ({} rules)", r["revision"], r["rules"]);
        if let Some(rejected) = r.get("rejected") {
            rules += &format!(
                "; refused revision {}: {}",
                rejected["revision"],
                rejected["error"].as_str().unwrap_or("?")
            );
        }
        let p = &s["schema"];
        if !p.is_null() {
            rules += &format!(
                "  schema revision {} ({})",
                p["revision"],
                p["message"].as_str().unwrap_or("?")
            );
            if let Some(rejected) = p.get("rejected") {
                rules += &format!(
                    "; refused revision {}: {}",
                    rejected["revision"],
                    rejected["error"].as_str().unwrap_or("?")
                );
            }
        }
        // One line a node: the rules and the schema go at the end of its line.
        if let Some(line) = lines.last_mut() {
            line.push_str(&rules);
            line.push_str(&sealed_line(&s));
        }
    }
    if settings.config.durability == Durability::Replicated {
        let rows = lease_table(&client, settings).await?;
        if json {
            lines.push(json!({ "leases": rows }).to_string());
        } else {
            lines.push("shard  owner                   epoch  journal seq (lease / last)".into());
            for r in &rows {
                let owner = r["owner"].as_str().unwrap_or_default();
                lines.push(format!(
                    "{:>5}  {:<22}  {:>5}  {} / {}",
                    r["shard"],
                    if owner.is_empty() { "(free)" } else { owner },
                    r["epoch"].as_u64().map_or("-".into(), |e| e.to_string()),
                    r["journal_seq"].as_u64().map_or("-".into(), |e| e.to_string()),
                    r["journal_last"],
                ));
            }
        }
    }
    Ok(lines)
}

/// `0-15,20`.
fn shard_ranges(shards: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        let mut j = i;
        while j + 1 < shards.len() && shards[j + 1] == shards[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            shards[i].to_string()
        } else {
            format!("{}-{}", shards[i], shards[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// `eventsieve status` for a replicated cluster: per shard its owner, the
/// lease's epoch, the journal sequence the owner last reported and the
/// journal's last sequence (their difference: how far the lease's record
/// trails, at most one renewal's worth of appends).
///
/// # Errors
///
/// If the bucket or the journal stream cannot be read.
async fn lease_table(
    client: &async_nats::Client,
    settings: &crate::config::Settings,
) -> Result<Vec<serde_json::Value>, String> {
    let js = async_nats::jetstream::new(client.clone());
    let bucket = &settings.config.kv_bucket;
    let kv = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("KV bucket {bucket:?}: {e}"))?;
    let stream_name = &settings.config.cluster.journal_stream;
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| format!("journal stream {stream_name}: {e}"))?;
    let prefix = &settings.config.subject_prefix;
    let mut rows = Vec::new();
    for shard in 0..settings.config.shards {
        let lease: Option<crate::cluster::Lease> = kv
            .get(crate::cluster::lease::shard_key(shard))
            .await
            .map_err(|e| e.to_string())?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let last = stream
            .get_last_raw_message_by_subject(&format!("{prefix}.journal.{shard}"))
            .await
            .map_or(0, |m| m.sequence);
        rows.push(match lease {
            Some(l) => serde_json::json!({
                "shard": shard, "owner": l.owner, "epoch": l.epoch, "since": l.since,
                "journal_seq": l.journal_seq, "journal_last": last,
                "journal_lag": last.saturating_sub(l.journal_seq),
            }),
            None => serde_json::json!({ "shard": shard, "owner": "", "journal_last": last }),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_lists_print_as_ranges() {
        assert_eq!(shard_ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(shard_ranges(&[]), "none");
    }
}
