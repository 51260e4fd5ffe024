//! Which shards this node serves, and whether each is ready: one atomic
//! state per shard, read on every request and changed at run time (at
//! start-up with `owned_shards`; by the lease keeper as shards move
//! between nodes in `replicated` mode).

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use crate::engine::batch::Route;

/// What this node does with a shard's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ShardState {
    /// Another node owns it: forward.
    Elsewhere = 0,
    /// Owned here, its table still being rebuilt: answer 503.
    Recovering = 1,
    /// Owned here and answering.
    Ready = 2,
}

impl ShardState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Recovering,
            2 => Self::Ready,
            _ => Self::Elsewhere,
        }
    }
}

/// The state of every shard.
#[derive(Debug)]
pub struct Ownership {
    states: Box<[AtomicU8]>,
}

impl Ownership {
    /// `shards` shards, all owned elsewhere.
    pub fn new(shards: u32) -> Self {
        Self {
            states: (0..shards)
                .map(|_| AtomicU8::new(ShardState::Elsewhere as u8))
                .collect(),
        }
    }

    pub fn shards(&self) -> u32 {
        self.states.len() as u32
    }

    /// # Panics
    ///
    /// If `shard` is not below the shard count.
    pub fn state(&self, shard: u32) -> ShardState {
        ShardState::from_u8(self.states[shard as usize].load(Relaxed))
    }

    /// # Panics
    ///
    /// If `shard` is not below the shard count.
    pub fn set(&self, shard: u32, state: ShardState) {
        self.states[shard as usize].store(state as u8, Relaxed);
    }

    /// The shards owned here, ready or not, in order.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.shards())
            .filter(|&s| self.state(s) != ShardState::Elsewhere)
            .collect()
    }

    /// Where a batch line of `shard` goes; a batch that was itself
    /// forwarded is never forwarded again, so nodes that disagree on
    /// ownership cannot loop.
    pub fn route(&self, shard: u32, forwarded: bool) -> Route {
        match (self.state(shard), forwarded) {
            (ShardState::Ready, _) => Route::Here,
            (ShardState::Recovering, _) => Route::NotReady,
            (ShardState::Elsewhere, false) => Route::Forward,
            (ShardState::Elsewhere, true) => Route::Refuse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_change_at_run_time_and_route_batches() {
        let o = Ownership::new(4);
        assert!(o.owned().is_empty());
        o.set(1, ShardState::Recovering);
        o.set(3, ShardState::Ready);
        assert_eq!(o.owned(), [1, 3]);
        assert_eq!(o.route(1, false), Route::NotReady);
        assert_eq!(o.route(3, true), Route::Here);
        assert_eq!(o.route(0, false), Route::Forward);
        assert_eq!(o.route(0, true), Route::Refuse);
        o.set(3, ShardState::Elsewhere);
        assert_eq!(o.owned(), [1]);
    }
}
