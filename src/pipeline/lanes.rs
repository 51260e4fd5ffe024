//! Per-shard order on the way out: a shard's accepted events reach the
//! stages and the output in the order the shard decided them, whichever
//! task finishes first.
//!
//! Deciding a new event (or a batch's new lines of one shard) takes a
//! [`Ticket`] in the shard's lane; once its commit succeeds the request
//! hands the ticket its delivery (the stages, then the output), and the
//! lane's task runs the deliveries in ticket order. A ticket dropped
//! unused (a failed commit, a cancelled request) is skipped, so a lane
//! never waits for a request that will not come.

use std::sync::OnceLock;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

/// One delivery, or the promise of one, in its lane's order.
type Slot = oneshot::Receiver<BoxFuture<'static, ()>>;

/// The lanes of every shard; a lane's task starts with its first ticket.
pub struct Lanes {
    lanes: Box<[OnceLock<mpsc::UnboundedSender<Slot>>]>,
}

/// A place in a shard's lane, taken when its events were decided.
pub struct Ticket(oneshot::Sender<BoxFuture<'static, ()>>);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket")
    }
}

impl Ticket {
    /// Runs `delivery` once every delivery of earlier tickets of the lane
    /// has run (or been skipped).
    pub fn deliver(self, delivery: impl Future<Output = ()> + Send + 'static) {
        // A lane whose task is gone (the runtime is stopping) delivers nothing.
        let _ = self.0.send(Box::pin(delivery));
    }
}

impl Lanes {
    pub fn new(shards: u32) -> Self {
        Self {
            lanes: (0..shards).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The next place in `shard`'s lane. Must be called from within the
    /// runtime (the lane's task starts here).
    pub fn ticket(&self, shard: u32) -> Ticket {
        let lane = self.lanes[shard as usize].get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(rx));
            tx
        });
        let (tx, rx) = oneshot::channel();
        let _ = lane.send(rx);
        Ticket(tx)
    }

    /// Waits until every delivery of `shard` decided before this call has
    /// run: before a shard is handed over, and at stop.
    pub async fn drained(&self, shard: u32) {
        if self.lanes[shard as usize].get().is_none() {
            return;
        }
        let (done, reached) = oneshot::channel();
        self.ticket(shard).deliver(async move {
            let _ = done.send(());
        });
        let _ = reached.await;
    }

    /// [`Self::drained`] for every shard.
    pub async fn all_drained(&self) {
        for shard in 0..self.lanes.len() as u32 {
            self.drained(shard).await;
        }
    }
}

/// A lane's task: each delivery in turn, skipping tickets dropped unused.
async fn run(mut slots: mpsc::UnboundedReceiver<Slot>) {
    while let Some(slot) = slots.recv().await {
        if let Ok(delivery) = slot.await {
            delivery.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[tokio::test]
    async fn deliveries_run_in_ticket_order_and_dropped_tickets_are_skipped() {
        let lanes = Lanes::new(2);
        let log = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..5).map(|_| lanes.ticket(1)).collect();
        let other = lanes.ticket(0);
        // Handed over last to first; the third is dropped unused.
        for (i, ticket) in tickets.into_iter().enumerate().rev() {
            if i == 2 {
                drop(ticket);
                continue;
            }
            let log = log.clone();
            ticket.deliver(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                log.lock().unwrap().push(i);
            });
        }
        // Another shard's lane does not wait for this one.
        let l = log.clone();
        other.deliver(async move { l.lock().unwrap().push(100) });
        lanes.drained(1).await;
        lanes.drained(0).await;
        let got = log.lock().unwrap().clone();
        let lane1: Vec<usize> = got.iter().copied().filter(|&i| i < 100).collect();
        assert_eq!(lane1, [0, 1, 3, 4]);
        assert!(got.contains(&100));
    }
}
