//! Where accepted events leave the sidecar: the pipeline's last stage, one
//! file per kind (`output` in the configuration).
//!
//! | module | `output` | when an event goes out |
//! |---|---|---|
//! | [`core_nats`] | `"core"` | after its id's commit, at most once |
//! | [`jetstream`] | `"jetstream"` | before its id's commit, acknowledged by the stream, which drops repeats |

pub mod core_nats;
pub mod jetstream;

use crate::pipeline::{Accepted, Output};

pub use core_nats::{COUNT_HEADER, CoreNats};
pub use jetstream::PublishBeforeCommit;

/// The configured output, as the pipeline's [`Output`].
pub enum Sink {
    /// Published after the commit.
    Core(CoreNats),
    /// Published before the commit, by the pipeline's
    /// [`PublishFirst`](crate::pipeline::PublishFirst) ([`PublishBeforeCommit`]):
    /// nothing is left to do after it.
    BeforeCommit,
}

impl Output for Sink {
    async fn accepted(&self, shard: u32, events: Accepted<'_>) {
        match self {
            Sink::Core(core) => core.accepted(shard, events).await,
            Sink::BeforeCommit => {}
        }
    }
}
