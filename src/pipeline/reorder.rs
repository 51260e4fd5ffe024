//! The reorder buffer (`[ordering]`): accepted events of a session are
//! released in the order of their `by` field, once `hold` has passed since
//! they arrived, or at once when they are next (with a sequence number).
//! An event later than that (its `by` below what its session already
//! released) goes at once and is counted as out of order. The buffer is
//! bounded in bytes: a full one releases its oldest. It runs in the
//! shard's lane ([`super::lanes`]), so releases keep the lane's order, and
//! is flushed before a handover and at stop; a crash loses what it held
//! (accepted, not yet published).
//!
//! Each event is held with a `T` (the request it came with), and the
//! fields the batch path read with its key, so that the stages after the
//! buffer do not read them again; the buffer reads its session and `by`
//! from them too, when they are among them.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

/// Sessions by name (foldhash: looked up for every event).
type Sessions<T> = HashMap<Arc<str>, Session<T>, foldhash::fast::RandomState>;

use bytes::Bytes;

use crate::config::OrderingSettings;
use crate::engine::event::Seen;
use crate::engine::input::Format;
use crate::observe::metrics::Render;

/// Bytes counted per held event besides its own: its entry in the
/// session's queue and the arrival queue, the request it came with, its
/// fields, the allocator's share. `examples/scripts/ordering-latency.sh`
/// measured 550–600 B of RSS per held 230-byte event (665 B when a
/// session held its events in a `BTreeMap`): this counts a little more.
pub const OVERHEAD_BYTES: usize = 432;

/// The counters of the buffer, for the metrics.
#[derive(Debug, Default)]
pub struct ReorderCounters {
    /// Events released after their session had released a later one.
    pub out_of_order: AtomicU64,
    /// Events released before their hold because the buffer was full.
    pub forced: AtomicU64,
    /// Events held now.
    pub held: AtomicU64,
    /// Bytes held now (events and [`OVERHEAD_BYTES`] each).
    pub held_bytes: AtomicUsize,
}

/// The buffer of every shard.
pub struct Reorder<T> {
    settings: OrderingSettings,
    shards: Box<[Mutex<Shard<T>>]>,
    pub counters: Arc<ReorderCounters>,
    format: Format,
    /// Where the session and `by` are among the fields read with the key.
    read_with_key: Option<[usize; 2]>,
}

/// What [`Reorder::take`] lets go of: one of the events it was given,
/// going at once as it came (by its place among them), or one it held.
#[derive(Debug)]
pub enum Taken<T> {
    Now(usize),
    Released(Released<T>),
}

impl<T> From<Released<T>> for Taken<T> {
    fn from(released: Released<T>) -> Self {
        Taken::Released(released)
    }
}

/// An event the buffer lets go of.
#[derive(Debug, Clone)]
pub struct Released<T> {
    pub event: Bytes,
    /// The fields read with its key (empty if they were not).
    pub seen: Box<[Seen]>,
    pub with: T,
}

impl Render for ReorderCounters {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        for (name, kind, help, value) in [
            (
                "eventsieve_out_of_order_total",
                "counter",
                "Events of a session released after a later one of it (later than `hold`).",
                self.out_of_order.load(Relaxed),
            ),
            (
                "eventsieve_reorder_forced_total",
                "counter",
                "Events released before their hold because the reorder buffer was full.",
                self.forced.load(Relaxed),
            ),
            (
                "eventsieve_reorder_held_events",
                "gauge",
                "Events the reorder buffer holds now.",
                self.held.load(Relaxed),
            ),
            (
                "eventsieve_reorder_held_bytes",
                "gauge",
                "Bytes the reorder buffer holds now (events and their bookkeeping).",
                self.held_bytes.load(Relaxed) as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
    }
}

struct Shard<T> {
    sessions: Sessions<T>,
    /// Held events by arrival: when each may go, at the latest.
    arrivals: VecDeque<Arrival>,
    /// Numbers the arrivals (ties of `by` keep arrival order).
    next: u64,
    /// When sessions that hold nothing were last dropped.
    swept_ms: u64,
}

struct Session<T> {
    /// Its name, shared with its arrivals.
    name: Arc<str>,
    /// The highest `by` released.
    last: Option<i64>,
    /// By `(by, arrival)`: mostly pushed at the back, taken from the
    /// front (a session holds a few events at a time).
    held: VecDeque<((i64, u64), Released<T>)>,
    /// When it last took an event.
    seen_ms: u64,
}

struct Arrival {
    due_ms: u64,
    session: Arc<str>,
    key: (i64, u64),
}

impl<T: Clone> Reorder<T> {
    pub fn new(settings: OrderingSettings, shards: u32) -> Self {
        Self::with_format(settings, shards, Format::Json, &[])
    }

    /// A buffer over events read as `format`, of which the batch path
    /// reads the fields `read_with_key`.
    pub fn with_format(
        settings: OrderingSettings,
        shards: u32,
        format: Format,
        read_with_key: &[String],
    ) -> Self {
        let at = |name: &str| read_with_key.iter().position(|n| n == name);
        Self {
            read_with_key: at(&settings.session).zip(at(&settings.by)).map(|(s, b)| [s, b]),
            settings,
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        sessions: Sessions::default(),
                        arrivals: VecDeque::new(),
                        next: 0,
                        swept_ms: 0,
                    })
                })
                .collect(),
            counters: Arc::default(),
            format,
        }
    }

    /// Takes accepted `events` of `shard` (in decision order), each with
    /// the fields read with its key, at `now_ms`; returns what goes now,
    /// in order: those of them that go at once by their place (an event
    /// without a session or a numeric `by`, a late one, the next `seq`),
    /// and what they let go of that was held.
    pub fn take<'a>(
        &self,
        shard: u32,
        events: impl Iterator<Item = (Bytes, &'a [Seen])>,
        with: &T,
        now_ms: u64,
    ) -> Vec<Taken<T>> {
        let mut out = Vec::new();
        let mut shard_state = self.lock(shard);
        let fields = [self.settings.session.as_str(), self.settings.by.as_str()];
        let mut seen = [Seen::Missing; 2];
        for (i, (event, read)) in events.enumerate() {
            let held = |event| Released {
                event,
                seen: read.into(),
                with: with.clone(),
            };
            let found = match self.read_with_key {
                Some([s, b]) if read.len() > s.max(b) => {
                    seen = [read[s], read[b]];
                    true
                }
                _ => self.format.capture(&event, &fields, &mut seen),
            };
            if !found {
                out.push(Taken::Now(i));
                continue;
            }
            let session = match seen[0] {
                Seen::Text { start, end } => std::str::from_utf8(&event[start as usize..end as usize])
                    .ok()
                    .map(Cow::Borrowed),
                Seen::Escaped => self.format.text(&event, &self.settings.session),
                Seen::Symbol(name) => Some(Cow::Borrowed(name)),
                _ => None,
            };
            let by = match seen[1] {
                Seen::Number(n) => Some(match self.settings.ms_per_unit {
                    Some(ms) => (n * ms) as i64,
                    None => n as i64,
                }),
                _ => None,
            };
            let (Some(session), Some(by)) = (session, by) else {
                out.push(Taken::Now(i));
                continue;
            };
            self.take_one(
                &mut shard_state,
                (&session, by),
                (i, || held(event.clone())),
                now_ms,
                &mut out,
            );
        }
        while self.counters.held_bytes.load(Relaxed) > self.settings.max_bytes {
            if !self.release_oldest(&mut shard_state, &mut out, None) {
                break;
            }
            self.counters.forced.fetch_add(1, Relaxed);
        }
        out
    }

    fn take_one(
        &self,
        s: &mut Shard<T>,
        (name, by): (&str, i64),
        (i, event): (usize, impl FnOnce() -> Released<T>),
        now_ms: u64,
        out: &mut Vec<Taken<T>>,
    ) {
        let sequence = self.settings.ms_per_unit.is_none();
        if !s.sessions.contains_key(name) {
            let name: Arc<str> = Arc::from(name);
            let session = Session {
                name: name.clone(),
                last: None,
                held: VecDeque::new(),
                seen_ms: now_ms,
            };
            s.sessions.insert(name, session);
        }
        let session = s.sessions.get_mut(name).expect("a session");
        session.seen_ms = now_ms;
        let late = session
            .last
            .is_some_and(|last| if sequence { by <= last } else { by < last });
        if late {
            self.counters.out_of_order.fetch_add(1, Relaxed);
            out.push(Taken::Now(i));
            return;
        }
        let next = match session.last {
            Some(last) => last + 1,
            None => self.settings.first_seq,
        };
        if sequence && by == next && session.held.front().is_none_or(|((first, _), _)| *first >= by) {
            out.push(Taken::Now(i));
            session.last = Some(by);
            self.release_next(session, out);
            free_if_empty(session);
            return;
        }
        // Held on its own: a slice of a larger buffer (the connection's
        // read buffer, a batch) would keep all of it.
        let mut held = event();
        held.event = Bytes::copy_from_slice(&held.event);
        let key = (by, s.next);
        s.next += 1;
        self.counters.held.fetch_add(1, Relaxed);
        self.counters
            .held_bytes
            .fetch_add(held.event.len() + OVERHEAD_BYTES, Relaxed);
        match session.held.back() {
            Some((last, _)) if *last > key => {
                let at = session.held.partition_point(|(k, _)| *k < key);
                session.held.insert(at, (key, held));
            }
            _ => session.held.push_back((key, held)),
        }
        s.arrivals.push_back(Arrival {
            due_ms: now_ms + self.settings.hold_ms,
            session: session.name.clone(),
            key,
        });
    }

    /// Releases what follows `session.last` without a gap (sequence
    /// numbers only).
    fn release_next<O: From<Released<T>>>(&self, session: &mut Session<T>, out: &mut Vec<O>) {
        if self.settings.ms_per_unit.is_some() {
            return;
        }
        while let Some(((by, _), _)) = session.held.front() {
            let by = *by;
            if session.last.is_some_and(|last| by > last + 1) {
                break;
            }
            let (_, released) = session.held.pop_front().expect("a front");
            self.unheld(released.event.len());
            session.last = Some(session.last.map_or(by, |last| last.max(by)));
            out.push(released.into());
        }
    }

    /// Releases the session's held events up to `key` (in `by` order),
    /// then what follows without a gap.
    fn release_upto<O: From<Released<T>>>(
        &self,
        session: &mut Session<T>,
        key: (i64, u64),
        out: &mut Vec<O>,
    ) {
        while let Some((first, _)) = session.held.front() {
            if *first > key {
                break;
            }
            let by = first.0;
            let (_, released) = session.held.pop_front().expect("a front");
            self.unheld(released.event.len());
            session.last = Some(session.last.map_or(by, |last| last.max(by)));
            out.push(released.into());
        }
        self.release_next(session, out);
        free_if_empty(session);
    }

    fn unheld(&self, len: usize) {
        self.counters.held.fetch_sub(1, Relaxed);
        self.counters.held_bytes.fetch_sub(len + OVERHEAD_BYTES, Relaxed);
    }

    /// Releases the oldest arrival still held (and what comes before it in
    /// its session), if it is due by `due` (`None`: whenever). Whether one
    /// was.
    fn release_oldest<O: From<Released<T>>>(
        &self,
        s: &mut Shard<T>,
        out: &mut Vec<O>,
        due: Option<u64>,
    ) -> bool {
        while let Some(front) = s.arrivals.front() {
            if due.is_some_and(|now| front.due_ms > now) {
                return false;
            }
            let Arrival { session, key, .. } = s.arrivals.pop_front().expect("a front");
            let Some(state) = s.sessions.get_mut(&session) else {
                continue;
            };
            if state.held.binary_search_by(|(k, _)| k.cmp(&key)).is_err() {
                continue; // released already
            }
            self.release_upto(state, key, out);
            return true;
        }
        false
    }

    /// What of `shard` is due at `now_ms`, in order.
    pub fn due(&self, shard: u32, now_ms: u64) -> Vec<Released<T>> {
        let mut out = Vec::new();
        let mut s = self.lock(shard);
        while self.release_oldest(&mut s, &mut out, Some(now_ms)) {}
        // Sessions holding nothing are forgotten after a while (their
        // next event starts them again).
        let idle_ms = (self.settings.hold_ms * 10).max(60_000);
        if now_ms.saturating_sub(s.swept_ms) > idle_ms / 4 {
            s.swept_ms = now_ms;
            s.sessions.retain(|_, session| {
                !session.held.is_empty() || now_ms.saturating_sub(session.seen_ms) < idle_ms
            });
        }
        out
    }

    /// Everything `shard` holds, in order per session: before a handover
    /// and at stop.
    pub fn flush(&self, shard: u32) -> Vec<Released<T>> {
        let mut out = Vec::new();
        let mut s = self.lock(shard);
        while self.release_oldest(&mut s, &mut out, None) {}
        s.sessions.clear();
        out
    }

    /// The shards holding events now.
    pub fn holding(&self) -> Vec<u32> {
        (0..self.shards.len() as u32)
            .filter(|&shard| self.holds(shard))
            .collect()
    }

    /// Whether `shard` holds events now.
    pub fn holds(&self, shard: u32) -> bool {
        !self.lock(shard).arrivals.is_empty()
    }

    /// How often [`Self::due`] should run: a tenth of `hold`, 1 ms to 100 ms.
    pub fn tick_ms(&self) -> u64 {
        (self.settings.hold_ms / 10).clamp(1, 100)
    }

    fn lock(&self, shard: u32) -> std::sync::MutexGuard<'_, Shard<T>> {
        self.shards[shard as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A session that holds nothing keeps no room for events (it may stay
/// idle until the sweep forgets it).
fn free_if_empty<T>(session: &mut Session<T>) {
    if session.held.is_empty() && session.held.capacity() > 0 {
        session.held = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(time_unit: Option<f64>) -> OrderingSettings {
        OrderingSettings {
            session: "s".into(),
            by: "n".into(),
            ms_per_unit: time_unit,
            hold_ms: 100,
            first_seq: 0,
            max_bytes: 1 << 20,
        }
    }

    fn ev(session: &str, n: i64) -> Bytes {
        Bytes::from(format!(
            r#"{{"event_id":"e{session}{n}","s":"{session}","n":{n}}}"#
        ))
    }

    /// What [`Reorder::take`] lets go of on taking `events` (without
    /// fields read with their keys), each as released.
    fn take<const N: usize>(r: &Reorder<()>, events: [Bytes; N], now_ms: u64) -> Vec<Released<()>> {
        let read: &[Seen] = &[];
        let taken = r.take(0, events.iter().map(|e| (e.clone(), read)), &(), now_ms);
        as_released(&events, taken)
    }

    fn as_released(events: &[Bytes], taken: Vec<Taken<()>>) -> Vec<Released<()>> {
        taken
            .into_iter()
            .map(|t| match t {
                Taken::Now(i) => Released {
                    event: events[i].clone(),
                    seen: Box::default(),
                    with: (),
                },
                Taken::Released(r) => r,
            })
            .collect()
    }

    fn ns(out: &[Released<()>]) -> Vec<i64> {
        out.iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.event).unwrap()["n"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn sequence_numbers_go_at_once_when_next_and_wait_for_a_gap_until_the_hold() {
        let r = Reorder::new(settings(None), 1);
        assert_eq!(ns(&take(&r, [ev("a", 0), ev("a", 2), ev("a", 3)], 0)), [0]);
        assert_eq!(r.counters.held.load(Relaxed), 2);
        // Another session is not held up by this one's gap.
        assert_eq!(ns(&take(&r, [ev("b", 0), ev("b", 1)], 10)), [0, 1]);
        assert_eq!(ns(&take(&r, [ev("a", 1)], 20)), [1, 2, 3], "the gap filled");
        assert_eq!(r.counters.held.load(Relaxed), 0);
        // A gap that stays open: released at the hold.
        assert!(take(&r, [ev("a", 6), ev("a", 5)], 30).is_empty());
        assert!(r.due(0, 129).is_empty());
        assert_eq!(ns(&r.due(0, 130)), [5, 6]);
        // Later than what the session released: at once, counted.
        assert_eq!(ns(&take(&r, [ev("a", 4)], 140)), [4]);
        assert_eq!(r.counters.out_of_order.load(Relaxed), 1);
        assert_eq!(r.counters.held_bytes.load(Relaxed), 0);
    }

    #[test]
    fn timestamps_wait_the_hold_and_go_in_their_order() {
        let r = Reorder::new(settings(Some(1000.0)), 1);
        assert!(take(&r, [ev("a", 3), ev("a", 1), ev("a", 2)], 0).is_empty());
        assert_eq!(ns(&r.due(0, 100)), [1, 2, 3]);
        assert_eq!(ns(&take(&r, [ev("a", 2)], 110)), [2], "late: at once");
        assert_eq!(r.counters.out_of_order.load(Relaxed), 1);
    }

    #[test]
    fn a_full_buffer_releases_its_oldest_and_a_flush_everything() {
        let mut s = settings(Some(1.0));
        s.max_bytes = 3 * (ev("a", 1).len() + OVERHEAD_BYTES);
        let r = Reorder::new(s, 1);
        let out = take(&r, std::array::from_fn::<_, 5, _>(|n| ev("a", n as i64 + 1)), 0);
        assert_eq!(ns(&out), [1, 2], "the two oldest");
        assert_eq!(r.counters.forced.load(Relaxed), 2);
        // The oldest of a session goes with what is before it.
        assert_eq!(ns(&take(&r, [ev("b", 9), ev("b", 8)], 1)), [3, 4]);
        assert_eq!(ns(&r.flush(0)), [5, 8, 9]);
        assert!(r.holding().is_empty());
    }

    #[test]
    fn events_without_a_session_or_a_number_go_at_once() {
        let r = Reorder::new(settings(None), 1);
        let other = Bytes::from_static(br#"{"event_id":"x","n":"one"}"#);
        let out = take(&r, [other.clone(), Bytes::from_static(br#"{"event_id":"y"}"#)], 0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].event, other);
    }

    /// The fields the batch path read with the key: the session and `by`
    /// are taken from them, and they go out with the event.
    #[test]
    fn fields_read_with_the_key_are_used_and_kept() {
        let names = ["x".to_string(), "n".to_string(), "s".to_string()];
        let r = Reorder::with_format(settings(None), 1, Format::Json, &names);
        let events: Vec<(Bytes, Vec<Seen>)> = [ev("a", 1), ev("a", 0), ev("b", 0)]
            .into_iter()
            .map(|e| {
                let mut seen = vec![Seen::Missing; 3];
                assert!(Format::Json.capture(&e, &["x", "n", "s"], &mut seen));
                (e, seen)
            })
            .collect();
        let taken = r.take(0, events.iter().map(|(e, s)| (e.clone(), &s[..])), &(), 0);
        // a's 0 and b's 0 go at once, as they came; a's 1, held for its 0,
        // is released with its fields.
        assert!(matches!(
            &taken[..],
            [Taken::Now(1), Taken::Released(held), Taken::Now(2)]
                if held.event == events[0].0 && held.seen[..] == events[0].1[..]
        ));
        // Read with the key, they are believed: a `by` read as 0 is late.
        let e = ev("a", 2);
        let mut read = vec![Seen::Missing; 3];
        assert!(Format::Json.capture(&e, &["x", "n", "s"], &mut read));
        read[1] = Seen::Number(0.0);
        assert!(matches!(
            &r.take(0, [(e, &read[..])].into_iter(), &(), 1)[..],
            [Taken::Now(0)]
        ));
        assert_eq!(r.counters.out_of_order.load(Relaxed), 1);
    }
}
