//! Sending events of shards owned elsewhere to their owners, and relaying
//! the owners' answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::{HeaderMap, Message, RequestErrorKind, Subject};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::engine::batch::{self, Entry};
use crate::observe::metrics::Metrics;
use crate::shared::Shared;
use crate::transport::SUBJECT_HEADER;
use crate::transport::subscription::{publish, reply_error};

/// How long a request sent on to another node may take: longer than a
/// commit that waits for the replicated journal (its appends time out
/// after 5 s).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a request to another node (every transport's forwards go through
/// here, bounded by [`FORWARD_TIMEOUT`]), with the subject the producer's
/// request `came_in_on` for events; the answer, or why none came (counted
/// in `forward_failures`).
///
/// # Errors
///
/// Why no answer came: no node subscribed, or none in time.
pub async fn request(
    ctx: &Shared,
    subject: Subject,
    came_in_on: Option<&Subject>,
    body: Bytes,
) -> Result<Message, String> {
    let asked = async {
        match came_in_on {
            Some(on) => {
                const NAME: HeaderName = HeaderName::from_static(SUBJECT_HEADER);
                let mut headers = HeaderMap::new();
                headers.insert(NAME, HeaderValue::from(on.as_str()));
                ctx.client
                    .request_with_headers(subject.clone(), headers, body)
                    .await
            }
            None => ctx.client.request(subject.clone(), body).await,
        }
    };
    let why = match tokio::time::timeout(FORWARD_TIMEOUT, asked).await {
        Ok(Ok(answer)) => return Ok(answer),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => format!("no node answers on {subject}"),
        Ok(Err(e)) => format!("no owner answered on {subject}: {e}"),
        Err(_) => format!("no answer on {subject} within {FORWARD_TIMEOUT:?}"),
    };
    Metrics::inc(&ctx.metrics.forward_failures);
    Err(why)
}

/// Polls `request` once and hands it back to be awaited: async-nats
/// queues a request's message on its first poll (on a channel that serves
/// senders first come, first served), so requests started one after
/// another leave in that order, whichever is answered first. That keeps a
/// shard's events in the order this node took them in when it forwards
/// them.
async fn started<T: Send + 'static>(mut request: BoxFuture<'static, T>) -> BoxFuture<'static, T> {
    match std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await {
        Poll::Ready(done) => Box::pin(std::future::ready(done)),
        Poll::Pending => request,
    }
}

/// Forwards one event that came in on `came_in_on` to `target` (its
/// owner's shard subject): sent when this returns; the future relays the
/// answer, headers included (503 if no owner answers), and gives whether
/// the reply was an error.
pub async fn single(
    ctx: Arc<Shared>,
    (target, came_in_on): (Subject, Subject),
    event: Bytes,
    reply: Option<Subject>,
) -> BoxFuture<'static, bool> {
    started(Box::pin(relay(ctx, (target, came_in_on), event, reply))).await
}

async fn relay(
    ctx: Arc<Shared>,
    (target, came_in_on): (Subject, Subject),
    event: Bytes,
    reply: Option<Subject>,
) -> bool {
    Metrics::inc(&ctx.metrics.forwarded);
    match request(&ctx, target.clone(), Some(&came_in_on), event).await {
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
        Err(reason) => {
            Metrics::inc(&ctx.metrics.not_ready);
            tracing::debug!(message = "Forward failed.", subject = %target, error = %reason);
            if let Some(reply) = reply {
                reply_error(&ctx, reply, 503, &format!("{reason}; retry")).await;
            }
            true
        }
    }
}

/// The answers of a batch's sub-batches: per shard, the lines and their
/// entries.
pub type SubBatches = BoxFuture<'static, Vec<(Vec<usize>, Vec<Entry>)>>;

/// Sends each shard's lines to its owner as a sub-batch, all at once: sent
/// when this returns. The future gives per shard the lines and their
/// entries (503 for each line if the owner did not answer with one entry
/// per line).
pub async fn sub_batches(
    ctx: &Arc<Shared>,
    came_in_on: &Subject,
    forwards: BTreeMap<u32, (Vec<usize>, Vec<u8>)>,
) -> SubBatches {
    let mut answers = Vec::with_capacity(forwards.len());
    for (shard, (lines, body)) in forwards {
        let asked = sub_batch(ctx.clone(), came_in_on.clone(), shard, lines, body);
        answers.push(started(Box::pin(asked)).await);
    }
    Box::pin(futures_util::future::join_all(answers))
}

async fn sub_batch(
    ctx: Arc<Shared>,
    came_in_on: Subject,
    shard: u32,
    lines: Vec<usize>,
    body: Vec<u8>,
) -> (Vec<usize>, Vec<Entry>) {
    ctx.metrics.forwarded.fetch_add(lines.len() as u64, Relaxed);
    let target = ctx.subjects.sub_batch(shard);
    let failure = match request(&ctx, target.into(), Some(&came_in_on), body.into()).await {
        Ok(answer) => {
            let what = match batch::decode(&answer.payload) {
                Ok(entries) if entries.len() == lines.len() => return (lines, entries),
                Ok(entries) => format!(
                    "owner of shard {shard} answered {} entries for {} lines",
                    entries.len(),
                    lines.len()
                ),
                Err(e) => format!("owner of shard {shard}: {e}"),
            };
            Metrics::inc(&ctx.metrics.forward_failures);
            what
        }
        Err(why) => why,
    };
    ctx.metrics.not_ready.fetch_add(lines.len() as u64, Relaxed);
    tracing::debug!(message = "Batch forward failed.", shard, reason = %failure);
    let entries = vec![Entry::error(503, failure); lines.len()];
    (lines, entries)
}
