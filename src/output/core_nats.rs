//! `output = "core"`: accepted events republished on core NATS after
//! their commit, at most once.

use std::sync::Arc;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;

use crate::config::BatchOutput;
use crate::engine::batch;
use crate::nats::Subjects;
use crate::observe::metrics::Metrics;
use crate::pipeline::{Accepted, Output};

/// The header of a batch's per-shard output message: how many events
/// (lines) it holds.
pub const COUNT_HEADER: &str = "Eventsieve-Count";

/// Room left for the headers of a per-shard message under the server's
/// `max_payload`.
const HEADER_ROOM: usize = 64;

/// Republishes accepted events on their shard's output subject: a
/// single-event request's event as its own message; a batch's new events
/// of one shard as one message (its lines joined by `\n`, with
/// [`COUNT_HEADER`]), or one message each with [`BatchOutput::PerEvent`].
/// Core NATS: at most once.
pub struct CoreNats {
    client: Client,
    /// The output subject of each shard.
    output: Box<[Subject]>,
    batch_output: BatchOutput,
    /// The largest message the server takes, as it said when connecting.
    max_payload: usize,
    metrics: Arc<Metrics>,
}

impl CoreNats {
    pub fn new(
        client: Client,
        subjects: &Subjects,
        shards: u32,
        batch_output: BatchOutput,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_payload = client.server_info().max_payload;
        Self {
            client,
            output: (0..shards).map(|s| subjects.output(s)).collect(),
            batch_output,
            max_payload,
            metrics,
        }
    }

    async fn publish(&self, subject: &Subject, headers: Option<HeaderMap>, payload: Bytes) {
        let subject = subject.clone();
        let sent = match headers {
            Some(headers) => self.client.publish_with_headers(subject, headers, payload).await,
            None => self.client.publish(subject, payload).await,
        };
        if sent.is_err() {
            Metrics::inc(&self.metrics.publish_errors);
        }
    }
}

impl Output for CoreNats {
    async fn accepted(&self, shard: u32, events: Accepted<'_>) {
        let subject = &self.output[shard as usize];
        match (events, self.batch_output) {
            (Accepted::Lines { body, lines, .. }, BatchOutput::PerShard) => {
                let limit = self.max_payload.saturating_sub(HEADER_ROOM);
                for (payload, count) in batch::join(body, lines, limit) {
                    // A line too long for a header beside it goes bare: a
                    // message without the header is one event.
                    let headers = (payload.len() <= limit).then(|| {
                        const NAME: HeaderName = HeaderName::from_static(COUNT_HEADER);
                        let mut headers = HeaderMap::new();
                        headers.insert(NAME, HeaderValue::from(count));
                        headers
                    });
                    self.publish(subject, headers, payload.into()).await;
                }
            }
            (events, _) => {
                for event in events.events() {
                    self.publish(subject, None, event).await;
                }
            }
        }
    }
}
