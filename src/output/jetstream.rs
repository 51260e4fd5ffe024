//! `output = "jetstream"`: each new event goes into a JetStream stream with
//! `Nats-Msg-Id` = its `event_id`, and is acknowledged there before its id
//! is committed (the pipeline's [`PublishFirst`]). With routing rules,
//! each copy goes to its subject's stream (which must exist: a set with a
//! subject no stream takes is refused), and the id is committed once every
//! copy is acknowledged.
//!
//! Why this order: a crash after the acknowledgement and before the commit
//! leaves the id unremembered; the producer's retry is then accepted and
//! published again, and the stream drops the copy because it has seen the
//! `Nats-Msg-Id` within its `duplicate_window` (two minutes by default:
//! the retry must come within it). The other order, commit then publish,
//! can remember an id whose event never reached the stream. Core NATS
//! output (`output = "core"`) is published after the commit and at most
//! once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::nats::{NatsError, Subjects};
use crate::pipeline::PublishFirst;
use crate::route::{Routed, Router, RuleSet};

/// How long a publish waits for the stream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The stream every new event is published to, before its commit.
pub struct PublishBeforeCommit {
    js: jetstream::Context,
    /// The output subject of each shard.
    output: Box<[Subject]>,
    /// The routing rules in force: each routed copy goes to its subject's
    /// stream.
    router: Arc<Router>,
    republish: super::Republish,
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
        router: Arc<Router>,
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
            router,
            republish: super::Republish::default(),
        })
    }

    /// Events go out as `republish` says.
    pub fn with_republish(mut self, republish: super::Republish) -> Self {
        self.republish = republish;
        self
    }
}

impl PublishFirst for PublishBeforeCommit {
    fn publish<'a>(
        &'a self,
        came_in_on: &'a Subject,
        events: Vec<(u32, String, Bytes)>,
    ) -> BoxFuture<'a, Vec<BoxFuture<'static, Result<(), String>>>> {
        Box::pin(async move {
            // One version of the rules for the whole request.
            let rules = self.router.current();
            let mut routed = Routed::default();
            let mut acks = Vec::with_capacity(events.len());
            for (shard, id, event) in events {
                let output = &self.output[shard as usize];
                let copies: Vec<(Subject, String)> = if rules.is_plain() {
                    vec![(output.clone(), id)]
                } else {
                    rules.route(
                        &event,
                        (shard, came_in_on.as_str()),
                        &self.router.key,
                        &mut routed,
                    );
                    routed
                        .targets
                        .iter()
                        .map(|&t| {
                            let subject = rules.subject(t, shard).clone();
                            let msg_id = copy_id(&id, &subject, output);
                            (subject, msg_id)
                        })
                        .collect()
                };
                // Sent here, one after the other: the stream keeps them in
                // this order. Acknowledged later.
                let mut pending = Vec::with_capacity(copies.len());
                let event = self.republish.event(&event);
                for (subject, msg_id) in copies {
                    let mut headers = HeaderMap::new();
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
                    pending.push(
                        self.js
                            .publish_with_headers(subject, headers, event.clone())
                            .await
                            .map_err(|e| e.to_string()),
                    );
                }
                acks.push(Box::pin(async move {
                    for sent in pending {
                        // A repeat the stream dropped is acknowledged too (`duplicate`).
                        sent?.await.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }) as BoxFuture<'static, Result<(), String>>);
            }
            acks
        })
    }
}

/// The `Nats-Msg-Id` of a copy of the event `id` on `subject`: the id
/// itself on the shard's output subject (as without rules), else the id
/// and the subject, so that two copies in one stream are not taken for
/// repeats of each other, while a retry's copies are.
fn copy_id(id: &str, subject: &Subject, output: &Subject) -> String {
    if subject == output {
        id.to_owned()
    } else {
        format!("{id}:{subject}")
    }
}

/// A subject the rule set `rules` sends to that no stream takes, if any:
/// with `output = "jetstream"` every copy must be acknowledged by a stream
/// (a `{shard}` subject is checked for every shard).
///
/// # Errors
///
/// If JetStream cannot be asked.
pub async fn unbound_subject(js: &jetstream::Context, rules: &RuleSet) -> Option<String> {
    let shards = rules.shard_count();
    for t in 0..rules.targets() {
        let template = rules.template(t);
        let shards = if template.contains("{shard}") {
            0..shards
        } else {
            0..1
        };
        for shard in shards {
            let subject = rules.subject(t, shard).to_string();
            if js.stream_by_subject(subject.clone()).await.is_err() {
                return Some(format!(
                    "{subject} is in no JetStream stream: with output = \"jetstream\" every destination must be (create a stream over it)"
                ));
            }
        }
    }
    None
}
