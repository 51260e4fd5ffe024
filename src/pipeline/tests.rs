//! The pipeline without a server: real tables, the real writer, journals in
//! RAM (or one that fails, or one that panics).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::*;
use crate::engine::EngineConfig;
use crate::engine::shard::shard_of;
use crate::journal::writer::{self, WriterConfig};
use crate::journal::{JournalErrorKind, MemoryJournal};

/// Remembers what the output was given.
#[derive(Default)]
struct Collect(Mutex<Vec<(u32, Vec<Bytes>)>>);

impl Output for Collect {
    type Request = ();

    fn request(&self, _: &Subject) {}

    fn joins(&self, _: &(), _: &()) -> bool {
        true
    }

    async fn accepted(&self, _: &(), shard: u32, events: Accepted<'_>) {
        self.0.lock().unwrap().push((shard, events.events().collect()));
    }
}

/// The subject the tests' requests come in on.
fn on() -> Subject {
    Subject::from_static("dedup.ingest")
}

/// What the output was given, once every lane has delivered.
async fn delivered(p: &Pipeline<Collect>) -> Vec<(u32, Vec<Bytes>)> {
    p.all_drained().await;
    p.output().taken()
}

impl Collect {
    fn taken(&self) -> Vec<(u32, Vec<Bytes>)> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// How a test journal behaves on append.
#[derive(Clone, Copy)]
enum Behaviour {
    Keep,
    Refuse,
    Panic,
}

/// A [`MemoryJournal`] that can be told to refuse or panic, and that the
/// test can still read after the writer took it.
struct TestJournal {
    records: Arc<Mutex<MemoryJournal>>,
    behaviour: Behaviour,
}

impl Journal for TestJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        match self.behaviour {
            Behaviour::Keep => self.records.lock().unwrap().append(records),
            Behaviour::Refuse => Err(JournalError::new(JournalErrorKind::Io, "no space left")),
            Behaviour::Panic => panic!("journal bug"),
        }
    }
    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError> {
        match self.behaviour {
            Behaviour::Keep => self.records.lock().unwrap().forget(records),
            Behaviour::Refuse => Err(JournalError::new(JournalErrorKind::Io, "no space left")),
            Behaviour::Panic => panic!("journal bug"),
        }
    }
    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        self.records.lock().unwrap().scan(shards, since_ms, f)
    }
    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError> {
        self.records.lock().unwrap().expire(before_ms)
    }
    fn expired_before(&self) -> u64 {
        self.records.lock().unwrap().expired_before()
    }
    fn sync(&mut self) -> Result<(), JournalError> {
        Ok(())
    }
    fn location(&self) -> String {
        "test".into()
    }
}

fn writer_config() -> WriterConfig {
    WriterConfig {
        commit_interval: Duration::from_millis(1),
        expire_every: Duration::from_secs(3600),
        window_ms: Arc::new(AtomicU64::new(60_000)),
    }
}

struct Fixture {
    pipeline: Arc<Pipeline<Collect>>,
    writer: Option<(Writer, tokio::task::JoinHandle<Result<(), writer::WriterError>>)>,
}

fn engine() -> Deduplicator {
    Deduplicator::new(EngineConfig {
        window_ms: 60_000,
        segments_per_shard: 4,
        ..EngineConfig::default()
    })
}

/// A pipeline owning every shard (ready), with a writer on `journal`.
fn fixture(journal: Option<Box<dyn Journal>>) -> Fixture {
    let metrics = Arc::new(Metrics::default());
    let dedup = engine();
    let ownership = Ownership::new(dedup.shard_count());
    for s in 0..dedup.shard_count() {
        ownership.set(s, ShardState::Ready);
    }
    let writer = journal.map(|journal| {
        let (writer, inbox) = writer::channel(64, metrics.clone());
        let config = writer_config();
        let task = writer::spawn(inbox, journal, config, metrics.clone());
        (writer, task)
    });
    let pipeline = Pipeline::new(
        dedup,
        ownership,
        writer.as_ref().map(|(w, _)| w.clone()),
        Collect::default(),
        metrics,
    );
    Fixture {
        pipeline: Arc::new(pipeline),
        writer,
    }
}

fn journal(behaviour: Behaviour) -> Option<Box<dyn Journal>> {
    Some(Box::new(TestJournal {
        records: Arc::default(),
        behaviour,
    }))
}

fn event(id: &str) -> Bytes {
    Bytes::from(format!(r#"{{"event_id":"{id}","v":1}}"#))
}

async fn verdict(p: &Pipeline<Collect>, event: &Bytes) -> Outcome {
    p.ingest(event, &on()).await.expect("owned here")
}

fn is(outcome: &Outcome, want: Verdict) -> bool {
    matches!(outcome, Outcome::Verdict(v) if *v == want)
}

#[tokio::test]
async fn new_then_duplicate_and_only_new_events_reach_the_output() {
    let f = fixture(journal(Behaviour::Keep));
    let p = &f.pipeline;
    let a = event("a1");
    assert!(is(&verdict(p, &a).await, Verdict::New));
    assert!(is(&verdict(p, &event("a1")).await, Verdict::Duplicate));
    assert_eq!(delivered(p).await, [(shard_of("a1", 32), vec![a])]);
}

#[tokio::test]
async fn bad_input_is_answered_400_and_changes_nothing() {
    let f = fixture(journal(Behaviour::Keep));
    let p = &f.pipeline;
    for bad in ["", "{", r#"{"event_id":"a-1"}"#, r#"{"event_id":7}"#] {
        let outcome = verdict(p, &Bytes::from(bad)).await;
        assert_eq!(outcome.error().map(|e| e.0), Some(400), "{bad}: {outcome:?}");
    }
    assert!(p.dedup().is_empty());
    assert!(delivered(p).await.is_empty());
}

#[tokio::test]
async fn shards_not_ready_answer_503_and_shards_elsewhere_are_handed_back() {
    let f = fixture(None);
    let p = &f.pipeline;
    let shard = shard_of("a1", 32);
    p.ownership().set(shard, ShardState::Recovering);
    let outcome = verdict(p, &event("a1")).await;
    assert_eq!(outcome.error().map(|e| e.0), Some(503), "{outcome:?}");
    p.ownership().set(shard, ShardState::Elsewhere);
    let e = event("a1");
    let keyed = p.ingest(&e, &on()).await.expect_err("owned elsewhere");
    assert_eq!((keyed.shard, &*keyed.id), (shard, "a1"));
    assert!(p.dedup().is_empty(), "neither was remembered");
}

#[tokio::test]
async fn accepted_ids_are_in_the_journal_and_a_new_pipeline_recovers_them() {
    let memory = Arc::new(Mutex::new(MemoryJournal::new()));
    let shared = || TestJournal {
        records: memory.clone(),
        behaviour: Behaviour::Keep,
    };
    let f = fixture(Some(Box::new(shared())));
    for i in 0..100 {
        assert!(is(
            &verdict(&f.pipeline, &event(&format!("r{i}"))).await,
            Verdict::New
        ));
    }
    let body = Bytes::from_static(b"{\"event_id\":\"b1\"}\n{\"event_id\":\"r1\"}\n");
    let pending = f.pipeline.decide_batch(&body, false, &on()).await;
    assert_eq!(
        f.pipeline.finish_batch(pending, &body, &on()).await,
        [Some(Entry::New), Some(Entry::Duplicate)]
    );
    assert_eq!(
        memory.lock().unwrap().len(),
        101,
        "every true verdict is in the journal"
    );

    let fresh = fixture(None);
    let restored = fresh
        .pipeline
        .recover(&shared(), &(0..32).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(restored, 101);
    assert!(is(
        &verdict(&fresh.pipeline, &event("r7")).await,
        Verdict::Duplicate
    ));
    assert!(is(
        &verdict(&fresh.pipeline, &event("b1")).await,
        Verdict::Duplicate
    ));
    assert!(is(&verdict(&fresh.pipeline, &event("n1")).await, Verdict::New));
}

#[tokio::test]
async fn recovery_marks_shards_ready_only_when_done() {
    let f = fixture(None);
    let p = &f.pipeline;
    for s in 0..32 {
        p.ownership().set(s, ShardState::Recovering);
    }
    let mut journal = MemoryJournal::new();
    let keyed = p.dedup().key(b"{\"event_id\":\"old1\"}").unwrap();
    journal
        .append(&[Record {
            shard: keyed.shard,
            born_ms: unix_ms(),
            fingerprint: keyed.fingerprint,
        }])
        .unwrap();
    p.recover(&journal, &[keyed.shard]).unwrap();
    assert_eq!(p.ownership().state(keyed.shard), ShardState::Ready);
    assert!(is(&verdict(p, &event("old1")).await, Verdict::Duplicate));
}

#[tokio::test]
async fn a_failed_commit_is_answered_500_and_the_id_is_forgotten() {
    let f = fixture(journal(Behaviour::Refuse));
    let p = &f.pipeline;
    let outcome = verdict(p, &event("f1")).await;
    assert_eq!(outcome.error().map(|e| e.0), Some(500), "{outcome:?}");
    assert_eq!(p.dedup().live(unix_ms()), 0, "un-inserted");
    assert!(delivered(p).await.is_empty(), "nothing republished");

    let body = Bytes::from_static(b"{\"event_id\":\"f1\"}\n{\"event_id\":\"f2\"}\nbad\n");
    let pending = p.decide_batch(&body, false, &on()).await;
    let entries = p.finish_batch(pending, &body, &on()).await;
    assert!(matches!(entries[0], Some(Entry::Error { code: 500, .. })));
    assert!(matches!(entries[1], Some(Entry::Error { code: 500, .. })));
    assert!(matches!(entries[2], Some(Entry::Error { code: 400, .. })));
    assert_eq!(p.dedup().live(unix_ms()), 0);
}

/// Fault: a request whose id could not be queued for commit was never
/// answered. Now the submitter gets 503 and the id is forgotten.
#[tokio::test]
async fn a_stopped_writer_gets_503_for_singles_and_batches_never_silence() {
    let f = fixture(journal(Behaviour::Keep));
    let (writer, task) = f.writer.unwrap();
    writer.stop().await;
    task.await.unwrap().unwrap();
    let p = &f.pipeline;
    let outcome = verdict(p, &event("s1")).await;
    assert_eq!(outcome.error().map(|e| e.0), Some(503), "{outcome:?}");
    let body = Bytes::from_static(b"{\"event_id\":\"s2\"}\n");
    let pending = p.decide_batch(&body, false, &on()).await;
    let entries = p.finish_batch(pending, &body, &on()).await;
    assert!(
        matches!(entries[0], Some(Entry::Error { code: 503, .. })),
        "{entries:?}"
    );
    assert_eq!(p.dedup().live(unix_ms()), 0);
}

/// Fault: a panic in the commit task was swallowed. Now the waiting request
/// is answered and the writer's task ends with the panic as its error.
#[tokio::test]
async fn a_panicking_journal_answers_waiting_requests_and_surfaces_the_panic() {
    let f = fixture(journal(Behaviour::Panic));
    let outcome = tokio::time::timeout(Duration::from_secs(5), verdict(&f.pipeline, &event("p1")))
        .await
        .expect("answered, not left waiting");
    assert_eq!(outcome.error().map(|e| e.0), Some(503), "{outcome:?}");
    let (_, task) = f.writer.unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("journal bug"), "{err}");
}

#[tokio::test]
async fn a_batch_reaches_the_output_once_per_shard_in_line_order() {
    let f = fixture(journal(Behaviour::Keep));
    let p = &f.pipeline;
    let ids = ["abc", "X9", "abc", "0", "evt123", "X9b"];
    let body: Vec<u8> = ids
        .iter()
        .flat_map(|id| format!("{{\"event_id\":\"{id}\"}}\n").into_bytes())
        .collect();
    let body = Bytes::from(body);
    let pending = p.decide_batch(&body, false, &on()).await;
    let entries = p.finish_batch(pending, &body, &on()).await;
    let want = [
        Entry::New,
        Entry::New,
        Entry::Duplicate,
        Entry::New,
        Entry::New,
        Entry::New,
    ];
    assert_eq!(entries, want.map(Some));
    let mut seen: Vec<(u32, Vec<Bytes>)> = delivered(p).await;
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "one call per shard");
    let mut lines = Vec::new();
    for (shard, events) in seen.drain(..) {
        for e in events {
            let keyed = p.dedup().key(&e).unwrap();
            assert_eq!(keyed.shard, shard);
            lines.push(keyed.id.into_owned());
        }
    }
    lines.sort();
    let mut want: Vec<String> = ["abc", "X9", "0", "evt123", "X9b"].map(String::from).to_vec();
    want.sort();
    assert_eq!(lines, want, "each new line once, the repeat not at all");
}

#[tokio::test]
async fn a_forwarded_sub_batch_is_never_sent_on() {
    let f = fixture(None);
    let p = &f.pipeline;
    let shard = shard_of("abc", 32);
    p.ownership().set(shard, ShardState::Elsewhere);
    let body = Bytes::from_static(b"{\"event_id\":\"abc\"}\n");
    let mut pending = p.decide_batch(&body, false, &on()).await;
    assert_eq!(pending.take_forwards()[&shard].0, [0]);
    let mut pending = p.decide_batch(&body, true, &on()).await;
    assert!(pending.take_forwards().is_empty());
    let entries = p.finish_batch(pending, &body, &on()).await;
    assert!(matches!(entries[0], Some(Entry::Error { code: 503, .. })));
}

/// An output ahead of the journal: notes how many ids the journal held at
/// each publish, and refuses ids that start with `no`.
struct Stream {
    journal: Arc<Mutex<MemoryJournal>>,
    seen: Mutex<Vec<(String, usize)>>,
}

impl PublishFirst for Stream {
    fn publish<'a>(
        &'a self,
        _: &'a Subject,
        events: Vec<(u32, String, Bytes)>,
    ) -> BoxFuture<'a, Vec<BoxFuture<'static, Result<(), String>>>> {
        let acks = events
            .into_iter()
            .map(|(_, id, _)| {
                let held = self.journal.lock().unwrap().len();
                let refuse = id.starts_with("no");
                self.seen.lock().unwrap().push((id, held));
                Box::pin(async move { if refuse { Err("refused".into()) } else { Ok(()) } })
                    as BoxFuture<'static, Result<(), String>>
            })
            .collect();
        Box::pin(std::future::ready(acks))
    }
}

#[tokio::test]
async fn an_output_ahead_takes_each_new_event_before_its_commit_or_the_id_is_forgotten() {
    let records: Arc<Mutex<MemoryJournal>> = Arc::default();
    let metrics = Arc::new(Metrics::default());
    let (writer, inbox) = writer::channel(64, metrics.clone());
    let config = writer_config();
    let journal = TestJournal {
        records: records.clone(),
        behaviour: Behaviour::Keep,
    };
    let _task = writer::spawn(inbox, Box::new(journal), config, metrics.clone());
    let dedup = engine();
    let ownership = Ownership::new(dedup.shard_count());
    for s in 0..dedup.shard_count() {
        ownership.set(s, ShardState::Ready);
    }
    let stream = Arc::new(Stream {
        journal: records.clone(),
        seen: Mutex::default(),
    });
    let p = Pipeline::new(dedup, ownership, Some(writer), Collect::default(), metrics)
        .with_publish_first(stream.clone());

    assert!(is(&verdict(&p, &event("a1")).await, Verdict::New));
    assert_eq!(records.lock().unwrap().len(), 1);
    for _ in 0..2 {
        let outcome = verdict(&p, &event("no1")).await;
        assert_eq!(outcome.error().map(|(code, _)| code), Some(503), "{outcome:?}");
    }
    assert_eq!(records.lock().unwrap().len(), 1, "a refused id is not committed");

    let body = Bytes::from([event("b1"), event("b1"), event("no2")].join(&b'\n'));
    let pending = p.decide_batch(&body, false, &on()).await;
    let entries = p.finish_batch(pending, &body, &on()).await;
    assert_eq!(entries[0], Some(Entry::New));
    assert_eq!(entries[1], Some(Entry::Duplicate));
    assert!(
        matches!(&entries[2], Some(Entry::Error { code: 503, .. })),
        "{entries:?}"
    );
    assert_eq!(records.lock().unwrap().len(), 2);
    // Each published before its commit; a refused id is tried again; a
    // batch's lines go out together (in shard order), before its commit.
    let mut seen = stream.seen.lock().unwrap().clone();
    seen[3..].sort();
    let want = [("a1", 0), ("no1", 1), ("no1", 1), ("b1", 1), ("no2", 1)].map(|(id, n)| (id.to_string(), n));
    assert_eq!(seen, want);
}

/// How a [`Held`] journal ends one append.
enum Release {
    Keep,
    /// Refuses every shard of the append.
    Refuse,
    /// Refuses these shards and keeps the others.
    RefuseShards(Vec<u32>),
}

/// A journal whose every append waits until the test says how it ends: so
/// that twins can arrive while their first copy's commit is pending.
struct Held {
    records: Arc<Mutex<MemoryJournal>>,
    next: std::sync::mpsc::Receiver<Release>,
}

impl Journal for Held {
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        let release = self.next.recv().unwrap_or(Release::Refuse);
        let refused = match release {
            Release::Keep => Vec::new(),
            Release::Refuse => return Err(JournalError::new(JournalErrorKind::Full, "no space left")),
            Release::RefuseShards(shards) => shards,
        };
        let kept: Vec<Record> = records
            .iter()
            .filter(|r| !refused.contains(&r.shard))
            .copied()
            .collect();
        self.records.lock().unwrap().append(&kept)?;
        if refused.is_empty() {
            Ok(())
        } else {
            Err(JournalError::new(JournalErrorKind::Unavailable, "no quorum").only_shards(refused))
        }
    }
    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.records.lock().unwrap().forget(records)
    }
    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        self.records.lock().unwrap().scan(shards, since_ms, f)
    }
    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError> {
        self.records.lock().unwrap().expire(before_ms)
    }
    fn expired_before(&self) -> u64 {
        0
    }
    fn sync(&mut self) -> Result<(), JournalError> {
        Ok(())
    }
    fn location(&self) -> String {
        "held".into()
    }
}

/// A pipeline on a [`Held`] journal; the sender releases its appends.
fn held() -> (
    Fixture,
    std::sync::mpsc::Sender<Release>,
    Arc<Mutex<MemoryJournal>>,
) {
    let (release, next) = std::sync::mpsc::channel();
    let records: Arc<Mutex<MemoryJournal>> = Arc::default();
    let journal = Held {
        records: records.clone(),
        next,
    };
    (fixture(Some(Box::new(journal))), release, records)
}

/// Decides `event` and expects it to wait for a commit.
async fn decided(p: &Pipeline<Collect>, event: &Bytes) -> Pending {
    match p.decide(event, &on()).await {
        Step::Commit(pending) => pending,
        other => panic!("expected to wait for a commit, got {other:?}"),
    }
}

fn code(outcome: &Outcome) -> Option<u16> {
    outcome.error().map(|(code, _)| code)
}

/// Fault: a twin arriving while its first copy's commit was pending was
/// told `false` at once; the commit then failed and the id was forgotten,
/// so the twin's producer dropped an event nobody kept.
#[tokio::test]
async fn a_twin_of_a_pending_id_gets_its_first_copys_outcome() {
    for (release, want) in [(Release::Refuse, Some(500)), (Release::Keep, None)] {
        let (f, releases, records) = held();
        let p = &f.pipeline;
        let (first, twin) = (event("t1"), event("t1"));
        let pending_first = decided(p, &first).await;
        let pending_twin = decided(p, &twin).await;
        let mut later = pending_twin;
        assert!(!later.is_settled(), "the twin waits for the first copy's commit");
        releases.send(release).unwrap();
        let first_outcome = p.finish(pending_first, first.clone(), &on()).await;
        let twin_outcome = p.finish(later, twin, &on()).await;
        match want {
            Some(error) => {
                assert_eq!(code(&first_outcome), Some(error), "{first_outcome:?}");
                assert_eq!(
                    code(&twin_outcome),
                    Some(error),
                    "the same error: {twin_outcome:?}"
                );
                assert_eq!(records.lock().unwrap().len(), 0);
                assert_eq!(p.metrics.twin_errors.load(Relaxed), 1);
                // Nothing kept: the next copy is new.
                let retry = tokio::spawn({
                    let p = p.clone();
                    async move { verdict(&p, &event("t1")).await }
                });
                releases.send(Release::Keep).unwrap();
                assert!(is(&retry.await.unwrap(), Verdict::New));
            }
            None => {
                assert!(is(&first_outcome, Verdict::New), "{first_outcome:?}");
                assert!(is(&twin_outcome, Verdict::Duplicate), "{twin_outcome:?}");
                assert_eq!(records.lock().unwrap().len(), 1);
            }
        }
        // Once committed, a repeat is a duplicate at once.
        assert!(matches!(
            p.decide(&event("t1"), &on()).await,
            Step::Done(Outcome::Verdict(Verdict::Duplicate))
        ));
    }
}

/// Fault: a batch whose commit failed answered `!500` to the first copies
/// of its ids and `0` to their repeats in the same batch.
#[tokio::test]
async fn repeats_within_a_failed_batch_get_its_error_not_a_duplicate() {
    let (f, releases, _) = held();
    let p = &f.pipeline;
    let body = Bytes::from([event("r1"), event("r2"), event("r1"), event("r2")].join(&b'\n'));
    let pending = p.decide_batch(&body, false, &on()).await;
    releases.send(Release::Refuse).unwrap();
    let entries = p.finish_batch(pending, &body, &on()).await;
    for (i, entry) in entries.iter().enumerate() {
        assert!(
            matches!(entry, Some(Entry::Error { code: 500, .. })),
            "line {i}: {entries:?}"
        );
    }
    assert_eq!(p.dedup().live(unix_ms()), 0, "nothing remembered");

    // And when it succeeds, the repeats are duplicates.
    let pending = p.decide_batch(&body, false, &on()).await;
    releases.send(Release::Keep).unwrap();
    let entries = p.finish_batch(pending, &body, &on()).await;
    let want = [Entry::New, Entry::New, Entry::Duplicate, Entry::Duplicate].map(Some);
    assert_eq!(entries, want);
}

/// A batch line that repeats an id pending in another request, and a
/// single event that repeats a batch's pending line, wait for that commit.
#[tokio::test]
async fn twins_across_requests_wait_for_each_others_commits() {
    let (f, releases, _) = held();
    let p = &f.pipeline;
    let single = event("x1");
    let first = decided(p, &single).await;
    let body = Bytes::from([event("x1"), event("x2")].join(&b'\n'));
    let batch = p.decide_batch(&body, false, &on()).await;
    let twin_of_batch = decided(p, &event("x2")).await;
    // x1's shard fails, x2's is kept (whether the writer commits the two
    // requests together or apart).
    let failing = shard_of("x1", 32);
    assert_ne!(failing, shard_of("x2", 32));
    releases.send(Release::RefuseShards(vec![failing])).unwrap();
    releases.send(Release::RefuseShards(vec![failing])).unwrap();
    let outcome = p.finish(first, single, &on()).await;
    assert_eq!(code(&outcome), Some(503), "{outcome:?}");
    let entries = p.finish_batch(batch, &body, &on()).await;
    assert!(
        matches!(entries[0], Some(Entry::Error { code: 503, .. })),
        "the batch's twin of the failed single: {entries:?}"
    );
    assert_eq!(entries[1], Some(Entry::New));
    let outcome = p.finish(twin_of_batch, event("x2"), &on()).await;
    assert!(is(&outcome, Verdict::Duplicate), "{outcome:?}");
}

/// Fault: a group commit spanning shards failed as a whole when one
/// shard's journal append failed. Now each shard has its own outcome.
#[tokio::test]
async fn a_shard_whose_append_failed_does_not_fail_the_others() {
    let (f, releases, records) = held();
    let p = &f.pipeline;
    let (a, b) = ("s1", "s9");
    let (sa, sb) = (shard_of(a, 32), shard_of(b, 32));
    assert_ne!(sa, sb);
    let body = Bytes::from([event(a), event(b), event(a)].join(&b'\n'));
    let pending = p.decide_batch(&body, false, &on()).await;
    releases.send(Release::RefuseShards(vec![sb])).unwrap();
    let entries = p.finish_batch(pending, &body, &on()).await;
    assert_eq!(entries[0], Some(Entry::New));
    assert!(
        matches!(entries[1], Some(Entry::Error { code: 503, .. })),
        "{entries:?}"
    );
    assert_eq!(entries[2], Some(Entry::Duplicate));
    assert_eq!(records.lock().unwrap().len(), 1);
    assert_eq!(delivered(p).await, [(sa, vec![event(a)])]);
    // The failed shard's id is new again.
    let retry = tokio::spawn({
        let p = p.clone();
        async move { verdict(&p, &event(b)).await }
    });
    releases.send(Release::Keep).unwrap();
    assert!(is(&retry.await.unwrap(), Verdict::New));
}

/// Many producers, many twins, commits failing at random: no event is
/// told `false` unless an earlier copy was accepted and is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_failing_commits_no_false_goes_to_an_id_not_kept() {
    let records: Arc<Mutex<MemoryJournal>> = Arc::default();
    let flaky = Flaky {
        records: records.clone(),
        calls: 0,
    };
    let f = fixture(Some(Box::new(flaky)));
    let p = f.pipeline.clone();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..400u64 {
                // Eight producers share ids: many twins.
                let id = format!("k{}", (i * 7 + t) % 300);
                if i % 5 == 0 {
                    let body = Bytes::from([event(&id), event(&id)].join(&b'\n'));
                    let pending = p.decide_batch(&body, false, &on()).await;
                    for entry in p.finish_batch(pending, &body, &on()).await.into_iter().flatten() {
                        answers.push((id.clone(), entry));
                    }
                } else {
                    let outcome = verdict(&p, &event(&id)).await;
                    let entry = match outcome {
                        Outcome::Verdict(Verdict::New) => Entry::New,
                        Outcome::Verdict(Verdict::Duplicate) => Entry::Duplicate,
                        other => Entry::error(other.error().unwrap().0, ""),
                    };
                    answers.push((id, entry));
                }
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    let kept: std::collections::HashSet<Fingerprint> = {
        let mut kept = std::collections::HashSet::new();
        records
            .lock()
            .unwrap()
            .scan(&(0..32).collect::<Vec<_>>(), 0, &mut |r| {
                kept.insert(r.fingerprint);
            })
            .unwrap();
        kept
    };
    let new: std::collections::HashMap<&str, usize> =
        answers
            .iter()
            .filter(|(_, e)| *e == Entry::New)
            .fold(Default::default(), |mut m, (id, _)| {
                *m.entry(id.as_str()).or_default() += 1;
                m
            });
    let (mut falses, mut errors) = (0, 0);
    for (id, entry) in &answers {
        match entry {
            Entry::Duplicate => {
                falses += 1;
                assert!(new.contains_key(id.as_str()), "{id} told false, never accepted");
                assert!(
                    kept.contains(&Fingerprint::of(id.as_bytes())),
                    "{id} told false, not kept"
                );
            }
            Entry::Error { .. } => errors += 1,
            Entry::New => {}
        }
    }
    assert!(new.values().all(|n| *n == 1), "an id accepted twice");
    assert_eq!(kept.len(), new.len(), "every accepted id is kept, and only those");
    assert!(
        falses > 100 && errors > 10,
        "the run exercised both: {falses} false, {errors} errors"
    );
}

/// Fails every third append.
struct Flaky {
    records: Arc<Mutex<MemoryJournal>>,
    calls: u64,
}

impl Journal for Flaky {
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.calls += 1;
        std::thread::sleep(Duration::from_micros(300));
        if self.calls.is_multiple_of(3) {
            return Err(JournalError::new(JournalErrorKind::Full, "no space left"));
        }
        self.records.lock().unwrap().append(records)
    }
    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.records.lock().unwrap().forget(records)
    }
    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        self.records.lock().unwrap().scan(shards, since_ms, f)
    }
    fn expire(&mut self, _: u64) -> Result<usize, JournalError> {
        Ok(0)
    }
    fn expired_before(&self) -> u64 {
        0
    }
    fn sync(&mut self) -> Result<(), JournalError> {
        Ok(())
    }
    fn location(&self) -> String {
        "flaky".into()
    }
}

/// What stages were given, in order: the stage's name, the shard, the
/// events.
type Given = Arc<Mutex<Vec<(&'static str, u32, Vec<Bytes>)>>>;

/// A stage that logs, under its name, the events it was given.
struct Log {
    name: &'static str,
    log: Given,
}

impl Stage for Log {
    fn accepted(&self, shard: u32, events: &Accepted<'_>) {
        let events = events.events().collect();
        self.log.lock().unwrap().push((self.name, shard, events));
    }
}

#[tokio::test]
async fn stages_see_accepted_events_in_the_order_they_were_added_and_failed_ones_never() {
    let log: Given = Arc::default();
    let stage = |name| {
        Arc::new(Log {
            name,
            log: log.clone(),
        })
    };
    let chain = |journal| {
        let f = fixture(journal);
        let p = Arc::into_inner(f.pipeline).expect("not shared yet");
        (p.with_stage(stage("first")).with_stage(stage("second")), f.writer)
    };
    let (p, _writer) = chain(journal(Behaviour::Keep));
    assert!(is(&verdict(&p, &event("a1")).await, Verdict::New));
    assert!(is(&verdict(&p, &event("a1")).await, Verdict::Duplicate));
    let body = Bytes::from_static(b"{\"event_id\":\"b1\"}\n{\"event_id\":\"a1\"}\n");
    let pending = p.decide_batch(&body, false, &on()).await;
    p.finish_batch(pending, &body, &on()).await;
    let taken = delivered(&p).await;
    let seen = std::mem::take(&mut *log.lock().unwrap());
    let names: Vec<&str> = seen.iter().map(|(name, ..)| *name).collect();
    assert_eq!(names, ["first", "second", "first", "second"]);
    for (i, (shard, events)) in taken.iter().enumerate() {
        for (_, s, e) in &seen[2 * i..2 * i + 2] {
            assert_eq!((s, e), (shard, events), "each stage sees what the output gets");
        }
    }
    assert_eq!(taken.len(), 2, "a1 once, b1 once: {taken:?}");

    let (p, _writer) = chain(journal(Behaviour::Refuse));
    assert_eq!(code(&verdict(&p, &event("c1")).await), Some(500));
    assert!(log.lock().unwrap().is_empty(), "a failed commit reaches no stage");
    assert!(delivered(&p).await.is_empty());
}
