//! Per-shard order on the way out: a shard's accepted events reach the
//! stages and the output in the order the shard decided them, whichever
//! request finishes first.
//!
//! Deciding a new event (or a batch's new lines of one shard) takes a
//! [`Ticket`] in the shard's lane. Once its commit succeeds, the request
//! hands the ticket its delivery (the stages, then the output): run at
//! once, in the request's own task, when every earlier ticket of the lane
//! is done, which is the common case; else parked, and run by the task
//! that delivers the ticket before it. A ticket dropped unused (a failed
//! commit, a cancelled request) is skipped, so a lane never waits for a
//! request that will not come.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::future::BoxFuture;

/// The lanes of every shard.
pub struct Lanes {
    lanes: Box<[Arc<Mutex<Lane>>]>,
}

#[derive(Default)]
struct Lane {
    /// The next ticket's number.
    next: u64,
    /// The ticket whose delivery is due.
    head: u64,
    /// Whether a task is delivering (the head, then what is parked).
    running: bool,
    /// Deliveries of tickets after the head, and tickets dropped unused
    /// (`None`).
    parked: BTreeMap<u64, Option<BoxFuture<'static, ()>>>,
}

fn lock(lane: &Mutex<Lane>) -> MutexGuard<'_, Lane> {
    lane.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A place in a shard's lane, taken when its events were decided.
pub struct Ticket {
    lane: Arc<Mutex<Lane>>,
    n: u64,
    used: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.n)
    }
}

impl Ticket {
    /// Runs `delivery` once every delivery of earlier tickets of the lane
    /// has run (or been skipped): now, in this task, if they have;
    /// otherwise it is parked and this returns at once.
    pub async fn deliver(mut self, delivery: impl Future<Output = ()> + Send + 'static) {
        self.used = true;
        {
            let mut lane = lock(&self.lane);
            if lane.running || lane.head != self.n {
                lane.parked.insert(self.n, Some(Box::pin(delivery)));
                return;
            }
            lane.running = true;
        }
        let running = Running(Some(self.lane.clone()));
        delivery.await;
        running.carry_on().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.used {
            return;
        }
        let mut lane = lock(&self.lane);
        if lane.running || lane.head != self.n {
            lane.parked.insert(self.n, None);
            return;
        }
        // The head, skipped: what waits behind it runs in a task.
        lane.running = true;
        drop(lane);
        Running(Some(self.lane.clone())).hand_off();
    }
}

/// The lane this task is delivering for: moves the head past its ticket
/// and runs what is parked behind it. Dropped before that (its task
/// cancelled), it leaves the rest to a new task.
struct Running(Option<Arc<Mutex<Lane>>>);

impl Running {
    async fn carry_on(mut self) {
        let lane = self.0.take().expect("running");
        carry_on(lane).await;
    }

    fn hand_off(mut self) {
        let Some(lane) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            // A task dropped before it runs (the runtime stopping) hands
            // nothing off again.
            Ok(runtime) => drop(runtime.spawn(carry_on(lane))),
            // No runtime (its end): nothing more will be delivered.
            Err(_) => lock(&lane).running = false,
        }
    }
}

/// Moves the head of `lane` past the ticket just delivered (or skipped)
/// and runs what is parked behind it, until the lane is idle.
async fn carry_on(lane: Arc<Mutex<Lane>>) {
    loop {
        let next = {
            let mut l = lock(&lane);
            l.head += 1;
            loop {
                let head = l.head;
                match l.parked.remove(&head) {
                    Some(None) => l.head += 1,
                    Some(Some(delivery)) => break Some(delivery),
                    None => {
                        l.running = false;
                        break None;
                    }
                }
            }
        };
        let Some(delivery) = next else { return };
        // Should this task be cancelled here, the rest goes on in another.
        let mut guard = Running(Some(lane.clone()));
        delivery.await;
        guard.0 = None;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.is_some() {
            Running(self.0.take()).hand_off();
        }
    }
}

impl Lanes {
    pub fn new(shards: u32) -> Self {
        Self {
            lanes: (0..shards).map(|_| Arc::default()).collect(),
        }
    }

    /// The next place in `shard`'s lane.
    pub fn ticket(&self, shard: u32) -> Ticket {
        let lane = &self.lanes[shard as usize];
        let mut l = lock(lane);
        let n = l.next;
        l.next += 1;
        Ticket {
            lane: lane.clone(),
            n,
            used: false,
        }
    }

    /// Waits until every delivery of `shard` decided before this call has
    /// run: before a shard is handed over, and at stop.
    pub async fn drained(&self, shard: u32) {
        let (done, reached) = tokio::sync::oneshot::channel();
        self.ticket(shard)
            .deliver(async move {
                let _ = done.send(());
            })
            .await;
        let _ = reached.await;
    }

    /// [`Self::drained`] for every shard.
    pub async fn all_drained(&self) {
        for shard in 0..self.lanes.len() as u32 {
            self.drained(shard).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn deliveries_run_in_ticket_order_and_dropped_tickets_are_skipped() {
        let lanes = Lanes::new(2);
        let log = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..6).map(|_| lanes.ticket(1)).collect();
        let other = lanes.ticket(0);
        // Handed over last to first; the third and the first are dropped
        // unused (the first while it is the head).
        for (i, ticket) in tickets.into_iter().enumerate().rev() {
            if i == 2 || i == 0 {
                drop(ticket);
                continue;
            }
            let log = log.clone();
            tokio::spawn(ticket.deliver(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                log.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        // Another shard's lane does not wait for this one.
        let l = log.clone();
        other.deliver(async move { l.lock().unwrap().push(100) }).await;
        assert_eq!(*log.lock().unwrap(), [100], "shard 0 delivered at once");
        lanes.drained(1).await;
        assert_eq!(*log.lock().unwrap(), [100, 1, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_delivery_cancelled_midway_leaves_the_rest_to_another_task() {
        let lanes = Lanes::new(1);
        let first = lanes.ticket(0);
        let second = lanes.ticket(0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stuck = tokio::spawn(first.deliver(std::future::pending()));
        tokio::task::yield_now().await;
        second
            .deliver(async move {
                let _ = tx.send(());
            })
            .await;
        stuck.abort();
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .expect("the parked delivery ran")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), lanes.drained(0))
            .await
            .expect("the lane goes on");
    }
}
