//! The aggregates' snapshot file (durability `local`): saved every
//! [`SNAPSHOT_EVERY`] and at stop, read back at start.

use std::sync::Arc;
use std::time::Duration;

use crate::stages::Stages;

/// How often the aggregates are saved (and so, at most, how much of their
/// updates a crash loses).
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);

/// The aggregates' snapshot file.
#[derive(Clone)]
pub struct Snapshot {
    pub stages: Arc<Stages>,
    pub path: std::path::PathBuf,
}

impl Snapshot {
    /// Saves off the runtime; a failure is logged (the aggregates go on).
    pub async fn save(&self) {
        let this = self.clone();
        let saved = tokio::task::spawn_blocking(move || this.stages.save(&this.path)).await;
        if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
            tracing::warn!(message = "Cannot save the aggregates.", path = %self.path.display(), error = %e);
        }
    }

    pub async fn every(self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.save().await;
        }
    }
}
