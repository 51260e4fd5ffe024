//! Sending events of shards owned elsewhere to their owners, and relaying
//! the owners' answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::{HeaderMap, Message, RequestErrorKind, Subject};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::engine::batch::{self, Entry};
use crate::nats::ordered::NoAnswer;
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
    if let Some(on) = came_in_on {
        return send_on(ctx, subject, on, body).await.await;
    }
    let why = match tokio::time::timeout(FORWARD_TIMEOUT, ctx.client.request(subject.clone(), body)).await {
        Ok(Ok(answer)) => return Ok(answer),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => format!("no node answers on {subject}"),
        Ok(Err(e)) => format!("no owner answered on {subject}: {e}"),
        Err(_) => format!("no answer on {subject} within {FORWARD_TIMEOUT:?}"),
    };
    Metrics::inc(&ctx.metrics.forward_failures);
    Err(why)
}

/// Sends events (one, or a sub-batch) that came in on `came_in_on` to
/// `subject`: published when this returns, after everything sent on
/// before, so that a shard's events reach their owner in the order this
/// node took them in. The future gives the answer within
/// [`FORWARD_TIMEOUT`], or why none came (counted in `forward_failures`).
async fn send_on(
    ctx: &Shared,
    subject: Subject,
    came_in_on: &Subject,
    body: Bytes,
) -> BoxFuture<'static, Result<Message, String>> {
    const NAME: HeaderName = HeaderName::from_static(SUBJECT_HEADER);
    let mut headers = HeaderMap::new();
    headers.insert(NAME, HeaderValue::from(came_in_on.as_str()));
    let sent = ctx.forwards.send(subject.clone(), headers, body).await;
    let metrics = ctx.metrics.clone();
    Box::pin(async move {
        let why = match sent {
            Err(e) => format!("could not send on to {subject}: {e:?}"),
            Ok(answer) => match tokio::time::timeout(FORWARD_TIMEOUT, answer.get()).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(NoAnswer::NoResponders)) => format!("no node answers on {subject}"),
                Ok(Err(e)) => format!("no owner answered on {subject}: {e:?}"),
                Err(_) => format!("no answer on {subject} within {FORWARD_TIMEOUT:?}"),
            },
        };
        Metrics::inc(&metrics.forward_failures);
        Err(why)
    })
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
    Metrics::inc(&ctx.metrics.forwarded);
    let answer = send_on(&ctx, target.clone(), &came_in_on, event).await;
    Box::pin(relay(ctx, target, answer, reply))
}

/// Relays the owner's `answer` to an event sent on to `target`.
async fn relay(
    ctx: Arc<Shared>,
    target: Subject,
    answer: BoxFuture<'static, Result<Message, String>>,
    reply: Option<Subject>,
) -> bool {
    match answer.await {
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
        ctx.metrics.forwarded.fetch_add(lines.len() as u64, Relaxed);
        let target = ctx.subjects.sub_batch(shard).into();
        let answer = send_on(ctx, target, came_in_on, body.into()).await;
        answers.push(sub_batch(ctx.clone(), shard, lines, answer));
    }
    Box::pin(futures_util::future::join_all(answers))
}

/// A sub-batch's entries, from its owner's `answer`.
async fn sub_batch(
    ctx: Arc<Shared>,
    shard: u32,
    lines: Vec<usize>,
    answer: BoxFuture<'static, Result<Message, String>>,
) -> (Vec<usize>, Vec<Entry>) {
    let failure = match answer.await {
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
