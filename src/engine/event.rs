//! Finds and validates the top-level `event_id` of a JSON event.
//!
//! The event is checked to be one well-formed JSON value, but no DOM is built:
//! serde_json drives a visitor that skips every value except the top-level
//! `event_id`, which is borrowed from the input when it has no escapes.
//!
//! Rules, each with its own [`EventErrorKind`]:
//! - the event is at most [`Limits::max_event_bytes`] bytes of UTF-8 JSON;
//! - it is a JSON object with exactly one top-level `event_id` key (keys are
//!   compared after decoding escapes, so `"event\u005fid"` is that key too);
//! - its value is a string which, after decoding JSON escapes, is non-empty,
//!   at most [`Limits::max_id_bytes`] bytes, and only `a-z A-Z 0-9`.
//!
//! Escapes are decoded before validation: `"\u0041"` is the id `A`, the same
//! id as `"A"`, so both forms are one event. An escape that decodes to
//! anything outside `a-z A-Z 0-9` is rejected like the raw character.
//! An `event_id` inside a nested object or array is ordinary data.
//!
//! Skipped values are walked by serde_json without recursion, so no nesting
//! depth can exhaust the stack; no input panics.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Size limits for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted event in bytes. Default 1 MiB, nats-server's default `max_payload`.
    pub max_event_bytes: usize,
    /// Largest accepted `event_id` in bytes, after decoding escapes. Default 256.
    pub max_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1024 * 1024,
            max_id_bytes: 256,
        }
    }
}

/// What is wrong with an event; each kind is a reason a producer can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventErrorKind {
    /// The event is larger than the configured limit.
    TooLarge,
    /// The bytes are not one well-formed UTF-8 JSON value.
    NotJson,
    /// The JSON value is not an object.
    NotObject,
    /// The object has no top-level `event_id`.
    MissingId,
    /// The top-level `event_id` is not a string.
    IdNotString,
    /// The `event_id` is the empty string.
    IdEmpty,
    /// The `event_id` has a character outside `a-z A-Z 0-9`.
    IdInvalidChars,
    /// The `event_id` is longer than the configured limit.
    IdTooLong,
    /// The object has more than one top-level `event_id`.
    IdDuplicated,
    /// The bytes are not a message of the configured protobuf schema.
    NotProtobuf,
}

impl EventErrorKind {
    /// A short stable name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::NotJson => "not_json",
            Self::NotObject => "not_object",
            Self::MissingId => "missing_id",
            Self::IdNotString => "id_not_string",
            Self::IdEmpty => "id_empty",
            Self::IdInvalidChars => "id_invalid_chars",
            Self::IdTooLong => "id_too_long",
            Self::IdDuplicated => "id_duplicated",
            Self::NotProtobuf => "not_protobuf",
        }
    }

    /// Every kind, for metrics that pre-register their labels.
    pub const ALL: [EventErrorKind; 10] = [
        Self::TooLarge,
        Self::NotJson,
        Self::NotObject,
        Self::MissingId,
        Self::IdNotString,
        Self::IdEmpty,
        Self::IdInvalidChars,
        Self::IdTooLong,
        Self::IdDuplicated,
        Self::NotProtobuf,
    ];
}

/// A rejected event: the kind, the limit that applied and, for malformed
/// JSON, the parser's own error.
#[derive(Debug)]
pub struct EventError {
    kind: EventErrorKind,
    limit: usize,
    source: Option<serde_json::Error>,
    /// The key the rule is about, when it is not `event_id`.
    key: Option<Box<str>>,
    /// The key may be a number as well as a string.
    numbers_too: bool,
    /// What to do about it, when the rule alone does not say.
    hint: Option<Cow<'static, str>>,
}

impl EventError {
    pub(crate) fn new(kind: EventErrorKind) -> Self {
        Self {
            kind,
            limit: 0,
            source: None,
            key: None,
            numbers_too: false,
            hint: None,
        }
    }

    /// Adds what to do about it to the message.
    pub(crate) fn because(mut self, hint: &'static str) -> Self {
        self.hint = Some(Cow::Borrowed(hint));
        self
    }

    /// The whole message, made at run time.
    pub(crate) fn because_text(mut self, text: String) -> Self {
        self.hint = Some(Cow::Owned(text));
        self
    }

    /// Bytes that are not a message of the schema, with the reason.
    pub(crate) fn not_message(reason: String) -> Self {
        Self::new(EventErrorKind::NotProtobuf).because_text(reason)
    }

    fn over(kind: EventErrorKind, limit: usize) -> Self {
        Self {
            limit,
            ..Self::new(kind)
        }
    }

    /// Says that the key may be a number too.
    pub(crate) fn or_number(mut self) -> Self {
        self.numbers_too = true;
        self
    }

    /// Names `key` (a field other than `event_id`) in the message.
    pub(crate) fn about(mut self, key: &str) -> Self {
        if key != "event_id" {
            self.key = Some(key.into());
        }
        self
    }

    /// A malformed event, with the parser's reason.
    pub(crate) fn not_json(source: serde_json::Error) -> Self {
        Self {
            source: Some(source),
            ..Self::new(EventErrorKind::NotJson)
        }
    }

    pub fn kind(&self) -> EventErrorKind {
        self.kind
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use EventErrorKind::*;
        let key = self.key.as_deref().unwrap_or("event_id");
        if let Some(hint) = &self.hint {
            return match self.kind {
                MissingId if matches!(hint, Cow::Borrowed(_)) => write!(f, "no \"{key}\": {hint}"),
                _ => write!(f, "{hint}"),
            };
        }
        match self.kind {
            TooLarge => write!(f, "event is larger than {} bytes", self.limit),
            NotJson => match &self.source {
                Some(e) => write!(f, "event is not valid JSON: {e}"),
                None => write!(f, "event is not valid UTF-8 JSON"),
            },
            NotObject => write!(f, "event is not a JSON object"),
            MissingId => write!(f, "event has no top-level \"{key}\""),
            IdNotString if self.numbers_too => write!(f, "\"{key}\" is not a string or a number"),
            IdNotString => write!(f, "\"{key}\" is not a string"),
            IdEmpty => write!(f, "\"{key}\" is empty"),
            IdInvalidChars => write!(f, "\"{key}\" may only contain a-z, A-Z and 0-9"),
            IdTooLong => write!(f, "\"{key}\" is longer than {} bytes", self.limit),
            IdDuplicated => write!(f, "\"{key}\" appears more than once at the top level"),
            NotProtobuf => write!(f, "event is not a message of the schema"),
        }
    }
}

impl std::error::Error for EventError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Returns the validated top-level `event_id` of `event`, borrowed from it
/// unless the id was written with escapes.
///
/// # Errors
///
/// An [`EventError`] naming the first rule the event breaks; size is checked
/// first, then JSON well-formedness, then the id.
pub fn event_id<'a>(event: &'a [u8], limits: &Limits) -> Result<Cow<'a, str>, EventError> {
    field(event, "event_id", limits)
}

/// As [`event_id`], for the top-level string field `name` (the same rules;
/// the errors name the field).
///
/// # Errors
///
/// As [`event_id`].
pub fn field<'a>(event: &'a [u8], name: &str, limits: &Limits) -> Result<Cow<'a, str>, EventError> {
    top_field(event, name, limits, &[], &mut []).map_err(|e| e.about(name))
}

/// A top-level field read in the same pass as the key, for the stages
/// (see [`field_capturing`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Seen {
    #[default]
    Missing,
    /// Present: an object, an array, or a number out of range.
    Other,
    Null,
    Bool(bool),
    Number(f64),
    /// Text without escapes: its bytes `start..end` in the event.
    Text {
        start: u32,
        end: u32,
    },
    /// Text with escapes: to be decoded by reading the event again.
    Escaped,
    /// A name from the schema: a protobuf enum's value.
    Symbol(&'static str),
}

/// As [`field`], and reads the top-level fields `capture` into `seen`
/// (one each, the first occurrence) in the same pass.
///
/// # Errors
///
/// As [`field`]; `seen` is then unspecified.
pub fn field_capturing<'a>(
    event: &'a [u8],
    name: &str,
    limits: &Limits,
    capture: &[String],
    seen: &mut [Seen],
) -> Result<Cow<'a, str>, EventError> {
    top_field(event, name, limits, capture, seen).map_err(|e| e.about(name))
}

/// Reads the top-level fields `capture` of `event` into `seen` (one
/// each, the first occurrence), as [`field_capturing`] does beside a key:
/// the one reader of top-level fields, for events read again after their
/// key (the stages). False if `event` is not a JSON object.
pub fn capture<S: AsRef<str>>(event: &[u8], capture: &[S], seen: &mut [Seen]) -> bool {
    seen.fill(Seen::Missing);
    if let Ok(text) = std::str::from_utf8(event)
        && let Some(top) = super::scan::top_level(text, None, capture, seen)
    {
        return matches!(top, TopLevel::Object { .. });
    }
    seen.fill(Seen::Missing);
    let mut de = serde_json::Deserializer::from_slice(event);
    let top = TopVisitor {
        name: None,
        capture,
        seen,
        base: event.as_ptr() as usize,
    }
    .deserialize(&mut de)
    .and_then(|top| de.end().map(|()| top));
    matches!(top, Ok(TopLevel::Object { .. }))
}

/// The first top-level text field `name` of `event`, decoded: what a
/// [`Seen::Escaped`] holds. `None` if it is absent or not text, or
/// `event` is not a JSON object.
pub fn text<'a>(event: &'a [u8], name: &str) -> Option<Cow<'a, str>> {
    let mut de = serde_json::Deserializer::from_slice(event);
    let top = TopVisitor::<String> {
        name: Some(name),
        capture: &[],
        seen: &mut [],
        base: event.as_ptr() as usize,
    }
    .deserialize(&mut de)
    .ok()?;
    match top {
        TopLevel::Object {
            ids: 1..,
            id: IdValue::Text(text),
        } => Some(text),
        _ => None,
    }
}

fn top_field<'a>(
    event: &'a [u8],
    name: &str,
    limits: &Limits,
    capture: &[String],
    seen: &mut [Seen],
) -> Result<Cow<'a, str>, EventError> {
    if event.len() > limits.max_event_bytes {
        return Err(EventError::over(EventErrorKind::TooLarge, limits.max_event_bytes));
    }
    // serde_json skips ignored strings without checking their UTF-8, so the
    // whole input is checked here once; it is the fast path of the standard library.
    let text = std::str::from_utf8(event).map_err(|_| EventError::new(EventErrorKind::NotJson))?;
    seen.fill(Seen::Missing);
    let top = match super::scan::top_level(text, Some(name), capture, seen) {
        Some(top) => top,
        None => {
            seen.fill(Seen::Missing);
            serde_top_level(text, Some(name), capture, seen).map_err(EventError::not_json)?
        }
    };
    let id = match top {
        TopLevel::NotObject => return Err(EventError::new(EventErrorKind::NotObject)),
        TopLevel::Object { ids: 0, .. } => return Err(EventError::new(EventErrorKind::MissingId)),
        TopLevel::Object { ids: 2.., .. } => {
            return Err(EventError::new(EventErrorKind::IdDuplicated));
        }
        TopLevel::Object {
            id: IdValue::NotString,
            ..
        } => {
            return Err(EventError::new(EventErrorKind::IdNotString));
        }
        TopLevel::Object {
            id: IdValue::Text(id),
            ..
        } => id,
    };
    validate_id(&id, limits)?;
    Ok(id)
}

/// The top level of `text` read by serde_json: what the fast path
/// ([`super::scan`]) must agree with.
pub(super) fn serde_top_level<'a, S: AsRef<str>>(
    text: &'a str,
    name: Option<&str>,
    capture: &[S],
    seen: &mut [Seen],
) -> Result<TopLevel<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    TopVisitor {
        name,
        capture,
        seen,
        base: text.as_ptr() as usize,
    }
    .deserialize(&mut de)
    .and_then(|top| de.end().map(|()| top))
}

/// The error of an event over `limit` bytes.
pub(crate) fn too_large(limit: usize) -> EventError {
    EventError::over(EventErrorKind::TooLarge, limit)
}

/// Checks an already decoded id against the id rules.
///
/// # Errors
///
/// [`EventErrorKind::IdEmpty`], [`EventErrorKind::IdTooLong`] or
/// [`EventErrorKind::IdInvalidChars`].
pub fn validate_id(id: &str, limits: &Limits) -> Result<(), EventError> {
    if id.is_empty() {
        return Err(EventError::new(EventErrorKind::IdEmpty));
    }
    if id.len() > limits.max_id_bytes {
        return Err(EventError::over(EventErrorKind::IdTooLong, limits.max_id_bytes));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(EventError::new(EventErrorKind::IdInvalidChars));
    }
    Ok(())
}

/// What the top level of the document turned out to be.
#[derive(Debug, PartialEq)]
pub(super) enum TopLevel<'a> {
    NotObject,
    /// `ids` counts the top-level `event_id` keys; `id` is the first one's value.
    Object {
        ids: u32,
        id: IdValue<'a>,
    },
}

#[derive(Debug, PartialEq)]
pub(super) enum IdValue<'a> {
    NotString,
    Text(Cow<'a, str>),
}

/// Reads the top level, looking for the key it names, and capturing the
/// fields `capture` into `seen`.
struct TopVisitor<'n, 's, S> {
    /// The key looked for; `None` to capture only.
    name: Option<&'n str>,
    capture: &'n [S],
    seen: &'s mut [Seen],
    /// Where the event starts in memory, for the offsets of texts.
    base: usize,
}

impl<'de, S: AsRef<str>> DeserializeSeed<'de> for TopVisitor<'_, '_, S> {
    type Value = TopLevel<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// Implements the scalar `visit_*` methods of a visitor as "consume, answer `$v`".
macro_rules! answer_scalars {
    ($v:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_seq(seq).map(|_| $v)
        }
    };
}

impl<'de, S: AsRef<str>> Visitor<'de> for TopVisitor<'_, '_, S> {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    answer_scalars!(TopLevel::NotObject);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(TopLevel::NotObject)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ids = 0u32;
        let mut id = IdValue::NotString;
        let key = KeyIs {
            name: self.name,
            capture: self.capture,
        };
        while let Some(which) = map.next_key_seed(key)? {
            match which {
                KeyWhich::Id if ids == 0 => {
                    ids = 1;
                    id = map.next_value::<IdValue<'de>>()?;
                    // The key field is a captured one too.
                    if let Some(k) = self.capture.iter().position(|c| Some(c.as_ref()) == self.name) {
                        self.seen[k] = match &id {
                            IdValue::Text(Cow::Borrowed(text)) => seen_text(text, self.base),
                            IdValue::Text(Cow::Owned(_)) => Seen::Escaped,
                            IdValue::NotString => Seen::Other,
                        };
                    }
                }
                KeyWhich::Id => {
                    ids = ids.saturating_add(1);
                    map.next_value::<IgnoredAny>()?;
                }
                KeyWhich::Capture(k) if self.seen[k] == Seen::Missing => {
                    self.seen[k] = map.next_value_seed(SeenSeed(self.base))?;
                }
                KeyWhich::Capture(_) | KeyWhich::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(TopLevel::Object { ids, id })
    }
}

/// What a key is: the one named, a captured one, or another.
#[derive(Clone, Copy)]
enum KeyWhich {
    Id,
    Capture(usize),
    Other,
}

/// Deserializes a key to "is it the one named, or a captured one?",
/// without allocating.
struct KeyIs<'n, S> {
    name: Option<&'n str>,
    capture: &'n [S],
}

// Copy whatever `S` is: it holds only references.
impl<S> Clone for KeyIs<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for KeyIs<'_, S> {}

impl<'de, S: AsRef<str>> DeserializeSeed<'de> for KeyIs<'_, S> {
    type Value = KeyWhich;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<KeyWhich, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, S: AsRef<str>> Visitor<'de> for KeyIs<'_, S> {
    type Value = KeyWhich;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyWhich, E> {
        Ok(if Some(key) == self.name {
            KeyWhich::Id
        } else if let Some(k) = self.capture.iter().position(|c| c.as_ref() == key) {
            KeyWhich::Capture(k)
        } else {
            KeyWhich::Other
        })
    }
}

/// Where borrowed `text` lies in the event starting at address `base`.
pub(super) fn seen_text(text: &str, base: usize) -> Seen {
    let start = text.as_ptr() as usize - base;
    match (u32::try_from(start), u32::try_from(start + text.len())) {
        (Ok(start), Ok(end)) => Seen::Text { start, end },
        _ => Seen::Escaped,
    }
}

/// Reads a captured value into a [`Seen`]; holds the address where the
/// event starts.
pub(super) struct SeenSeed(pub(super) usize);

impl<'de> DeserializeSeed<'de> for SeenSeed {
    type Value = Seen;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Seen, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SeenSeed {
    type Value = Seen;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Seen, E> {
        Ok(seen_text(v, self.0))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Seen, E> {
        Ok(Seen::Escaped)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seen, E> {
        Ok(if v.is_finite() {
            Seen::Number(v)
        } else {
            Seen::Other
        })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seen, E> {
        Ok(Seen::Number(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seen, E> {
        Ok(Seen::Number(v as f64))
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Seen, E> {
        Ok(Seen::Bool(b))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Seen, E> {
        Ok(Seen::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Seen, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| Seen::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Seen, A::Error> {
        IgnoredAny.visit_map(map).map(|_| Seen::Other)
    }
}

impl<'de> de::Deserialize<'de> for IdValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IdVisitor)
    }
}

struct IdVisitor;

impl<'de> Visitor<'de> for IdVisitor {
    type Value = IdValue<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    answer_scalars!(IdValue::NotString);

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(IdValue::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(IdValue::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| IdValue::NotString)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> Result<String, EventErrorKind> {
        event_id(s.as_bytes(), &Limits::default())
            .map(|c| c.into_owned())
            .map_err(|e| e.kind())
    }

    use EventErrorKind::*;

    #[test]
    fn finds_the_top_level_id() {
        assert_eq!(id(r#"{"event_id":"abc"}"#), Ok("abc".into()));
        assert_eq!(
            id(r#" { "a": 1, "event_id" : "X9", "b": [1,2,{"c":null}] } "#),
            Ok("X9".into())
        );
    }

    #[test]
    fn borrows_unless_escaped() {
        let plain = br#"{"event_id":"abc"}"#;
        assert!(matches!(
            event_id(plain, &Limits::default()),
            Ok(Cow::Borrowed("abc"))
        ));
        let escaped = br#"{"event_id":"\u0041b"}"#;
        assert!(matches!(event_id(escaped, &Limits::default()), Ok(Cow::Owned(s)) if s == "Ab"));
    }

    #[test]
    fn escapes_are_decoded_before_validation() {
        assert_eq!(id(r#"{"event_id":"\u0041"}"#), Ok("A".into()));
        assert_eq!(id(r#"{"event\u005fid":"k1"}"#), Ok("k1".into()));
        assert_eq!(id(r#"{"event_id":"a\nb"}"#), Err(IdInvalidChars));
        assert_eq!(id(r#"{"event_id":"a\u0020b"}"#), Err(IdInvalidChars));
        assert_eq!(id(r#"{"event_id":"\ud800"}"#), Err(NotJson));
    }

    #[test]
    fn nested_event_ids_are_data() {
        assert_eq!(id(r#"{"x":{"event_id":"inner"}}"#), Err(MissingId));
        assert_eq!(
            id(r#"{"x":[{"event_id":"inner"}],"event_id":"outer"}"#),
            Ok("outer".into())
        );
        assert_eq!(id(r#"[{"event_id":"a"}]"#), Err(NotObject));
    }

    #[test]
    fn each_rule_has_its_own_error() {
        assert_eq!(id(""), Err(NotJson));
        assert_eq!(id("{"), Err(NotJson));
        assert_eq!(id(r#"{"event_id":"a"} x"#), Err(NotJson));
        assert_eq!(id(r#"{"event_id":"a",}"#), Err(NotJson));
        assert_eq!(id("42"), Err(NotObject));
        assert_eq!(id(r#""event_id""#), Err(NotObject));
        assert_eq!(id("null"), Err(NotObject));
        assert_eq!(id("{}"), Err(MissingId));
        assert_eq!(id(r#"{"event_id":7}"#), Err(IdNotString));
        assert_eq!(id(r#"{"event_id":null}"#), Err(IdNotString));
        assert_eq!(id(r#"{"event_id":{"a":"b"}}"#), Err(IdNotString));
        assert_eq!(id(r#"{"event_id":["a"]}"#), Err(IdNotString));
        assert_eq!(id(r#"{"event_id":""}"#), Err(IdEmpty));
        assert_eq!(id(r#"{"event_id":"a-b"}"#), Err(IdInvalidChars));
        assert_eq!(id(r#"{"event_id":"é"}"#), Err(IdInvalidChars));
        assert_eq!(id(r#"{"event_id":"a","event_id":"a"}"#), Err(IdDuplicated));
        assert_eq!(id(r#"{"event_id":"a","event_id":1}"#), Err(IdDuplicated));
    }

    #[test]
    fn limits_apply() {
        let limits = Limits {
            max_event_bytes: 40,
            max_id_bytes: 4,
        };
        let kind = |s: &str| {
            event_id(s.as_bytes(), &limits)
                .map(Cow::into_owned)
                .map_err(|e| e.kind())
        };
        assert_eq!(kind(r#"{"event_id":"abcd"}"#).unwrap(), "abcd");
        assert_eq!(kind(r#"{"event_id":"abcde"}"#).unwrap_err(), IdTooLong);
        assert_eq!(
            kind(r#"{"event_id":"a","pad":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#).unwrap_err(),
            TooLarge
        );
        let err = event_id(br#"{"event_id":"abcde"}"#, &limits).unwrap_err();
        assert_eq!(err.to_string(), "\"event_id\" is longer than 4 bytes");
    }

    #[test]
    fn invalid_utf8_is_not_json() {
        assert_eq!(
            event_id(b"{\"event_id\":\"a\",\"x\":\"\xff\"}", &Limits::default())
                .unwrap_err()
                .kind(),
            NotJson
        );
    }

    #[test]
    fn deep_nesting_does_not_exhaust_the_stack() {
        // Skipped values are walked without recursion; only the top level and
        // the id are visited.
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            id(&format!(r#"{{"event_id":"a","x":{open}{close}}}"#)),
            Ok("a".into())
        );
        assert_eq!(id(&format!(r#"{{"event_id":{open}{close}}}"#)), Err(IdNotString));
        assert_eq!(id(&format!(r#"{{"event_id":"a","x":{open}}}"#)), Err(NotJson));
        assert_eq!(id(&format!("{open}{close}")), Err(NotObject));
    }

    use super::super::scan::tests::json_value;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = event_id(&bytes, &Limits::default());
        }

        #[test]
        fn arbitrary_json_never_panics(v in json_value()) {
            let text = serde_json::to_string(&v).unwrap();
            let _ = event_id(text.as_bytes(), &Limits::default());
        }

        #[test]
        fn valid_events_yield_their_id(
            the_id in "[a-zA-Z0-9]{1,256}",
            others in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..6),
            at in 0usize..7,
        ) {
            let mut fields: Vec<(String, serde_json::Value)> = others.into_iter().collect();
            let at = at.min(fields.len());
            fields.insert(at, ("event_id".into(), serde_json::Value::from(the_id.clone())));
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                .collect();
            let text = format!("{{{}}}", body.join(","));
            prop_assert_eq!(id(&text), Ok(the_id));
        }
    }
}
