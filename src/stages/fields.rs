//! Reads the few top-level fields a stage needs from an event, without
//! building a DOM: keys are compared as they stream by, the wanted values
//! are read (text borrowed unless escaped), every other value is skipped,
//! and the reading stops as soon as every wanted field has been seen (the
//! event was validated when its key was read).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The names of the fields wanted.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub group: &'a str,
    pub value: &'a str,
    /// Empty: no time field (arrival time).
    pub time: &'a str,
}

/// A field's value as a stage sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<T> {
    Missing,
    /// Present, but not of the wanted type.
    Wrong,
    Found(T),
}

/// What an event holds of the wanted fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Found<'a> {
    pub group: Field<Cow<'a, str>>,
    pub value: Field<f64>,
    pub time: Field<f64>,
}

impl Found<'_> {
    fn complete(&self, wanted: &Wanted<'_>) -> bool {
        !matches!(self.group, Field::Missing)
            && !matches!(self.value, Field::Missing)
            && (wanted.time.is_empty() || !matches!(self.time, Field::Missing))
    }
}

/// Reads `wanted` from `event`; `None` if it is not a JSON object (an
/// accepted event always is).
pub fn read<'a>(event: &'a [u8], wanted: Wanted<'_>) -> Option<Found<'a>> {
    let mut found = Found {
        group: Field::Missing,
        value: Field::Missing,
        time: Field::Missing,
    };
    let mut de = serde_json::Deserializer::from_slice(event);
    let read = Reader {
        wanted,
        found: &mut found,
    }
    .deserialize(&mut de);
    // Stopping early is an error to the parser, not to the reader.
    (read.is_ok() || found.complete(&wanted)).then_some(found)
}

/// Fills `found` as the map streams by.
struct Reader<'w, 'f, 'a> {
    wanted: Wanted<'w>,
    found: &'f mut Found<'a>,
}

impl<'a> DeserializeSeed<'a> for Reader<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'a> Visitor<'a> for Reader<'_, '_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'a>>(self, mut map: A) -> Result<(), A::Error> {
        let found = self.found;
        while let Some(key) = map.next_key_seed(Key(self.wanted))? {
            match key {
                Which::Group => {
                    found.group = match map.next_value::<Scalar<'a>>()? {
                        Scalar::Text(s) => Field::Found(s),
                        _ => Field::Wrong,
                    }
                }
                Which::Value | Which::Time => {
                    let v = match map.next_value::<Scalar<'a>>()? {
                        Scalar::Number(x) => Field::Found(x),
                        _ => Field::Wrong,
                    };
                    if key == Which::Value {
                        found.value = v;
                    } else {
                        found.time = v;
                    }
                }
                Which::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            }
            if found.complete(&self.wanted) {
                return Err(serde::de::Error::custom("every wanted field read"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Group,
    Value,
    Time,
    Other,
}

/// Matches a key against the wanted names without copying it.
struct Key<'a>(Wanted<'a>);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Which;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Which, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key<'_> {
    type Value = Which;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Which, E> {
        let w = self.0;
        Ok(if key == w.group {
            Which::Group
        } else if key == w.value {
            Which::Value
        } else if !w.time.is_empty() && key == w.time {
            Which::Time
        } else {
            Which::Other
        })
    }
}

/// A value read as a string, a number, or anything else (skipped).
enum Scalar<'a> {
    Text(Cow<'a, str>),
    Number(f64),
    Other,
}

impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Text(Cow::Owned(v.to_owned())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(v as f64))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Wanted = Wanted {
        group: "metric_name",
        value: "metric_value",
        time: "timestamp",
    };

    #[test]
    fn wanted_fields_are_read_and_the_rest_skipped() {
        let e = br#"{"event_id":"a1","nested":{"metric_name":"x"},"metric_name":"temp\u00e9","list":[1,{"a":2}],"metric_value":-2.5e1,"timestamp":1678886400}"#;
        assert_eq!(
            read(e, W),
            Some(Found {
                group: Field::Found("temp\u{e9}".into()),
                value: Field::Found(-25.0),
                time: Field::Found(1_678_886_400.0),
            })
        );
        let e = br#"{"metric_name":7,"metric_value":"12","timestamp":null}"#;
        assert_eq!(
            read(e, W),
            Some(Found {
                group: Field::Wrong,
                value: Field::Wrong,
                time: Field::Wrong
            })
        );
        let none = Found {
            group: Field::Missing,
            value: Field::Missing,
            time: Field::Missing,
        };
        assert_eq!(read(b"{}", W), Some(none));
        assert_eq!(read(b"[1]", W), None);
        let arrival = Wanted { time: "", ..W };
        assert_eq!(read(br#"{"timestamp":5}"#, arrival).unwrap().time, Field::Missing);
    }
}
