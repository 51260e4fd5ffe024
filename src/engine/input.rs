//! The format events arrive in: JSON objects (default) or protobuf
//! messages of one type from `.proto` files (`[input] format =
//! "protobuf"`). Everything after the key reads fields by name through
//! [`Format`], whatever the format.
//!
//! | | JSON | protobuf |
//! |---|---|---|
//! | one event | a JSON object | one message, no length prefix |
//! | a batch | lines, `\n`-separated | messages, each after its length as a varint (`writeDelimitedTo`) |
//! | the output of a batch | the new lines, `\n`-separated | the new messages, each length-delimited |
//!
//! A protobuf schema may be replaced while running ([`Format::replace`]):
//! each request takes the schema in force once ([`Format::schema`]).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::engine::event::{self, EventError, Limits, Seen};
use crate::engine::key::KeySpec;
use crate::engine::proto::Schema;

/// How events are read.
#[derive(Clone, Default)]
pub enum Format {
    #[default]
    Json,
    /// Messages of the schema in force.
    Protobuf(Arc<Schemas>),
}

/// The protobuf schema in force, the configured one, and what happened to
/// the ones set at run time.
pub struct Schemas {
    current: ArcSwap<Schema>,
    configured: Arc<Schema>,
    /// The KV revision of the schema in force (0: the configuration's).
    revision: AtomicU64,
    /// The last schema refused since, and why.
    rejected: Mutex<Option<(u64, String)>>,
    rejections: AtomicU64,
}

impl Schemas {
    /// The schema in force.
    pub fn current(&self) -> Arc<Schema> {
        self.current.load_full()
    }

    /// The configuration's schema.
    pub fn configured(&self) -> &Arc<Schema> {
        &self.configured
    }

    /// Puts `schema` (KV revision `revision`) in force for every request
    /// that starts after this.
    pub fn install(&self, schema: Arc<Schema>, revision: u64) {
        self.current.store(schema);
        self.revision.store(revision, Relaxed);
    }

    /// Records that the schema of `revision` was refused, and why.
    pub fn refuse(&self, revision: u64, why: &str) {
        self.rejections.fetch_add(1, Relaxed);
        *self.rejected.lock().unwrap_or_else(PoisonError::into_inner) = Some((revision, why.to_owned()));
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Relaxed)
    }

    /// Schemas refused so far.
    pub fn rejections(&self) -> u64 {
        self.rejections.load(Relaxed)
    }

    /// The last refusal: its revision and reason.
    pub fn last_rejection(&self) -> Option<(u64, String)> {
        self.rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json => f.write_str("Json"),
            Self::Protobuf(s) => write!(f, "Protobuf({})", s.current.load().name()),
        }
    }
}

impl PartialEq for Format {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Json, Self::Json) => true,
            (Self::Protobuf(a), Self::Protobuf(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Format {}

/// A batch body cut into its events.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Frames {
    pub ranges: Vec<Range<usize>>,
    /// The bytes after the last whole message, when a length prefix is
    /// broken or promises more than there is, with why: one more entry,
    /// an error.
    pub truncated: Option<(Range<usize>, String)>,
}

impl Format {
    /// Protobuf messages of `schema`.
    pub fn protobuf(schema: Schema) -> Self {
        let schema = Arc::new(schema);
        Self::Protobuf(Arc::new(Schemas {
            current: ArcSwap::new(schema.clone()),
            configured: schema,
            revision: AtomicU64::new(0),
            rejected: Mutex::new(None),
            rejections: AtomicU64::new(0),
        }))
    }

    /// The protobuf schemas, in force and configured.
    pub fn schemas(&self) -> Option<&Arc<Schemas>> {
        match self {
            Self::Json => None,
            Self::Protobuf(s) => Some(s),
        }
    }

    pub fn is_protobuf(&self) -> bool {
        matches!(self, Self::Protobuf(_))
    }

    /// The schema in force, for protobuf.
    pub fn schema(&self) -> Option<Arc<Schema>> {
        match self {
            Self::Json => None,
            Self::Protobuf(s) => Some(s.current()),
        }
    }

    /// The id of `event` by `key`.
    ///
    /// # Errors
    ///
    /// The first rule the event breaks.
    pub fn id_of<'a>(
        &self,
        key: &KeySpec,
        event: &'a [u8],
        limits: &Limits,
    ) -> Result<Cow<'a, str>, EventError> {
        self.id_capturing(key, event, limits, &[], &mut [])
            .map(|(id, _)| id)
    }

    /// The id of `event`, and the top-level fields `capture` read into
    /// `seen` in the same pass; whether they were (always, for protobuf;
    /// for JSON, with a top-level field key only).
    ///
    /// # Errors
    ///
    /// The first rule the event breaks.
    pub fn id_capturing<'a>(
        &self,
        key: &KeySpec,
        event: &'a [u8],
        limits: &Limits,
        capture: &[String],
        seen: &mut [Seen],
    ) -> Result<(Cow<'a, str>, bool), EventError> {
        let schema = match self {
            Self::Json => return key.id_capturing(event, limits, capture, seen),
            Self::Protobuf(s) => s.current.load(),
        };
        match key {
            KeySpec::Content => {
                schema.check(event, limits)?;
                if !capture.is_empty() {
                    schema
                        .capture(event, capture, seen)
                        .map_err(|e| schema.invalid(e))?;
                }
                Ok((Cow::Owned(crate::engine::key::hashed(event)), true))
            }
            KeySpec::Field(name) => schema
                .key(&[std::slice::from_ref(name)], event, limits, capture, seen)
                .map(|id| (id, true)),
            KeySpec::Fields(paths) => {
                let paths: Vec<&[String]> = paths.iter().map(Vec::as_slice).collect();
                schema
                    .key(&paths, event, limits, capture, seen)
                    .map(|id| (id, true))
            }
        }
    }

    /// Reads the top-level fields `names` of `event` into `seen`; false if
    /// `event` is not an object (JSON) or not a message (protobuf).
    pub fn capture<S: AsRef<str>>(&self, event: &[u8], names: &[S], seen: &mut [Seen]) -> bool {
        match self {
            Self::Json => event::capture(event, names, seen),
            Self::Protobuf(s) => s.current.load().capture(event, names, seen).is_ok(),
        }
    }

    /// The first top-level text field `name` of `event`, decoded: what a
    /// [`Seen::Escaped`] holds (JSON only; protobuf texts are never escaped).
    pub fn text<'a>(&self, event: &'a [u8], name: &str) -> Option<Cow<'a, str>> {
        match self {
            Self::Json => event::text(event, name),
            Self::Protobuf(_) => None,
        }
    }

    /// The top-level text field `name` of `event` under the id rules (the
    /// shard key).
    ///
    /// # Errors
    ///
    /// The event breaks a rule, or the field is missing or breaks an id rule.
    pub fn id_field<'a>(
        &self,
        event: &'a [u8],
        name: &str,
        limits: &Limits,
    ) -> Result<Cow<'a, str>, EventError> {
        match self {
            Self::Json => event::field(event, name, limits),
            Self::Protobuf(_) => self.id_of(&KeySpec::Field(name.to_owned()), event, limits),
        }
    }

    /// Cuts a batch body into its events.
    pub fn split(&self, body: &[u8]) -> Frames {
        match self {
            Self::Json => Frames {
                ranges: crate::engine::batch::lines(body),
                truncated: None,
            },
            Self::Protobuf(_) => delimited(body),
        }
    }

    /// Appends `item` to a batch body being built.
    pub fn push(&self, out: &mut Vec<u8>, item: &[u8]) {
        match self {
            Self::Json => {
                out.extend_from_slice(item);
                out.push(b'\n');
            }
            Self::Protobuf(_) => {
                prost::encoding::encode_varint(item.len() as u64, out);
                out.extend_from_slice(item);
            }
        }
    }

    /// `ranges` of `body` as batch bodies of at most `limit` bytes each
    /// (an event longer than that alone), each with its count: the
    /// per-shard output of a batch.
    pub fn join(&self, body: &[u8], ranges: &[Range<usize>], limit: usize) -> Vec<(Vec<u8>, usize)> {
        if !self.is_protobuf() {
            return crate::engine::batch::join(body, ranges, limit);
        }
        let mut out: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut current = Vec::new();
        let mut count = 0;
        for r in ranges {
            if count > 0 && current.len() + 10 + r.len() > limit {
                out.push((std::mem::take(&mut current), count));
                count = 0;
            }
            self.push(&mut current, &body[r.clone()]);
            count += 1;
        }
        if count > 0 {
            out.push((current, count));
        }
        out
    }
}

/// Length-delimited messages: a varint length, then that many bytes.
fn delimited(body: &[u8]) -> Frames {
    let mut frames = Frames::default();
    let mut rest = body;
    while !rest.is_empty() {
        let at = body.len() - rest.len();
        let len = match prost::encoding::decode_varint(&mut rest) {
            Ok(len) => len,
            Err(_) => {
                frames.truncated = Some((
                    at..body.len(),
                    "a message's length prefix is not a valid varint".into(),
                ));
                break;
            }
        };
        let start = body.len() - rest.len();
        if len > rest.len() as u64 {
            frames.truncated = Some((
                at..body.len(),
                format!(
                    "truncated: the length prefix says {len} bytes, {} remain",
                    rest.len()
                ),
            ));
            break;
        }
        frames.ranges.push(start..start + len as usize);
        rest = &rest[len as usize..];
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimited_frames_and_a_truncated_tail() {
        let mut body = Vec::new();
        let f = Format::protobuf(
            Schema::new(
                prost_reflect::DescriptorPool::global(),
                "google.protobuf.Timestamp",
            )
            .unwrap(),
        );
        f.push(&mut body, b"abc");
        f.push(&mut body, b"");
        f.push(&mut body, &[7; 200]);
        let whole = body.len();
        body.extend_from_slice(&[10, 1, 2]);
        let frames = f.split(&body);
        assert_eq!(frames.ranges, vec![1..4, 5..5, 7..207]);
        let (tail, why) = frames.truncated.unwrap();
        assert_eq!(tail, whole..whole + 3);
        assert!(why.contains("says 10 bytes, 2 remain"), "{why}");
        let joined = f.join(&body, &frames.ranges, 100);
        assert_eq!(joined.len(), 2, "the 200-byte message alone");
        assert_eq!(joined[0], (body[..5].to_vec(), 2));
        assert_eq!(f.split(&joined[1].0).ranges.len(), 1);
        assert!(f.split(&[0x80]).truncated.is_some());
        assert_eq!(f.split(&[]), Frames::default());
    }
}
