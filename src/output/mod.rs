//! Where accepted events leave the sidecar: the pipeline's last stage, one
//! file per kind (`output` in the configuration).
//!
//! | module | `output` | when an event goes out |
//! |---|---|---|
//! | [`core_nats`] | `"core"` | after its id's commit, at most once |
//! | [`jetstream`] | `"jetstream"` | before its id's commit, acknowledged by the stream, which drops repeats |

pub mod core_nats;
pub mod jetstream;

use std::ops::Range;

use async_nats::Subject;
use bytes::Bytes;

use crate::engine::input::Format;
use crate::pipeline::{Accepted, Output};

pub use core_nats::{COUNT_HEADER, CoreNats, Request};
pub use jetstream::PublishBeforeCommit;

/// What accepted events go out as: the bytes as received, or (protobuf
/// input with `output_format = "json"`) the canonical JSON mapping.
#[derive(Debug, Clone, Default)]
pub struct Republish {
    /// The input's format.
    pub input: Format,
    /// Protobuf events go out as JSON.
    pub json: bool,
}

impl Republish {
    /// One event as it goes out.
    pub fn event(&self, event: &Bytes) -> Bytes {
        match self.json.then(|| self.input.schema()).flatten() {
            // An accepted event decodes: it was checked.
            Some(schema) => schema
                .to_canonical_json(event)
                .map_or_else(|_| event.clone(), Bytes::from),
            None => event.clone(),
        }
    }

    /// `ranges` of a batch `body` as batch bodies of at most `limit`
    /// bytes, each with its count: framed as the input's batches, or as
    /// JSON lines.
    pub fn join(&self, body: &[u8], ranges: &[Range<usize>], limit: usize) -> Vec<(Vec<u8>, usize)> {
        let Some(schema) = self.json.then(|| self.input.schema()).flatten() else {
            return self.input.join(body, ranges, limit);
        };
        let mut lines = Vec::with_capacity(body.len() * 2);
        let mut at = Vec::with_capacity(ranges.len());
        for r in ranges {
            let json = schema.to_canonical_json(&body[r.clone()]).unwrap_or_default();
            at.push(lines.len()..lines.len() + json.len());
            lines.extend_from_slice(&json);
        }
        Format::Json.join(&lines, &at, limit)
    }
}

/// The configured output, as the pipeline's [`Output`].
pub enum Sink {
    /// Published after the commit.
    Core(Box<CoreNats>),
    /// Published before the commit, by the pipeline's
    /// [`PublishFirst`](crate::pipeline::PublishFirst) ([`PublishBeforeCommit`]):
    /// nothing is left to do after it.
    BeforeCommit,
}

impl Output for Sink {
    type Request = Option<Request>;

    fn request(&self, subject: &Subject) -> Self::Request {
        match self {
            Sink::Core(core) => Some(core.request(subject)),
            Sink::BeforeCommit => None,
        }
    }

    fn joins(&self, first: &Self::Request, next: &Self::Request) -> bool {
        match (self, first, next) {
            (Sink::Core(core), Some(first), Some(next)) => core.joins(first, next),
            (_, first, next) => first.is_none() && next.is_none(),
        }
    }

    async fn accepted(&self, request: &Self::Request, shard: u32, events: Accepted<'_>) {
        // Published before the commit otherwise: nothing left to do.
        if let (Sink::Core(core), Some(request)) = (self, request) {
            core.accepted(request, shard, events).await;
        }
    }
}
