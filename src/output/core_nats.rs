//! `output = "core"`: accepted events republished on core NATS after
//! their commit, at most once: to `output_subject`, or where the routing
//! rules in force send them.

use std::ops::Range;
use std::sync::Arc;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;

use crate::config::BatchOutput;
use crate::nats::Subjects;
use crate::observe::metrics::Metrics;
use crate::pipeline::{Accepted, Output};
use crate::route::{Routed, Router, RuleSet};

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
    /// The routing rules in force.
    router: Arc<Router>,
    /// The fields the batch path reads with each line's key, in order.
    captured: Vec<String>,
    republish: super::Republish,
}

impl CoreNats {
    pub fn new(
        client: Client,
        subjects: &Subjects,
        shards: u32,
        batch_output: BatchOutput,
        metrics: Arc<Metrics>,
        (router, captured): (Arc<Router>, Vec<String>),
    ) -> Self {
        let max_payload = client.server_info().max_payload;
        Self {
            client,
            output: (0..shards).map(|s| subjects.output(s)).collect(),
            batch_output,
            max_payload,
            metrics,
            router,
            captured,
            republish: super::Republish::default(),
        }
    }

    /// Events go out as `republish` says.
    pub fn with_republish(mut self, republish: super::Republish) -> Self {
        self.republish = republish;
        self
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

impl CoreNats {
    /// A batch's `lines` of `body` to `subject`: joined in messages with
    /// [`COUNT_HEADER`] under the server's `max_payload`, or one each with
    /// [`BatchOutput::PerEvent`].
    async fn publish_lines(&self, subject: &Subject, body: &Bytes, lines: &[Range<usize>]) {
        if self.batch_output == BatchOutput::PerEvent {
            for r in lines {
                self.publish(subject, None, self.republish.event(&body.slice(r.clone())))
                    .await;
            }
            return;
        }
        let limit = self.max_payload.saturating_sub(HEADER_ROOM);
        for (payload, count) in self.republish.join(body, lines, limit) {
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

    /// `events` routed by `rules`: each event to the subjects its rules
    /// give; a batch's events of one subject together, in line order.
    async fn routed(&self, Request { rules, subject }: &Request, shard: u32, events: Accepted<'_>) {
        let mut routed = Routed::default();
        let on = (shard, subject.as_str());
        match events {
            Accepted::One(event) => {
                rules.route(event, on, &self.router.key, &mut routed);
                let event = self.republish.event(event);
                for &t in &routed.targets {
                    self.publish(rules.subject(t, shard), None, event.clone()).await;
                }
            }
            Accepted::Lines { body, lines, seen } => {
                let mut by_target: Vec<Vec<Range<usize>>> = vec![Vec::new(); rules.targets()];
                // The fields the rules read, if the batch path read them
                // with the keys: not read again.
                let per_line = seen.len() / lines.len().max(1);
                let at = (per_line > 0)
                    .then(|| rules.positions_in(&self.captured[..per_line.min(self.captured.len())]))
                    .flatten();
                for (i, r) in lines.iter().enumerate() {
                    let event = &body[r.clone()];
                    match &at {
                        Some(at) => {
                            let line_seen = &seen[i * per_line..(i + 1) * per_line];
                            rules.route_read(event, on, &self.router.key, (at, line_seen), &mut routed)
                        }
                        None => rules.route(event, on, &self.router.key, &mut routed),
                    }
                    for &t in &routed.targets {
                        by_target[t].push(r.clone());
                    }
                }
                for (t, lines) in by_target.iter().enumerate() {
                    if !lines.is_empty() {
                        self.publish_lines(rules.subject(t, shard), body, lines).await;
                    }
                }
            }
        }
    }
}

/// What one request's events go out under.
#[derive(Clone)]
pub struct Request {
    /// The rules in force when its first events went out.
    rules: Arc<RuleSet>,
    /// The subject it came in on (the rules' `subject`); empty with
    /// plain rules, which do not read it.
    subject: Subject,
}

impl Output for CoreNats {
    type Request = Request;

    fn request(&self, subject: &Subject) -> Request {
        let rules = self.router.current();
        // Plain rules route without it (and a copy of a request's subject
        // allocates on its first clone).
        let subject = match rules.is_plain() {
            true => Subject::from_static(""),
            false => subject.clone(),
        };
        Request { rules, subject }
    }

    fn joins(&self, first: &Request, next: &Request) -> bool {
        Arc::ptr_eq(&first.rules, &next.rules) && first.subject == next.subject
    }

    async fn accepted(&self, request: &Request, shard: u32, events: Accepted<'_>) {
        if !request.rules.is_plain() {
            return self.routed(request, shard, events).await;
        }
        let subject = &self.output[shard as usize];
        match events {
            Accepted::Lines { body, lines, .. } => self.publish_lines(subject, body, lines).await,
            Accepted::One(event) => self.publish(subject, None, self.republish.event(event)).await,
        }
    }
}
