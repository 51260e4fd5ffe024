//! What makes two events the same: the dedup key (`key` in the
//! configuration).
//!
//! | `key` | the id |
//! |---|---|
//! | `"event_id"` (default), or another top-level field `"id"` | the field's text, under the `event_id` rules (non-empty, `a-z A-Z 0-9`, at most `max_id_bytes`) |
//! | a dotted path `"device.serial"` | hashed (below), from the value at that path |
//! | a list `["node_id", "timestamp", "category"]` (each may be a path) | hashed, from the values together |
//! | `"content"` | hashed, from the event's bytes as received |
//!
//! A hashed id is the 32 hex digits of XXH3-128 over the key's canonical
//! bytes: for fields, the JSON array of their values (strings and numbers
//! as JSON writes them, so `1` and `1.0` differ); for `content`, the event
//! itself. Being `a-z 0-9`, it is the id everywhere an id goes: the shard
//! (FNV-1a-32 of it), the fingerprint, the look-up and forget subjects, and
//! `Nats-Msg-Id`. Fields must hold a string or a number; a missing field or
//! another type gets a 400 naming it. Hashed keys read the event into a
//! DOM; the top-level field keys do not.

use std::borrow::Cow;

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use crate::engine::event::{self, EventError, EventErrorKind, Limits};

/// How the key of an event is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// A top-level text field, the id itself.
    Field(String),
    /// Values at these paths (each a list of keys from the top), hashed.
    Fields(Vec<Vec<String>>),
    /// The event's bytes, hashed.
    Content,
}

impl Default for KeySpec {
    fn default() -> Self {
        Self::Field("event_id".into())
    }
}

impl KeySpec {
    /// From the configuration: one name (`"event_id"`, `"a.b"`,
    /// `"content"`) or several.
    ///
    /// # Errors
    ///
    /// An empty list, name or path segment.
    pub fn parse(names: &[String]) -> Result<Self, String> {
        let path = |name: &str| -> Result<Vec<String>, String> {
            let parts: Vec<String> = name.split('.').map(str::to_owned).collect();
            if parts.iter().any(String::is_empty) {
                return Err(format!("{name:?}: a field name, or a path like \"a.b\""));
            }
            Ok(parts)
        };
        match names {
            [] => Err("at least one field".into()),
            [one] if one == "content" => Ok(Self::Content),
            [one] if !one.contains('.') && !one.is_empty() => Ok(Self::Field(one.clone())),
            many => Ok(Self::Fields(
                many.iter().map(|n| path(n)).collect::<Result<_, _>>()?,
            )),
        }
    }

    /// As [`Self::id_of`], and reads the top-level fields `capture` into
    /// `seen` in the same pass; returns whether it did (a top-level field
    /// key only: the other keys leave them to be read again).
    ///
    /// # Errors
    ///
    /// As [`Self::id_of`].
    pub fn id_capturing<'a>(
        &self,
        event: &'a [u8],
        limits: &Limits,
        capture: &[String],
        seen: &mut [event::Seen],
    ) -> Result<(Cow<'a, str>, bool), EventError> {
        match self {
            Self::Field(name) => {
                event::field_capturing(event, name, limits, capture, seen).map(|id| (id, true))
            }
            _ => self.id_of(event, limits).map(|id| (id, false)),
        }
    }

    /// The id of `event`: borrowed for a field, else its hash in hex.
    ///
    /// # Errors
    ///
    /// The [`EventError`] of the first rule the event breaks.
    pub fn id_of<'a>(&self, event: &'a [u8], limits: &Limits) -> Result<Cow<'a, str>, EventError> {
        match self {
            Self::Field(name) => event::field(event, name, limits),
            Self::Content => {
                object(event, limits)?;
                Ok(Cow::Owned(hashed(event)))
            }
            Self::Fields(paths) => {
                let top = object(event, limits)?;
                let mut values = Vec::with_capacity(paths.len());
                for path in paths {
                    let name = path.join(".");
                    let value = path
                        .iter()
                        .try_fold(&top, |v, key| v.as_object().and_then(|o| o.get(key)))
                        .ok_or_else(|| EventError::new(EventErrorKind::MissingId).about(&name))?;
                    if !(value.is_string() || value.is_number()) {
                        return Err(EventError::new(EventErrorKind::IdNotString)
                            .about(&name)
                            .or_number());
                    }
                    values.push(value);
                }
                let canonical = serde_json::to_vec(&values).map_err(EventError::not_json)?;
                Ok(Cow::Owned(hashed(&canonical)))
            }
        }
    }
}

/// `event` read as a JSON object, within the size limit.
fn object(event: &[u8], limits: &Limits) -> Result<Value, EventError> {
    if event.len() > limits.max_event_bytes {
        return Err(event::too_large(limits.max_event_bytes));
    }
    let value: Value = serde_json::from_slice(event).map_err(EventError::not_json)?;
    if !value.is_object() {
        return Err(EventError::new(EventErrorKind::NotObject));
    }
    Ok(value)
}

pub(crate) fn hashed(bytes: &[u8]) -> String {
    format!("{:032x}", xxh3_128(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(names: &[&str]) -> KeySpec {
        KeySpec::parse(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn each_kind_of_key() {
        let limits = Limits::default();
        let e =
            br#"{"node_id":"n1","timestamp":1678886400,"category":"cpu","device":{"serial":"S9"},"id":"x1"}"#;
        assert_eq!(spec(&["id"]).id_of(e, &limits).unwrap(), "x1");
        let same_order = br#"{"category":"cpu","timestamp":1678886400,"node_id":"n1","other":true}"#;
        let fields = spec(&["node_id", "timestamp", "category"]);
        let a = fields.id_of(e, &limits).unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(
            a,
            fields.id_of(same_order, &limits).unwrap(),
            "other fields and order do not matter"
        );
        let later = br#"{"node_id":"n1","timestamp":1678886401,"category":"cpu"}"#;
        assert_ne!(a, fields.id_of(later, &limits).unwrap());
        let serial = spec(&["device.serial"]);
        assert_eq!(serial.id_of(e, &limits).unwrap(), hashed(br#"["S9"]"#));
        let content = spec(&["content"]);
        assert_ne!(
            content.id_of(e, &limits).unwrap(),
            content.id_of(same_order, &limits).unwrap()
        );

        let err = |spec: &KeySpec, e: &[u8]| spec.id_of(e, &limits).unwrap_err().to_string();
        assert_eq!(
            err(&fields, br#"{"node_id":"n1","timestamp":1}"#),
            "event has no top-level \"category\""
        );
        assert_eq!(
            err(&fields, br#"{"node_id":"n1","timestamp":[1],"category":"c"}"#),
            "\"timestamp\" is not a string or a number"
        );
        assert_eq!(
            err(&serial, br#"{"device":"S9"}"#),
            "event has no top-level \"device.serial\""
        );
        assert_eq!(
            err(&spec(&["id"]), br#"{"id":"a-b"}"#),
            "\"id\" may only contain a-z, A-Z and 0-9"
        );
        assert!(err(&content, b"[1]").contains("not a JSON object"));
        assert!(err(&content, b"{").contains("not valid JSON"));
        assert!(KeySpec::parse(&[]).is_err());
        assert!(KeySpec::parse(&["a..b".into()]).is_err());
    }
}
