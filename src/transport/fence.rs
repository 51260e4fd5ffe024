//! Unsubscribing without dropping a request the server already routed here.
//!
//! async-nats's `drain` forgets a subscription as soon as its UNSUB is
//! written, so a request the server sent before it read that UNSUB is
//! dropped inside the client (nats-io/nats.rs#1325). Instead, both ends are
//! told to stop after the same message: `UNSUB <sid> <limit>` with `limit`
//! past what the server can have sent, then fence messages on the
//! subscription's own subject make up the difference. Requests keep being answered until the `limit`-th message,
//! after which the server routes nothing here; fences beyond it reach no one.
//!
//! The slack follows the subscription's traffic: what arrives during one
//! round trip to the server and at least 5 ms (several commits' bursts of
//! requests), times two, plus 2, at most 4 096. An idle
//! shard's subscription then costs 2 fence messages instead of 4 096, which
//! is what lets a node own tens of thousands of shards and still stop in a
//! few seconds (each fence message costs about 8 µs end to end: 8 per idle
//! subscription made a stop with 65 536 subscriptions take 5–6 s, 2 make it
//! about 3 s). The fences follow the UNSUB on the same connection, so the
//! server reads them after it without a round trip in between.
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

use crate::nats::subjects::FENCE_PAYLOAD;
use crate::transport::subscription::{Listener, Work};

/// Bounds of how many messages past those already read the server may
/// still send after the fence's UNSUB; each one not used by requests costs
/// one fence message.
const MIN_SLACK: u64 = 2;
/// How long a fence watches a subscription's traffic before it sets the
/// slack: long enough to see a few commits' bursts of requests.
const MEASURE_FOR: Duration = Duration::from_millis(5);
const MAX_SLACK: u64 = 4096;
/// How long a fence waits before giving up and unsubscribing outright.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handles the messages already in the client's buffer.
async fn take_buffered(served: &mut Listener, work: &mut Work) {
    while let Some(Some(message)) = served.sub.next().now_or_never() {
        served.handle(message, work).await;
    }
}

/// Whether `message` is a fence (ours or a queue-group peer's).
pub fn is_fence(message: &Message) -> bool {
    message.reply.is_none() && message.payload.as_ref() == FENCE_PAYLOAD
}

/// Fences `served` and answers every request routed to it before the fence.
pub async fn fence(served: &mut Listener, fence_subject: &Subject, work: &mut Work) {
    let client = served.ctx.client.clone();
    // Empty the client's buffer first, so the slack covers only what is in
    // transit; then measure what arrives in a round trip, and for at least
    // MEASURE_FOR (requests come in bursts, as commits answer them),
    // answering all the while.
    take_buffered(served, work).await;
    let before = served.received;
    let measured = tokio::time::Instant::now() + MEASURE_FOR;
    let _ = client.flush().await;
    loop {
        tokio::select! {
            biased;
            () = work.settled(), if work.has_waiting() => work.answer_settled(&served.ctx).await,
            message = served.sub.next() => match message {
                Some(message) => served.handle(message, work).await,
                None => break,
            },
            _ = tokio::time::sleep_until(measured) => break,
        }
    }
    take_buffered(served, work).await;
    let recent = served.received - before;
    let slack = (recent * 2 + MIN_SLACK).min(MAX_SLACK);
    let limit = served.received + slack;
    // The server reads the UNSUB before the fences that follow it on the
    // same connection: no round trip in between.
    let fenced = served.sub.unsubscribe_after(limit).await.is_ok();
    if fenced {
        publish_fences(&client, fence_subject, limit - served.received).await;
    } else {
        tracing::warn!(message = "Fence could not be set; unsubscribing outright.", subject = %fence_subject);
        let _ = served.sub.unsubscribe().await;
    }
    let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
    let mut refill = refill_every();
    let mut seen = served.received;
    loop {
        tokio::select! {
            biased;
            () = work.settled(), if work.has_waiting() => work.answer_settled(&served.ctx).await,
            message = served.sub.next() => match message {
                Some(message) => served.handle(message, work).await,
                None => return,
            },
            // Top up when nothing arrived for a while: requests and
            // queue-group peers may have taken some. (Fences still on their
            // way are not sent again while messages keep arriving.)
            _ = refill.tick(), if fenced => {
                if served.received == seen {
                    publish_fences(&client, fence_subject, limit.saturating_sub(served.received)).await;
                    let _ = client.flush().await;
                }
                seen = served.received;
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

/// Publishes `n` fences on `subject` (without waiting for the server).
async fn publish_fences(client: &Client, subject: &Subject, n: u64) {
    for _ in 0..n {
        if client
            .publish(subject.clone(), Bytes::from_static(FENCE_PAYLOAD))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// The interval at which fences are topped up, first after one period.
fn refill_every() -> tokio::time::Interval {
    let period = Duration::from_millis(100);
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
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
        let fenced = self.sub.unsubscribe_after(limit).await.is_ok();
        if fenced {
            publish_fences(client, subject, limit - self.received).await;
        } else {
            let _ = self.sub.unsubscribe().await;
        }
        let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
        let mut refill = refill_every();
        let mut seen = self.received;
        loop {
            tokio::select! {
                message = self.next() => match message {
                    Some(message) if is_fence(&message) => {}
                    Some(message) => handler.answer(message).await,
                    None => return,
                },
                _ = refill.tick(), if fenced => {
                    if self.received == seen {
                        publish_fences(client, subject, limit.saturating_sub(self.received)).await;
                        let _ = client.flush().await;
                    }
                    seen = self.received;
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
