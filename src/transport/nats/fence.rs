//! Unsubscribing without dropping a request the server already routed here.
//!
//! async-nats's `drain` forgets a subscription as soon as its UNSUB is
//! written, so a request the server sent before it read that UNSUB is
//! dropped inside the client (nats-io/nats.rs#1325). Instead, both ends are
//! told to stop after the same message: `UNSUB <sid> <limit>` with `limit`
//! past what the server can have sent, a flush to know the server read it,
//! then fence messages on the subscription's own subject make up the
//! difference. Requests keep being answered until the `limit`-th message,
//! after which the server routes nothing here; fences beyond it reach no one.
//!
//! The slack follows the subscription's traffic: what arrives during one
//! round trip to the server, times eight, plus 64, at most 4 096. An idle
//! shard's subscription then costs 64 fence messages instead of 4 096, which
//! is what lets a node own thousands of shards and still stop in a moment.
//! A subscription whose traffic jumps by more than that between the
//! measurement and the UNSUB could see requests past the limit dropped by
//! the client (their producers time out and retry; nothing was decided).
//!
//! A fence is a message with no reply subject whose payload is exactly
//! [`FENCE_PAYLOAD`]: a request (which always has a reply subject) is never
//! taken for one, so producers cannot reach this handling.

use std::time::Duration;

use async_nats::{Client, Message, Subject, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use crate::transport::nats::subjects::FENCE_PAYLOAD;
use crate::transport::nats::subscription::{Served, Work};

/// Bounds of how many messages past those already read the server may
/// still send after the fence's UNSUB; each one not used by requests costs
/// one fence message.
const MIN_SLACK: u64 = 64;
const MAX_SLACK: u64 = 4096;
/// How long a fence waits before giving up and unsubscribing outright.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handles the messages already in the client's buffer.
async fn take_buffered(served: &mut Served, work: &mut Work) {
    while let Some(Some(message)) = served.sub.next().now_or_never() {
        served.handle(message, work).await;
    }
}

/// Whether `message` is a fence (ours or a queue-group peer's).
pub fn is_fence(message: &Message) -> bool {
    message.reply.is_none() && message.payload.as_ref() == FENCE_PAYLOAD
}

/// Fences `served` and answers every request routed to it before the fence.
pub async fn fence(served: &mut Served, fence_subject: &Subject, work: &mut Work) {
    let client = served.ctx.client.clone();
    // Empty the client's buffer first, so the slack covers only what is in
    // transit; then measure what arrives in one round trip.
    take_buffered(served, work).await;
    let before = served.received;
    let _ = client.flush().await;
    take_buffered(served, work).await;
    let per_round_trip = served.received - before;
    let slack = (per_round_trip * 8 + MIN_SLACK).min(MAX_SLACK);
    let limit = served.received + slack;
    let fenced = served.sub.unsubscribe_after(limit).await.is_ok() && client.flush().await.is_ok();
    if !fenced {
        tracing::warn!(message = "Fence could not be set; unsubscribing outright.", subject = %fence_subject);
        let _ = served.sub.unsubscribe().await;
    }
    let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
    let mut refill = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            biased;
            () = work.settled(), if work.has_waiting() => work.answer_settled(&served.ctx).await,
            message = served.sub.next() => match message {
                Some(message) => served.handle(message, work).await,
                None => return,
            },
            // Top up: requests and queue-group peers may have taken some.
            _ = refill.tick(), if fenced => {
                for _ in served.received..limit {
                    let fence = Bytes::from_static(FENCE_PAYLOAD);
                    if client.publish(fence_subject.clone(), fence).await.is_err() {
                        break;
                    }
                }
                let _ = client.flush().await;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(message = "Fence timed out; unsubscribing outright.", subject = %fence_subject);
                let _ = served.sub.unsubscribe().await;
                while let Some(message) = served.sub.next().await {
                    served.handle(message, work).await;
                }
                return;
            }
        }
    }
}

/// What answers the requests of a [`Plain`] subscription.
pub trait Answer: Send + Sync {
    fn answer(&self, message: Message) -> impl Future<Output = ()> + Send;
}

/// A subscription served by a loop of its own (the control plane's), and
/// the count of messages it has read (the fence relies on it).
pub struct Plain {
    pub sub: Subscriber,
    pub received: u64,
}

impl Plain {
    pub fn new(sub: Subscriber) -> Self {
        Self { sub, received: 0 }
    }

    /// The next message, counted.
    pub async fn next(&mut self) -> Option<Message> {
        let message = self.sub.next().await;
        self.received += u64::from(message.is_some());
        message
    }

    /// As [`fence`], for a subscription whose requests are answered one at
    /// a time by `handler` (fences are skipped). `subject` is the
    /// subscription's own, without wildcards.
    pub async fn fence(&mut self, client: &Client, subject: &Subject, handler: &impl Answer) {
        let limit = self.received + MIN_SLACK;
        let fenced = self.sub.unsubscribe_after(limit).await.is_ok() && client.flush().await.is_ok();
        if !fenced {
            let _ = self.sub.unsubscribe().await;
        }
        let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
        let mut refill = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                message = self.next() => match message {
                    Some(message) if is_fence(&message) => {}
                    Some(message) => handler.answer(message).await,
                    None => return,
                },
                _ = refill.tick(), if fenced => {
                    for _ in self.received..limit {
                        if client.publish(subject.clone(), Bytes::from_static(FENCE_PAYLOAD)).await.is_err() {
                            break;
                        }
                    }
                    let _ = client.flush().await;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(message = "Fence timed out; unsubscribing outright.", subject = %subject);
                    let _ = self.sub.unsubscribe().await;
                    return;
                }
            }
        }
    }
}
