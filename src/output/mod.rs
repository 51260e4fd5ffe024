//! Where accepted events leave the sidecar: the pipeline's last stage, one
//! file per kind (`output` in the configuration).
//!
//! | module | `output` | when an event goes out |
//! |---|---|---|
//! | [`core_nats`] | `"core"` | after its id's commit, at most once |
//! | [`jetstream`] | `"jetstream"` | before its id's commit, acknowledged by the stream, which drops repeats |

pub mod core_nats;
pub mod jetstream;

use async_nats::Subject;

use crate::pipeline::{Accepted, Output};

pub use core_nats::{COUNT_HEADER, CoreNats, Request};
pub use jetstream::PublishBeforeCommit;

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

    async fn accepted(&self, request: &Self::Request, shard: u32, events: Accepted<'_>) {
        // Published before the commit otherwise: nothing left to do.
        if let (Sink::Core(core), Some(request)) = (self, request) {
            core.accepted(request, shard, events).await;
        }
    }
}
