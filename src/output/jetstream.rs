//! `output = "jetstream"`: each new event goes into a JetStream stream with
//! `Nats-Msg-Id` = its `event_id`, and is acknowledged there before its id
//! is committed (the pipeline's [`PublishFirst`]).
//!
//! Why this order: a crash after the acknowledgement and before the commit
//! leaves the id unremembered; the producer's retry is then accepted and
//! published again, and the stream drops the copy because it has seen the
//! `Nats-Msg-Id` within its `duplicate_window` (two minutes by default:
//! the retry must come within it). The other order, commit then publish,
//! can remember an id whose event never reached the stream. Core NATS
//! output (`output = "core"`) is published after the commit and at most
//! once.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::nats::{NatsError, Subjects};
use crate::pipeline::PublishFirst;

/// How long a publish waits for the stream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The stream every new event is published to, before its commit.
pub struct PublishBeforeCommit {
    js: jetstream::Context,
    /// The output subject of each shard.
    output: Box<[Subject]>,
}

impl PublishBeforeCommit {
    /// Uses the stream `name`, creating it over the output subjects when it
    /// does not exist.
    ///
    /// # Errors
    ///
    /// [`NatsError::Connect`] if JetStream does not answer or refuses the
    /// stream.
    pub async fn open(
        client: Client,
        name: &str,
        subjects: &Subjects,
        shards: u32,
    ) -> Result<Self, NatsError> {
        let mut js = jetstream::new(client);
        js.set_timeout(ACK_TIMEOUT);
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.all_outputs()],
            ..Default::default()
        };
        js.get_or_create_stream(config)
            .await
            .map_err(|e| NatsError::Connect(format!("output stream {name}: {e}")))?;
        Ok(Self {
            js,
            output: (0..shards).map(|s| subjects.output(s)).collect(),
        })
    }
}

impl PublishFirst for PublishBeforeCommit {
    fn publish(&self, shard: u32, id: &str, event: Bytes) -> BoxFuture<'static, Result<(), String>> {
        let js = self.js.clone();
        let subject = self.output[shard as usize].clone();
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        Box::pin(async move {
            let ack = js
                .publish_with_headers(subject, headers, event)
                .await
                .map_err(|e| e.to_string())?;
            // A repeat the stream dropped is acknowledged too (`duplicate`).
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        })
    }
}
