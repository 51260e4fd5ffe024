//! Per-shard order on the way out: a shard's accepted events reach the
//! stages and the output in the order the shard decided them, whichever
//! request finishes first.
//!
//! Deciding a new event (or a batch's new lines of one shard) takes a
//! [`Ticket`] in the shard's lane. Once its commit succeeds, the request
//! hands the ticket its delivery (the stages, then the output): run at
//! once, in the request's own task, when every earlier ticket of the lane
//! is done, which is the common case; else parked, and run by the task
//! that delivers the ticket before it. Either way the request goes on
//! (and answers) once its own delivery has run: a lane slower than its
//! producers holds them back, and no request waits for the deliveries
//! behind it (those go on in a task of their own). A ticket dropped unused
//! (a failed commit, a cancelled request) is skipped, so a lane never
//! waits for a request that will not come.

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
    /// has run (or been skipped), and returns when it has: now, in this
    /// task, if they have; otherwise it is parked, and run by the task
    /// delivering before it.
    pub async fn deliver(mut self, delivery: impl Future<Output = ()> + Send + 'static) {
        self.used = true;
        match self.park(delivery) {
            // An error: the runtime stopping dropped the delivery.
            Ok(ran) => drop(ran.await),
            Err(delivery) => {
                let running = Running(Some(self.lane.clone()));
                delivery.await;
                drop(running); // what is parked behind goes on in a task of its own
            }
        }
    }

    /// Parks `delivery` behind the lane's head (what tells when it has
    /// run), or gives it back, the lane now running, if it is the head.
    fn park<F: Future<Output = ()> + Send + 'static>(
        &self,
        delivery: F,
    ) -> Result<tokio::sync::oneshot::Receiver<()>, F> {
        let mut lane = lock(&self.lane);
        if !lane.running && lane.head == self.n {
            lane.running = true;
            return Err(delivery);
        }
        let (done, ran) = tokio::sync::oneshot::channel();
        let parked = async move {
            delivery.await;
            let _ = done.send(());
        };
        lane.parked.insert(self.n, Some(Box::pin(parked)));
        Ok(ran)
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
        hand_off(self.lane.clone());
    }
}

/// The lane this task is delivering the head of. Dropped, once the
/// delivery has run or its task was cancelled, it moves the head past it
/// and leaves what is parked behind to a task of its own.
struct Running(Option<Arc<Mutex<Lane>>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(lane) = self.0.take() {
            hand_off(lane);
        }
    }
}

/// Moves the head of `lane` past the ticket just delivered (or skipped);
/// runs what is parked behind it in a new task, if anything is.
fn hand_off(lane: Arc<Mutex<Lane>>) {
    let Some(next) = advance(&mut lock(&lane)) else {
        return;
    };
    match tokio::runtime::Handle::try_current() {
        // A task dropped before it runs (the runtime stopping) hands
        // nothing off again.
        Ok(runtime) => drop(runtime.spawn(carry_on(lane, next))),
        // No runtime (its end): nothing more will be delivered.
        Err(_) => lock(&lane).running = false,
    }
}

/// Moves the head past the ticket just delivered or skipped: the delivery
/// parked at the new head (the lane stays running), or none (it idles).
fn advance(l: &mut Lane) -> Option<BoxFuture<'static, ()>> {
    loop {
        l.head += 1;
        match l.parked.remove(&l.head) {
            Some(None) => continue,
            Some(Some(delivery)) => return Some(delivery),
            None => {
                l.running = false;
                return None;
            }
        }
    }
}

/// Runs `delivery`, the head of `lane`, and what is parked behind it,
/// until the lane is idle.
async fn carry_on(lane: Arc<Mutex<Lane>>, mut delivery: BoxFuture<'static, ()>) {
    loop {
        // Should this task be cancelled here, the rest goes on in another.
        let mut running = Running(Some(lane.clone()));
        delivery.await;
        running.0 = None;
        match advance(&mut lock(&lane)) {
            Some(next) => delivery = next,
            None => return,
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
        self.ticket(shard).deliver(async {}).await;
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
        let parked = tokio::spawn(second.deliver(async move {
            let _ = tx.send(());
        }));
        tokio::task::yield_now().await;
        assert!(!parked.is_finished(), "a parked delivery's request waits for it");
        stuck.abort();
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .expect("the parked delivery ran")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), lanes.drained(0))
            .await
            .expect("the lane goes on");
        parked.await.unwrap();
    }

    /// A lane that never idles (its producers faster than its deliveries)
    /// must not keep one request delivering everybody's events: each
    /// returns once its own delivery has run.
    #[tokio::test]
    async fn a_request_returns_after_its_own_delivery_whatever_is_parked_behind_it() {
        let lanes = Arc::new(Lanes::new(1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Each delivery has the next request parked behind it by the time
        // it ends (until the head's request went on, 10^7 at most).
        fn request(
            lanes: Arc<Lanes>,
            stop: Arc<std::sync::atomic::AtomicBool>,
            left: u32,
        ) -> BoxFuture<'static, ()> {
            let ticket = lanes.ticket(0);
            Box::pin(ticket.deliver(async move {
                if left == 0 || stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let next = lanes.lanes[0].clone();
                let n = lock(&next).next;
                tokio::spawn(request(lanes, stop, left - 1));
                while !lock(&next).parked.contains_key(&n) {
                    tokio::task::yield_now().await;
                }
            }))
        }
        let head = tokio::spawn(request(lanes.clone(), stop.clone(), 10_000_000));
        let went_on = tokio::time::timeout(Duration::from_secs(3), head).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        went_on
            .expect("the head's request went on after its own delivery")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), lanes.drained(0))
            .await
            .expect("the deliveries behind ran in a task of their own");
    }
}
