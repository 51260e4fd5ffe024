//! Sending events of shards owned elsewhere to their owners, and relaying
//! the owners' answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use async_nats::{Message, Subject};
use bytes::Bytes;

use crate::engine::batch::{self, Entry};
use crate::observe::metrics::Metrics;
use crate::transport::nats::Context;
use crate::transport::nats::subscription::{publish, reply_error};

/// Forwards one event to `target` (its owner's shard subject) and relays
/// the answer, headers included; 503 if no owner answers.
/// Returns whether the reply was an error.
pub async fn single(ctx: Arc<Context>, target: Subject, event: Bytes, reply: Option<Subject>) -> bool {
    Metrics::inc(&ctx.metrics.forwarded);
    match ctx.client.request(target.clone(), event).await {
        Ok(Message { headers, payload, .. }) => {
            let error = headers
                .as_ref()
                .is_some_and(|h| h.get("Nats-Service-Error-Code").is_some());
            let Some(reply) = reply else { return error };
            match headers {
                Some(headers) => {
                    if ctx
                        .client
                        .publish_with_headers(reply, headers, payload)
                        .await
                        .is_err()
                    {
                        Metrics::inc(&ctx.metrics.publish_errors);
                    }
                }
                None => publish(&ctx, reply, payload).await,
            }
            error
        }
        Err(e) => {
            Metrics::inc(&ctx.metrics.forward_failures);
            Metrics::inc(&ctx.metrics.not_ready);
            tracing::debug!(message = "Forward failed.", subject = %target, error = %e);
            if let Some(reply) = reply {
                let reason = format!("no owner answered on {target}: {e}");
                reply_error(&ctx, reply, 503, &reason).await;
            }
            true
        }
    }
}

/// Sends each shard's lines to its owner as a sub-batch, all at once;
/// returns per shard the lines and their entries (503 for each line if the
/// owner did not answer with one entry per line).
pub async fn sub_batches(
    ctx: &Context,
    forwards: BTreeMap<u32, (Vec<usize>, Vec<u8>)>,
) -> Vec<(Vec<usize>, Vec<Entry>)> {
    futures_util::future::join_all(
        forwards
            .into_iter()
            .map(|(shard, (lines, body))| sub_batch(ctx, shard, lines, body)),
    )
    .await
}

async fn sub_batch(ctx: &Context, shard: u32, lines: Vec<usize>, body: Vec<u8>) -> (Vec<usize>, Vec<Entry>) {
    ctx.metrics.forwarded.fetch_add(lines.len() as u64, Relaxed);
    let target = ctx.subjects.sub_batch(shard);
    let failure = match ctx.client.request(target.clone(), body.into()).await {
        Ok(answer) => match batch::decode(&answer.payload) {
            Ok(entries) if entries.len() == lines.len() => return (lines, entries),
            Ok(entries) => format!(
                "owner of shard {shard} answered {} entries for {} lines",
                entries.len(),
                lines.len()
            ),
            Err(e) => format!("owner of shard {shard}: {e}"),
        },
        Err(e) => format!("no owner answered on {target}: {e}"),
    };
    Metrics::inc(&ctx.metrics.forward_failures);
    ctx.metrics.not_ready.fetch_add(lines.len() as u64, Relaxed);
    tracing::debug!(message = "Batch forward failed.", shard, reason = %failure);
    let entries = vec![Entry::error(503, failure); lines.len()];
    (lines, entries)
}
