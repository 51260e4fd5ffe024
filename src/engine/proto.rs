//! Protobuf events: a validating scan of the wire format against a
//! message's descriptor, reading only the fields asked for.
//!
//! [`Schema::scan`] accepts exactly the bytes that prost-reflect's
//! `DynamicMessage::decode` accepts for the message, and reads the values
//! it would hold, without building the message:
//!
//! - every tag is valid and every known field has its wire type (a
//!   repeated scalar may also come packed), strings are UTF-8, lengths fit,
//!   nested messages and groups are valid to the same depth limit (100);
//! - unknown fields are allowed (forward compatibility) but must be well
//!   formed;
//! - of a singular field given twice the last counts, a message given twice
//!   is merged, and setting one member of a `oneof` clears the others;
//! - a field without presence (proto3 scalars) that is absent reads as its
//!   default; one with presence (messages, `optional`, `oneof` members,
//!   proto2) reads as missing.
//!
//! What a stage sees of a field ([`Seen`]): a string is `Text` (its bytes
//! in the event), a number `Number`, a bool `Bool`, an enum the name of its
//! value (`Symbol`; a number the schema does not name stays a `Number`), a
//! `google.protobuf.Timestamp` its seconds since the epoch as a `Number`;
//! bytes, messages and repeated fields are `Other`. The property test in
//! this module holds all of this to prost-reflect's decoder.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint};
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};

use crate::engine::event::{EventError, EventErrorKind, Limits, Seen, validate_id};

/// prost's recursion limit, which the scan keeps to accept what it accepts.
const RECURSION_LIMIT: u32 = 100;

/// A message type compiled for scanning, with the pool it came from.
pub struct Schema {
    pool: DescriptorPool,
    message: MessageDescriptor,
    /// One per message type reachable from the root; `plans[0]` is the root.
    plans: Vec<Plan>,
    /// The root's fields by name.
    names: HashMap<String, u32, foldhash::fast::RandomState>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schema({})", self.message.full_name())
    }
}

/// How the scan reads one message type.
struct Plan {
    /// Fields by number: numbers below `DENSE` at their index.
    dense: Vec<Option<Field>>,
    sparse: HashMap<u32, Field>,
}

const DENSE: usize = 64;

impl Plan {
    fn field(&self, number: u32) -> Option<&Field> {
        match self.dense.get(number as usize) {
            Some(f) => f.as_ref(),
            None => self.sparse.get(&number),
        }
    }
}

#[derive(Clone)]
struct Field {
    number: u32,
    name: Box<str>,
    kind: Scalar,
    list: bool,
    /// A map; its entry's plan is in `kind` (a message).
    map: bool,
    presence: bool,
    oneof: Option<u32>,
}

/// A field's type as the scan needs it.
#[derive(Clone, Copy, PartialEq)]
enum Scalar {
    Double,
    Float,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Sint32,
    Sint64,
    Fixed32,
    Fixed64,
    Sfixed32,
    Sfixed64,
    Bool,
    String,
    Bytes,
    /// An enum: its values' numbers and names.
    Enum(&'static [(i32, &'static str)]),
    Message(usize),
    Group(usize),
    /// `google.protobuf.Timestamp` (a message), read as a time.
    Timestamp(usize),
}

impl Scalar {
    fn wire_type(self) -> WireType {
        match self {
            Self::Double | Self::Fixed64 | Self::Sfixed64 => WireType::SixtyFourBit,
            Self::Float | Self::Fixed32 | Self::Sfixed32 => WireType::ThirtyTwoBit,
            Self::String | Self::Bytes | Self::Message(_) | Self::Timestamp(_) => WireType::LengthDelimited,
            Self::Group(_) => WireType::StartGroup,
            _ => WireType::Varint,
        }
    }

    fn packable(self) -> bool {
        !matches!(
            self,
            Self::String | Self::Bytes | Self::Message(_) | Self::Group(_) | Self::Timestamp(_)
        )
    }
}

/// What the scan found of a wanted field.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Got {
    Missing,
    Text {
        start: u32,
        end: u32,
    },
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    Enum(i32),
    /// A Timestamp: seconds and nanos, merged over its occurrences.
    Time(i64, i32),
    /// Present: bytes, a message, a list, a map.
    Other,
}

/// A field wanted by the caller: where its value goes, and the fields
/// wanted inside it (a path).
struct Want {
    number: u32,
    slot: usize,
    oneof: Option<u32>,
    inner: Vec<Want>,
}

/// Enum value names, interned once for the life of the process (a schema
/// replaced at run time adds only names not seen before).
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<std::collections::HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// The reason a message does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(Box<str>);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cold]
fn fail<T>(reason: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(reason.into().into_boxed_str()))
}

fn prost_fail<T>(e: prost::DecodeError) -> Result<T, DecodeError> {
    let text = e.to_string();
    fail(
        text.trim_start_matches("failed to decode Protobuf message: ")
            .to_owned(),
    )
}

impl Schema {
    /// The message `name` of `pool`.
    ///
    /// # Errors
    ///
    /// No such message: the error lists the ones there are.
    pub fn new(pool: DescriptorPool, name: &str) -> Result<Self, String> {
        let Some(message) = pool.get_message_by_name(name) else {
            let mut names: Vec<String> = pool
                .all_messages()
                .filter(|m| !m.is_map_entry() && !m.full_name().starts_with("google.protobuf."))
                .map(|m| m.full_name().to_owned())
                .collect();
            names.sort();
            return Err(format!(
                "message {name:?} is not in the schema; its messages are: {}",
                names.join(", ")
            ));
        };
        let mut plans = Vec::new();
        let mut index = HashMap::new();
        plan_of(&message, &mut plans, &mut index);
        let names = message
            .fields()
            .map(|f| (f.name().to_owned(), f.number()))
            .collect();
        Ok(Self {
            pool,
            message,
            plans,
            names,
        })
    }

    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    pub fn message(&self) -> &MessageDescriptor {
        &self.message
    }

    /// The message's full name, e.g. `shop.v1.Event`.
    pub fn name(&self) -> &str {
        self.message.full_name()
    }

    /// The root field `name`, if the message has it.
    pub fn has_field(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The kind of the field at `path` (names from the root), or why there
    /// is none.
    pub fn field_at(&self, path: &[&str]) -> Result<FieldDescriptor, String> {
        let mut message = self.message.clone();
        let mut found = None;
        for (i, name) in path.iter().enumerate() {
            let Some(field) = message.get_field_by_name(name) else {
                return Err(format!("{} has no field {name:?}", message.full_name()));
            };
            if i + 1 < path.len() {
                match field.kind() {
                    Kind::Message(m) if !field.is_list() && !field.is_map() => message = m,
                    _ => return Err(format!("{name:?} is not a message field, so it has no fields")),
                }
            }
            found = Some(field);
        }
        found.ok_or_else(|| "an empty path".to_owned())
    }

    /// Checks `event` and reads the root fields `names` into `seen` (one
    /// each).
    ///
    /// # Errors
    ///
    /// Why `event` is not a valid message.
    pub fn capture<S: AsRef<str>>(
        &self,
        event: &[u8],
        names: &[S],
        seen: &mut [Seen],
    ) -> Result<(), DecodeError> {
        let mut got = [Got::Missing; 8];
        let mut more;
        let got: &mut [Got] = if names.len() <= got.len() {
            &mut got[..names.len()]
        } else {
            more = vec![Got::Missing; names.len()];
            &mut more
        };
        let wants = self.wants(names.iter().map(AsRef::as_ref));
        self.scan(event, &wants, got)?;
        for ((slot, got), want) in seen.iter_mut().zip(got.iter()).zip(&wants) {
            *slot = self.seen(0, want, *got);
        }
        Ok(())
    }

    /// The key of `event` and the fields `capture` (as [`Self::capture`]).
    ///
    /// | key | id |
    /// |---|---|
    /// | one root string field | the text, under the id rules |
    /// | one root integer field | its decimal digits (not negative) |
    /// | a path, or several fields | hashed as for JSON events, from the values as JSON |
    ///
    /// # Errors
    ///
    /// The message does not decode, or the key breaks a rule.
    pub fn key<'a>(
        &self,
        key: &[&[String]],
        event: &'a [u8],
        limits: &Limits,
        capture: &[String],
        seen: &mut [Seen],
    ) -> Result<Cow<'a, str>, EventError> {
        if event.len() > limits.max_event_bytes {
            return Err(crate::engine::event::too_large(limits.max_event_bytes));
        }
        let n = capture.len();
        let total = n + key.iter().map(|p| p.len()).sum::<usize>();
        let (mut on_stack, mut more) = ([Got::Missing; 16], Vec::new());
        let got: &mut [Got] = if total <= on_stack.len() {
            &mut on_stack[..total]
        } else {
            more.resize(total, Got::Missing);
            &mut more
        };
        let mut wants = self.wants(capture.iter().map(String::as_str));
        let mut at = n;
        let leaves: Vec<usize> = key
            .iter()
            .map(|path| self.add_path(&mut wants, path, &mut at))
            .collect();
        self.scan(event, &wants, got).map_err(|e| self.invalid(e))?;
        for ((slot, want), got) in seen.iter_mut().zip(&wants).zip(got.iter()).take(n) {
            *slot = self.seen(0, want, *got);
        }
        let name = |i: usize| key[i].join(".");
        if let ([path], [leaf]) = (key, leaves.as_slice())
            && path.len() == 1
        {
            let value = &got[*leaf];
            let about = &path[0];
            return match *value {
                Got::Text { start, end } if end > start => {
                    let id = std::str::from_utf8(&event[start as usize..end as usize])
                        .map_err(|_| EventError::new(EventErrorKind::IdInvalidChars).about(about))?;
                    validate_id(id, limits).map_err(|e| e.about(about))?;
                    Ok(Cow::Borrowed(id))
                }
                Got::Uint(0) | Got::Int(0) | Got::Text { .. } | Got::Missing => Err(missing_key(about)),
                Got::Uint(v) => Ok(Cow::Owned(v.to_string())),
                Got::Int(v) if v > 0 => Ok(Cow::Owned(v.to_string())),
                Got::Int(_) => Err(
                    EventError::new(EventErrorKind::IdInvalidChars).because_text(format!(
                        "\"{about}\" is negative: a key must be text or a non-negative integer"
                    )),
                ),
                _ => Err(not_text_or_integer(about)),
            };
        }
        let mut json = Vec::with_capacity(leaves.len());
        for (i, &leaf) in leaves.iter().enumerate() {
            json.push(match got[leaf] {
                Got::Text { start, end } if start == end => {
                    return Err(missing_key(&name(i)));
                }
                Got::Int(0) | Got::Uint(0) | Got::Missing => {
                    return Err(missing_key(&name(i)));
                }
                Got::Text { start, end } => serde_json::Value::from(
                    std::str::from_utf8(&event[start as usize..end as usize]).unwrap_or_default(),
                ),
                Got::Int(v) => v.into(),
                Got::Uint(v) => v.into(),
                _ => return Err(not_text_or_integer(&name(i))),
            });
        }
        let canonical = serde_json::to_vec(&json).map_err(EventError::not_json)?;
        Ok(Cow::Owned(crate::engine::key::hashed(&canonical)))
    }

    /// Checks that `event` decodes, as the content key needs.
    ///
    /// # Errors
    ///
    /// Why it does not.
    pub fn check(&self, event: &[u8], limits: &Limits) -> Result<(), EventError> {
        if event.len() > limits.max_event_bytes {
            return Err(crate::engine::event::too_large(limits.max_event_bytes));
        }
        self.scan(event, &[], &mut []).map_err(|e| self.invalid(e))
    }

    /// The error of a message that does not decode.
    pub fn invalid(&self, e: DecodeError) -> EventError {
        EventError::not_message(format!("event is not a valid {}: {e}", self.name()))
    }

    /// The event as a dynamic message (prost-reflect's decoder).
    ///
    /// # Errors
    ///
    /// The decoder's reason.
    pub fn decode(&self, event: &[u8]) -> Result<DynamicMessage, String> {
        DynamicMessage::decode(self.message.clone(), event).map_err(|e| e.to_string())
    }

    /// The event in the canonical protobuf JSON mapping.
    ///
    /// # Errors
    ///
    /// It does not decode.
    pub fn to_canonical_json(&self, event: &[u8]) -> Result<Vec<u8>, String> {
        let message = self.decode(event)?;
        serde_json::to_vec(&message).map_err(|e| e.to_string())
    }

    /// The event as a JSON value with the `.proto` field names, every
    /// field (defaults included), 64-bit integers as numbers, enums by
    /// name: what routing conditions see of it beyond the fields read by
    /// the scan.
    ///
    /// # Errors
    ///
    /// It does not decode.
    pub fn to_json_value(&self, event: &[u8]) -> Result<serde_json::Value, String> {
        let message = self.decode(event)?;
        let options = prost_reflect::SerializeOptions::new()
            .use_proto_field_name(true)
            .stringify_64_bit_integers(false)
            .skip_default_fields(false);
        message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| e.to_string())
    }

    fn wants<'n>(&self, names: impl Iterator<Item = &'n str>) -> Vec<Want> {
        names
            .enumerate()
            .map(|(slot, name)| {
                let field = self.names.get(name).and_then(|&n| self.plans[0].field(n));
                Want {
                    number: field.map_or(0, |f| f.number),
                    slot,
                    oneof: field.and_then(|f| f.oneof),
                    inner: Vec::new(),
                }
            })
            .collect()
    }

    /// Adds the wants of `path` (creating intermediate ones) and returns
    /// the slot of its leaf.
    fn add_path(&self, wants: &mut Vec<Want>, path: &[String], at: &mut usize) -> usize {
        let mut plan = 0;
        let mut level = wants;
        let mut leaf = usize::MAX;
        for name in path {
            let field = self.plans[plan]
                .fields()
                .find(|f| &*f.name == name.as_str())
                .cloned();
            let Some(field) = field else {
                // Not in the schema: a slot that stays missing.
                let slot = *at;
                *at += 1;
                return slot;
            };
            let pos = match level.iter().position(|w| w.number == field.number) {
                Some(p) => p,
                None => {
                    let slot = *at;
                    *at += 1;
                    level.push(Want {
                        number: field.number,
                        slot,
                        oneof: field.oneof,
                        inner: Vec::new(),
                    });
                    level.len() - 1
                }
            };
            leaf = level[pos].slot;
            if let Scalar::Message(p) | Scalar::Group(p) = field.kind {
                plan = p;
            }
            level = &mut level[pos].inner;
        }
        leaf
    }

    /// What a stage sees of `got`, a field of plan `plan` wanted by `want`.
    fn seen(&self, plan: usize, want: &Want, got: Got) -> Seen {
        let Some(field) = self.plans[plan].field(want.number) else {
            return Seen::Missing;
        };
        let got = match got {
            Got::Missing if !field.presence && !field.list && !field.map => default_of(field.kind),
            other => other,
        };
        match got {
            Got::Missing => Seen::Missing,
            Got::Text { start, end } => Seen::Text { start, end },
            Got::Int(v) => Seen::Number(v as f64),
            Got::Uint(v) => Seen::Number(v as f64),
            Got::Float(v) => Seen::Number(v),
            Got::Bool(b) => Seen::Bool(b),
            Got::Enum(v) => match field.kind {
                Scalar::Enum(names) => names
                    .iter()
                    .find(|(n, _)| *n == v)
                    .map_or(Seen::Number(f64::from(v)), |(_, name)| Seen::Symbol(name)),
                _ => Seen::Number(f64::from(v)),
            },
            Got::Time(secs, nanos) => Seen::Number(secs as f64 + f64::from(nanos) * 1e-9),
            Got::Other => Seen::Other,
        }
    }

    /// Scans `event` as the root message, filling `got` for `wants`.
    fn scan(&self, event: &[u8], wants: &[Want], got: &mut [Got]) -> Result<(), DecodeError> {
        let mut buf = event;
        let scanner = Scanner {
            schema: self,
            base: event.as_ptr() as usize,
        };
        scanner.fields(&mut buf, 0, RECURSION_LIMIT, None, wants, got)
    }
}

/// A key field that is absent, empty or zero: protobuf does not tell
/// these apart for most fields, so none of them is a key.
fn missing_key(name: &str) -> EventError {
    EventError::new(EventErrorKind::MissingId)
        .about(name)
        .because_text(format!(
            "\"{name}\" is missing, empty or zero (a key field must hold a value)"
        ))
}

fn not_text_or_integer(name: &str) -> EventError {
    EventError::new(EventErrorKind::IdNotString).because_text(format!(
        "\"{name}\" is not a string or an integer (a key field must be one)"
    ))
}

fn default_of(kind: Scalar) -> Got {
    match kind {
        Scalar::String => Got::Text { start: 0, end: 0 },
        Scalar::Double | Scalar::Float => Got::Float(0.0),
        Scalar::Int32
        | Scalar::Int64
        | Scalar::Sint32
        | Scalar::Sint64
        | Scalar::Sfixed32
        | Scalar::Sfixed64 => Got::Int(0),
        Scalar::Uint32 | Scalar::Uint64 | Scalar::Fixed32 | Scalar::Fixed64 => Got::Uint(0),
        Scalar::Bool => Got::Bool(false),
        Scalar::Enum(_) => Got::Enum(0),
        Scalar::Bytes => Got::Other,
        Scalar::Message(_) | Scalar::Group(_) | Scalar::Timestamp(_) => Got::Missing,
    }
}

impl Plan {
    fn fields(&self) -> impl Iterator<Item = &Field> {
        self.dense.iter().flatten().chain(self.sparse.values())
    }
}

/// Builds the plan of `message` and of every message reachable from it;
/// returns its index.
fn plan_of(message: &MessageDescriptor, plans: &mut Vec<Plan>, index: &mut HashMap<String, usize>) -> usize {
    if let Some(&at) = index.get(message.full_name()) {
        return at;
    }
    let at = plans.len();
    index.insert(message.full_name().to_owned(), at);
    plans.push(Plan {
        dense: vec![None; DENSE],
        sparse: HashMap::new(),
    });
    let mut fields = Vec::new();
    for f in message.fields() {
        let kind = scalar_of(&f.kind(), f.is_group(), plans, index);
        fields.push(Field {
            number: f.number(),
            name: f.name().into(),
            kind,
            list: f.is_list(),
            map: f.is_map(),
            presence: f.supports_presence(),
            oneof: f
                .containing_oneof()
                .and_then(|o| message.oneofs().position(|m| m.name() == o.name()))
                .map(|i| i as u32),
        });
    }
    for e in message.extensions() {
        let kind = scalar_of(&e.kind(), e.is_group(), plans, index);
        fields.push(Field {
            number: e.number(),
            name: e.full_name().into(),
            kind,
            list: e.is_list(),
            map: e.is_map(),
            presence: e.supports_presence(),
            oneof: None,
        });
    }
    let plan = &mut plans[at];
    for f in fields {
        match plan.dense.get_mut(f.number as usize) {
            Some(slot) => *slot = Some(f),
            None => {
                plan.sparse.insert(f.number, f);
            }
        }
    }
    at
}

fn scalar_of(kind: &Kind, group: bool, plans: &mut Vec<Plan>, index: &mut HashMap<String, usize>) -> Scalar {
    match kind {
        Kind::Double => Scalar::Double,
        Kind::Float => Scalar::Float,
        Kind::Int32 => Scalar::Int32,
        Kind::Int64 => Scalar::Int64,
        Kind::Uint32 => Scalar::Uint32,
        Kind::Uint64 => Scalar::Uint64,
        Kind::Sint32 => Scalar::Sint32,
        Kind::Sint64 => Scalar::Sint64,
        Kind::Fixed32 => Scalar::Fixed32,
        Kind::Fixed64 => Scalar::Fixed64,
        Kind::Sfixed32 => Scalar::Sfixed32,
        Kind::Sfixed64 => Scalar::Sfixed64,
        Kind::Bool => Scalar::Bool,
        Kind::String => Scalar::String,
        Kind::Bytes => Scalar::Bytes,
        Kind::Enum(e) => {
            let names: Vec<(i32, &'static str)> =
                e.values().map(|v| (v.number(), intern(v.name()))).collect();
            Scalar::Enum(Box::leak(names.into_boxed_slice()))
        }
        Kind::Message(m) => {
            let p = plan_of(m, plans, index);
            if group {
                Scalar::Group(p)
            } else if m.full_name() == "google.protobuf.Timestamp" {
                Scalar::Timestamp(p)
            } else {
                Scalar::Message(p)
            }
        }
    }
}

/// One scan over an event.
struct Scanner<'s> {
    schema: &'s Schema,
    /// Where the event starts in memory, for the offsets of texts.
    base: usize,
}

impl Scanner<'_> {
    /// Reads the fields of a message of plan `plan` from `buf` to its end
    /// (or, for a group, to its end tag `group`); `ctx` is prost's
    /// recursion budget for these fields.
    fn fields(
        &self,
        buf: &mut &[u8],
        plan: usize,
        ctx: u32,
        group: Option<u32>,
        wants: &[Want],
        got: &mut [Got],
    ) -> Result<(), DecodeError> {
        while buf.has_remaining() || group.is_some() {
            let (number, wire) = decode_key(buf).or_else(prost_fail)?;
            if wire == WireType::EndGroup {
                return match group {
                    Some(tag) if tag == number => Ok(()),
                    _ => fail("unexpected end group tag"),
                };
            }
            match self.schema.plans[plan].field(number) {
                None => self.unknown(buf, number, wire, ctx)?,
                Some(field) => {
                    let want = wants.iter().find(|w| w.number == number);
                    if let Some(oneof) = field.oneof {
                        for w in wants
                            .iter()
                            .filter(|w| w.oneof == Some(oneof) && w.number != number)
                        {
                            clear(w, got);
                        }
                    }
                    self.field(buf, field, wire, ctx, want, got).map_err(|e| {
                        DecodeError(format!("field {} ({}): {e}", field.name, field.number).into())
                    })?;
                }
            }
        }
        Ok(())
    }

    /// An unknown field, as prost-reflect keeps it.
    fn unknown(&self, buf: &mut &[u8], number: u32, wire: WireType, ctx: u32) -> Result<(), DecodeError> {
        match wire {
            WireType::Varint => {
                decode_varint(buf).or_else(prost_fail)?;
            }
            WireType::SixtyFourBit => take(buf, 8).map(drop)?,
            WireType::ThirtyTwoBit => take(buf, 4).map(drop)?,
            WireType::LengthDelimited => {
                let len = decode_varint(buf).or_else(prost_fail)?;
                take_len(buf, len).map(drop)?;
            }
            WireType::StartGroup => {
                if ctx == 0 {
                    return fail("recursion limit reached");
                }
                loop {
                    let (inner, wire) = decode_key(buf).or_else(prost_fail)?;
                    if wire == WireType::EndGroup {
                        if inner != number {
                            return fail("unexpected end group tag");
                        }
                        break;
                    }
                    self.unknown(buf, inner, wire, ctx - 1)?;
                }
            }
            WireType::EndGroup => return fail("unexpected end group tag"),
        }
        Ok(())
    }

    /// A field prost's `skip_field` skips (the unknown fields of a map
    /// entry): it checks the recursion budget on every field.
    fn skip(&self, buf: &mut &[u8], number: u32, wire: WireType, ctx: u32) -> Result<(), DecodeError> {
        if ctx == 0 {
            return fail("recursion limit reached");
        }
        match wire {
            WireType::StartGroup => loop {
                let (inner, wire) = decode_key(buf).or_else(prost_fail)?;
                if wire == WireType::EndGroup {
                    if inner != number {
                        return fail("unexpected end group tag");
                    }
                    return Ok(());
                }
                self.skip(buf, inner, wire, ctx - 1)?;
            },
            other => self.unknown(buf, number, other, ctx),
        }
    }

    #[inline]
    fn field(
        &self,
        buf: &mut &[u8],
        field: &Field,
        wire: WireType,
        ctx: u32,
        want: Option<&Want>,
        got: &mut [Got],
    ) -> Result<(), DecodeError> {
        if field.map {
            // prost-reflect reads a map entry as length-delimited whatever
            // the wire type says.
            let Scalar::Message(entry) = field.kind else {
                return fail("a map whose entry is not a message");
            };
            let len = decode_varint(buf).or_else(prost_fail)?;
            let mut inner = take_len(buf, len)?;
            let plan = &self.schema.plans[entry];
            while inner.has_remaining() {
                let (number, wire) = decode_key(&mut inner).or_else(prost_fail)?;
                match plan.field(number).filter(|_| number == 1 || number == 2) {
                    Some(f) => self
                        .value(&mut inner, number, f.kind, wire, ctx, None, &mut [])
                        .map(drop)?,
                    None => self.skip(&mut inner, number, wire, ctx)?,
                }
            }
            if let Some(w) = want {
                got[w.slot] = Got::Other;
            }
            return Ok(());
        }
        if field.list {
            let mut any = true;
            if wire == WireType::LengthDelimited && field.kind.packable() {
                let len = decode_varint(buf).or_else(prost_fail)?;
                let mut inner = take_len(buf, len)?;
                any = inner.has_remaining();
                while inner.has_remaining() {
                    self.value(
                        &mut inner,
                        field.number,
                        field.kind,
                        field.kind.wire_type(),
                        ctx,
                        None,
                        &mut [],
                    )?;
                }
            } else {
                self.value(buf, field.number, field.kind, wire, ctx, None, &mut [])?;
            }
            if let Some(w) = want.filter(|_| any) {
                got[w.slot] = Got::Other;
            }
            return Ok(());
        }
        let value = self.value(buf, field.number, field.kind, wire, ctx, want, got)?;
        if let Some(w) = want {
            got[w.slot] = match (value, got[w.slot]) {
                // A Timestamp given twice is merged.
                (Got::Time(s, n), Got::Time(s0, n0)) => Got::Time(
                    if s == i64::MIN { s0 } else { s },
                    if n == i32::MIN { n0 } else { n },
                ),
                (v, _) => v,
            };
            if let Got::Time(s, n) = got[w.slot] {
                got[w.slot] = Got::Time(
                    if s == i64::MIN { 0 } else { s },
                    if n == i32::MIN { 0 } else { n },
                );
            }
        }
        Ok(())
    }

    /// One value of type `kind` sent with wire type `wire`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn value(
        &self,
        buf: &mut &[u8],
        number: u32,
        kind: Scalar,
        wire: WireType,
        ctx: u32,
        want: Option<&Want>,
        got: &mut [Got],
    ) -> Result<Got, DecodeError> {
        let expected = kind.wire_type();
        if wire != expected {
            return fail(format!("invalid wire type: {wire:?} (expected {expected:?})"));
        }
        let varint = |buf: &mut &[u8]| decode_varint(buf).or_else(prost_fail);
        Ok(match kind {
            Scalar::Int32 => Got::Int(i64::from(varint(buf)? as i32)),
            Scalar::Int64 => Got::Int(varint(buf)? as i64),
            Scalar::Uint32 => Got::Uint(u64::from(varint(buf)? as u32)),
            Scalar::Uint64 => Got::Uint(varint(buf)?),
            Scalar::Sint32 => {
                let v = varint(buf)? as u32;
                Got::Int(i64::from(((v >> 1) as i32) ^ (-((v & 1) as i32))))
            }
            Scalar::Sint64 => {
                let v = varint(buf)?;
                Got::Int(((v >> 1) as i64) ^ (-((v & 1) as i64)))
            }
            Scalar::Bool => Got::Bool(varint(buf)? != 0),
            Scalar::Enum(_) => Got::Enum(varint(buf)? as i32),
            Scalar::Fixed32 => Got::Uint(u64::from(u32::from_le_bytes(fixed(buf)?))),
            Scalar::Sfixed32 => Got::Int(i64::from(i32::from_le_bytes(fixed(buf)?))),
            Scalar::Float => Got::Float(f64::from(f32::from_le_bytes(fixed(buf)?))),
            Scalar::Fixed64 => Got::Uint(u64::from_le_bytes(fixed(buf)?)),
            Scalar::Sfixed64 => Got::Int(i64::from_le_bytes(fixed(buf)?)),
            Scalar::Double => Got::Float(f64::from_le_bytes(fixed(buf)?)),
            Scalar::String => {
                let len = varint(buf)?;
                let text = take_len(buf, len)?;
                if std::str::from_utf8(text).is_err() {
                    return fail("invalid string value: data is not UTF-8 encoded");
                }
                let start = (text.as_ptr() as usize - self.base) as u32;
                Got::Text {
                    start,
                    end: start + text.len() as u32,
                }
            }
            Scalar::Bytes => {
                let len = varint(buf)?;
                take_len(buf, len)?;
                Got::Other
            }
            Scalar::Message(plan) => {
                if ctx == 0 {
                    return fail("recursion limit reached");
                }
                let len = varint(buf)?;
                let mut inner = take_len(buf, len)?;
                let wants = want.map_or(&[][..], |w| &w.inner[..]);
                self.fields(&mut inner, plan, ctx - 1, None, wants, got)?;
                Got::Other
            }
            Scalar::Group(plan) => {
                if ctx == 0 {
                    return fail("recursion limit reached");
                }
                let wants = want.map_or(&[][..], |w| &w.inner[..]);
                self.fields(buf, plan, ctx - 1, Some(number), wants, got)?;
                Got::Other
            }
            Scalar::Timestamp(plan) => {
                if ctx == 0 {
                    return fail("recursion limit reached");
                }
                let len = varint(buf)?;
                let mut inner = take_len(buf, len)?;
                // seconds (1, int64) and nanos (2, int32), the last of each.
                let (mut secs, mut nanos) = (i64::MIN, i32::MIN);
                let plan_ref = &self.schema.plans[plan];
                while inner.has_remaining() {
                    let (inner_number, wire) = decode_key(&mut inner).or_else(prost_fail)?;
                    if wire == WireType::EndGroup {
                        return fail("unexpected end group tag");
                    }
                    match plan_ref.field(inner_number) {
                        Some(f) => match self.value(
                            &mut inner,
                            inner_number,
                            f.kind,
                            wire,
                            ctx - 1,
                            None,
                            &mut [],
                        )? {
                            Got::Int(v) if inner_number == 1 => secs = v,
                            Got::Int(v) if inner_number == 2 => nanos = v as i32,
                            _ => {}
                        },
                        None => self.unknown(&mut inner, inner_number, wire, ctx - 1)?,
                    }
                }
                Got::Time(secs, nanos)
            }
        })
    }
}

/// Clears what `want` (and what it holds) found: a member of a `oneof`
/// another member replaced.
fn clear(want: &Want, got: &mut [Got]) {
    got[want.slot] = Got::Missing;
    for w in &want.inner {
        clear(w, got);
    }
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return fail("buffer underflow");
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn take_len<'a>(buf: &mut &'a [u8], len: u64) -> Result<&'a [u8], DecodeError> {
    if len > buf.len() as u64 {
        return fail("buffer underflow");
    }
    take(buf, len as usize)
}

fn fixed<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], DecodeError> {
    let bytes = take(buf, N)?;
    Ok(bytes.try_into().expect("N bytes"))
}
