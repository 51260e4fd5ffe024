//! The batch format of `<prefix>.batch`: a request carries newline-delimited
//! events, the reply one verdict line per request line, in order.
//!
//! Request: events separated by `\n` (a `\r` before it is ignored; one final
//! newline does not start another line). Every line gets exactly one entry,
//! so entry `i` of the reply is the verdict on line `i`, blank lines
//! included.
//!
//! Reply lines:
//!
//! | line | meaning |
//! |---|---|
//! | `1` | new: accepted and republished |
//! | `0` | duplicate within the window |
//! | `!<code> <reason>` | not decided: `400` bad event (reason as for single requests), `503` shard not ready or no owner, `500` the store failed; retry the line |
//!
//! A bad line never fails the others. Within one batch a repeated id is new
//! on its first line and a duplicate after, once that first line is
//! durable: if its commit fails, the repeats get the same error.
//!
//! ```
//! use eventsieve::engine::batch::{Entry, decode, encode};
//!
//! let reply = encode(&[Entry::New, Entry::Duplicate, Entry::error(400, "no event_id")]);
//! assert_eq!(reply, b"1\n0\n!400 no event_id\n");
//! assert_eq!(decode(&reply).unwrap()[2], Entry::error(400, "no event_id"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::engine::dedup::{Deduplicator, Record};
use crate::engine::event::{EventErrorKind, Seen};
use crate::engine::fingerprint::Fingerprint;
use crate::engine::pending::Settle;

/// The verdict on one line of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    New,
    Duplicate,
    /// Not decided; `code` is `400`, `500` or `503` as for single requests.
    Error {
        code: u16,
        reason: String,
    },
}

impl Entry {
    pub fn error(code: u16, reason: impl Into<String>) -> Self {
        Entry::Error {
            code,
            reason: reason.into(),
        }
    }
}

/// The byte ranges of a batch's lines: `\n`-separated, a trailing `\r`
/// stripped, one final newline not starting another line. An empty body has
/// no lines.
pub fn lines(body: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(body.len() / 128 + 1);
    let mut start = 0;
    // A last line without its newline ends at the end of the body.
    let unterminated = !body.is_empty() && body.last() != Some(&b'\n');
    for end in memchr::memchr_iter(b'\n', body).chain(unterminated.then_some(body.len())) {
        let trimmed = if end > start && body[end - 1] == b'\r' {
            end - 1
        } else {
            end
        };
        out.push(start..trimmed);
        start = end + 1;
    }
    out
}

/// `lines` of `body` joined by `\n`, in order, cut into as few messages of
/// at most `limit` bytes each as the lines allow (a line longer than
/// `limit` alone); each with its number of lines. The per-shard output of
/// a batch: a consumer splits each message on `\n` and gets the events
/// byte for byte.
pub fn join(body: &[u8], lines: &[Range<usize>], limit: usize) -> Vec<(Vec<u8>, usize)> {
    let mut out: Vec<(Vec<u8>, usize)> = Vec::new();
    let total: usize = lines.iter().map(|r| r.len() + 1).sum();
    let mut current = Vec::with_capacity(total.min(limit));
    let mut count = 0;
    for r in lines {
        if count > 0 && current.len() + 1 + r.len() > limit {
            out.push((std::mem::take(&mut current), count));
            count = 0;
        }
        if count > 0 {
            current.push(b'\n');
        }
        current.extend_from_slice(&body[r.clone()]);
        count += 1;
    }
    if count > 0 {
        out.push((current, count));
    }
    out
}

/// Where the node deciding a batch finds a line's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Owned and ready: decided here.
    Here,
    /// Owned, still recovering: 503.
    NotReady,
    /// Owned elsewhere: sent on in a sub-batch.
    Forward,
    /// Owned elsewhere, but this batch was itself forwarded: 503, so that
    /// nodes that disagree on ownership cannot forward in a loop.
    Refuse,
}

/// A batch once this node has decided the lines it owns.
#[derive(Debug, Default)]
pub struct Decision {
    /// Byte ranges of the lines in the body.
    pub lines: Vec<Range<usize>>,
    /// An entry per line; `None` for lines to forward.
    pub entries: Vec<Option<Entry>>,
    /// Lines that are new here and the records that make them durable,
    /// grouped by shard in line order.
    pub new: Vec<(usize, Record)>,
    /// With `track`: per shard of `new`, in the same order, the cell its
    /// commit must complete.
    pub settles: Vec<Arc<Settle>>,
    /// With `track`: lines whose id was remembered but not yet durable
    /// (earlier in this batch, or in another request), with the cell of
    /// that commit; their entry says `Duplicate` until it completes, and
    /// takes its error if it fails.
    pub twins: Vec<(usize, Arc<Settle>)>,
    /// Per shard owned elsewhere: its lines and their sub-batch body.
    pub forward: BTreeMap<u32, (Vec<usize>, Vec<u8>)>,
    /// The reason of each rejected line.
    pub invalid: Vec<EventErrorKind>,
    pub not_ready: u64,
    pub duplicates: u64,
    /// The fields [`crate::engine::dedup::EngineConfig::capture`] of each
    /// line, `capture.len()` per line, read with its key; empty when none
    /// are wanted or the key is not a top-level field (the stages then
    /// read the lines again).
    pub seen: Vec<Seen>,
}

/// Splits `body` into lines, keys each, and decides the lines of shards
/// routed [`Route::Here`]: one table lock per shard, in line order, so a
/// repeat within the batch is a duplicate of its first line. With `track`,
/// new ids are pending until their shard's cell in
/// [`Decision::settles`] completes, and duplicates of pending ids are
/// listed in [`Decision::twins`].
pub fn decide(
    dedup: &Deduplicator,
    body: &[u8],
    now_ms: u64,
    track: bool,
    route: impl Fn(u32) -> Route,
) -> Decision {
    let format = &dedup.config().format;
    let frames = format.split(body);
    let mut lines = frames.ranges;
    let truncated = frames.truncated.map(|(range, why)| {
        lines.push(range);
        why
    });
    let mut d = Decision {
        entries: vec![None; lines.len()],
        ..Decision::default()
    };
    if let Some(why) = truncated {
        d.invalid.push(EventErrorKind::NotProtobuf);
        d.entries[lines.len() - 1] = Some(Entry::error(400, why));
    }
    let n = dedup.config().capture.len();
    let mut seen = vec![Seen::Missing; lines.len() * n];
    let mut captured = n > 0;
    // The lines decided here, as (shard << 32 | line, fingerprint): sorted,
    // they fall into runs of one shard in line order.
    let mut here: Vec<(u64, Fingerprint)> = Vec::with_capacity(lines.len());
    for (i, range) in lines.iter().enumerate() {
        if d.entries[i].is_some() {
            continue;
        }
        let line = &body[range.clone()];
        let keyed = if n == 0 {
            dedup.key(line)
        } else {
            dedup
                .key_capturing(line, &mut seen[i * n..(i + 1) * n])
                .map(|(keyed, read)| {
                    captured &= read;
                    keyed
                })
        };
        let keyed = match keyed {
            Ok(keyed) => keyed,
            Err(e) => {
                d.invalid.push(e.kind());
                d.entries[i] = Some(Entry::error(400, e.to_string()));
                continue;
            }
        };
        let shard = keyed.shard;
        match route(shard) {
            Route::Here => here.push(((u64::from(shard) << 32) | i as u64, keyed.fingerprint)),
            Route::NotReady => {
                d.not_ready += 1;
                d.entries[i] = Some(Entry::error(
                    503,
                    format!("shard {shard} is not ready (recovering)"),
                ));
            }
            Route::Refuse => {
                d.not_ready += 1;
                d.entries[i] = Some(Entry::error(
                    503,
                    format!("shard {shard} is not owned by the node this sub-batch was forwarded to"),
                ));
            }
            Route::Forward => {
                let (lines, sub) = d.forward.entry(shard).or_default();
                lines.push(i);
                format.push(sub, line);
            }
        }
    }
    here.sort_unstable_by_key(|&(at, _)| at);
    let (mut fps, mut verdicts) = (Vec::with_capacity(here.len()), Vec::with_capacity(here.len()));
    let mut twins = Vec::new();
    d.new.reserve(here.len());
    for run in here.chunk_by(|a, b| a.0 >> 32 == b.0 >> 32) {
        let shard = (run[0].0 >> 32) as u32;
        fps.clear();
        fps.extend(run.iter().map(|&(_, fp)| fp));
        verdicts.clear();
        twins.clear();
        let settle = track.then(|| Settle::new(shard));
        let before = d.new.len();
        if let Err(why) =
            dedup.check_and_insert_many(shard, &fps, now_ms, settle.as_ref(), &mut verdicts, &mut twins)
        {
            d.not_ready += run.len() as u64;
            for &(at, _) in run {
                let i = (at & u64::from(u32::MAX)) as usize;
                d.entries[i] = Some(Entry::error(503, format!("{why}; retry")));
            }
            continue;
        }
        let run_twins = twins.len() as u64;
        for (k, cell) in twins.drain(..) {
            d.twins.push(((run[k].0 & u64::from(u32::MAX)) as usize, cell));
        }
        for (&(at, fingerprint), verdict) in run.iter().zip(&verdicts) {
            let i = (at & u64::from(u32::MAX)) as usize;
            if verdict.is_new() {
                let record = Record {
                    shard,
                    born_ms: now_ms,
                    fingerprint,
                };
                d.new.push((i, record));
                d.entries[i] = Some(Entry::New);
            } else {
                d.duplicates += 1;
                d.entries[i] = Some(Entry::Duplicate);
            }
        }
        d.duplicates -= run_twins; // counted when the commits they wait for complete
        if let Some(settle) = settle.filter(|_| d.new.len() > before) {
            d.settles.push(settle);
        }
    }
    d.lines = lines;
    if captured {
        d.seen = seen;
    }
    d
}

/// Appends one entry's reply line to `out`.
pub fn push(out: &mut Vec<u8>, entry: &Entry) {
    match entry {
        Entry::New => out.extend_from_slice(b"1\n"),
        Entry::Duplicate => out.extend_from_slice(b"0\n"),
        Entry::Error { code, reason } => {
            out.push(b'!');
            out.extend_from_slice(code.to_string().as_bytes());
            out.push(b' ');
            // A reason is one line.
            out.extend(
                reason
                    .bytes()
                    .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
            );
            out.push(b'\n');
        }
    }
}

/// The reply body for `entries`.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 2);
    for e in entries {
        push(&mut out, e);
    }
    out
}

/// A reply body that does not follow the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// 0-based line of the reply.
    pub line: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch reply line {} is not `1`, `0` or `!<code> <reason>`",
            self.line
        )
    }
}

impl std::error::Error for DecodeError {}

/// Reads a batch reply.
///
/// # Errors
///
/// [`DecodeError`] with the first line that is not an entry.
pub fn decode(reply: &[u8]) -> Result<Vec<Entry>, DecodeError> {
    lines(reply)
        .into_iter()
        .enumerate()
        .map(|(i, r)| decode_line(&reply[r]).ok_or(DecodeError { line: i }))
        .collect()
}

fn decode_line(line: &[u8]) -> Option<Entry> {
    match line {
        b"1" => Some(Entry::New),
        b"0" => Some(Entry::Duplicate),
        [b'!', rest @ ..] => {
            let text = std::str::from_utf8(rest).ok()?;
            let (code, reason) = text.split_once(' ').unwrap_or((text, ""));
            Some(Entry::error(code.parse().ok()?, reason))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn texts(body: &[u8]) -> Vec<&[u8]> {
        lines(body).into_iter().map(|r| &body[r]).collect()
    }

    #[test]
    fn join_keeps_lines_byte_for_byte_in_order_within_the_limit() {
        let body = b"aa\nbbb\r\ncccc\nd";
        let all = lines(body);
        assert_eq!(join(body, &all, 1 << 20), [(b"aa\nbbb\ncccc\nd".to_vec(), 4)]);
        let picked = [all[2].clone(), all[0].clone()];
        assert_eq!(join(body, &picked, 100), [(b"cccc\naa".to_vec(), 2)]);
        // 7 bytes fit "aa\nbbb" but not "\ncccc" after it; "cccc" is
        // longer than 3 and goes alone.
        assert_eq!(
            join(body, &all, 7),
            [(b"aa\nbbb".to_vec(), 2), (b"cccc\nd".to_vec(), 2)]
        );
        assert_eq!(
            join(body, &all, 3),
            [
                (b"aa".to_vec(), 1),
                (b"bbb".to_vec(), 1),
                (b"cccc".to_vec(), 1),
                (b"d".to_vec(), 1)
            ]
        );
        assert!(join(body, &[], 10).is_empty());
    }

    proptest! {
        #[test]
        fn join_then_split_gives_the_lines_back(
            texts in proptest::collection::vec("[a-z{}\":, ]{0,20}", 0..30),
            limit in 1usize..80,
        ) {
            let body = texts.join("\n");
            let all = lines(body.as_bytes());
            let messages = join(body.as_bytes(), &all, limit);
            let mut back = Vec::new();
            for (message, count) in &messages {
                let parts: Vec<&[u8]> = message.split(|&b| b == b'\n').collect();
                prop_assert_eq!(parts.len(), *count);
                prop_assert!(message.len() <= limit || *count == 1);
                back.extend(parts);
            }
            let expected: Vec<&[u8]> = all.iter().map(|r| &body.as_bytes()[r.clone()]).collect();
            prop_assert_eq!(back, expected);
        }
    }

    #[test]
    fn lines_follow_ndjson_conventions() {
        assert!(texts(b"").is_empty());
        assert_eq!(texts(b"a"), [b"a"]);
        assert_eq!(texts(b"a\n"), [b"a"]);
        assert_eq!(texts(b"a\r\nb"), [&b"a"[..], b"b"]);
        assert_eq!(texts(b"a\n\nb\n"), [&b"a"[..], b"", b"b"]);
        assert_eq!(texts(b"\n"), [b""]);
        assert_eq!(texts(b"a\n\n"), [&b"a"[..], b""]);
    }

    #[test]
    fn a_reason_stays_on_its_line() {
        let reply = encode(&[Entry::error(400, "two\nlines"), Entry::New]);
        assert_eq!(
            decode(&reply).unwrap(),
            [Entry::error(400, "two lines"), Entry::New]
        );
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert_eq!(decode(b"1\nx\n"), Err(DecodeError { line: 1 }));
        assert_eq!(decode(b"!abc reason\n"), Err(DecodeError { line: 0 }));
        assert_eq!(decode(b"").unwrap(), []);
    }

    #[test]
    fn decide_routes_each_line_and_keeps_line_order_within_a_shard() {
        use crate::engine::EngineConfig;
        let dedup = Deduplicator::new(EngineConfig::default());
        let shard = |id: &str| crate::engine::shard::shard_of(id, 32);
        // "abc" is shard 11, "X9" shard 26, "0" shard 15.
        let body = b"{\"event_id\":\"abc\"}\n{\"event_id\":\"X9\"}\nnope\n{\"event_id\":\"abc\"}\n{\"event_id\":\"0\"}";
        let route = |s: u32| match s {
            11 => Route::Here,
            26 => Route::Forward,
            _ => Route::NotReady,
        };
        let d = decide(&dedup, body, 1_000, false, route);
        assert_eq!(d.lines.len(), 5);
        assert_eq!(d.entries[0], Some(Entry::New));
        assert_eq!(d.entries[1], None, "forwarded");
        assert!(matches!(d.entries[2], Some(Entry::Error { code: 400, .. })));
        assert_eq!(d.entries[3], Some(Entry::Duplicate));
        assert!(matches!(d.entries[4], Some(Entry::Error { code: 503, .. })));
        assert_eq!(d.new.len(), 1);
        assert_eq!(d.new[0].1.shard, shard("abc"));
        assert_eq!(
            d.forward[&shard("X9")],
            (vec![1], b"{\"event_id\":\"X9\"}\n".to_vec())
        );
        assert_eq!((d.invalid.len(), d.not_ready, d.duplicates), (1, 1, 1));
        // Nothing outside Route::Here was remembered.
        let again = decide(&dedup, body, 1_001, false, |_| Route::Here);
        assert_eq!(again.entries[1], Some(Entry::New));
        assert_eq!(again.entries[4], Some(Entry::New));
        assert_eq!(again.entries[0], Some(Entry::Duplicate));
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            Just(Entry::New),
            Just(Entry::Duplicate),
            (100u16..600, "[ -~]{0,40}").prop_map(|(c, r)| Entry::error(c, r)),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(entries in proptest::collection::vec(entry(), 0..50)) {
            prop_assert_eq!(decode(&encode(&entries)).unwrap(), entries);
        }

        #[test]
        fn lines_rejoin_to_the_body(body in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), Just(b'{')], 0..64)) {
            // Every byte is in a line or is a separator (newline or the `\r` before one).
            let ranges = lines(&body);
            let covered: usize = ranges.iter().map(|r| r.len()).sum();
            let separators = body.len() - covered;
            prop_assert!(separators <= 2 * ranges.len());
            for r in &ranges {
                prop_assert!(!body[r.clone()].contains(&b'\n'));
            }
        }
    }
}
