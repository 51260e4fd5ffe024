//! Reads the few top-level fields a stage needs from an event, without
//! building a DOM: keys are compared as they stream by, the wanted values
//! are read, every other value is skipped.

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
pub struct Found {
    pub group: Field<String>,
    pub value: Field<f64>,
    pub time: Field<f64>,
}

/// Reads `wanted` from `event`; `None` if it is not a JSON object (an
/// accepted event always is).
pub fn read(event: &[u8], wanted: Wanted<'_>) -> Option<Found> {
    let mut de = serde_json::Deserializer::from_slice(event);
    wanted.deserialize(&mut de).ok()
}

impl<'de> DeserializeSeed<'de> for Wanted<'_> {
    type Value = Found;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Wanted<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found {
            group: Field::Missing,
            value: Field::Missing,
            time: Field::Missing,
        };
        while let Some(key) = map.next_key_seed(Key(self))? {
            match key {
                Which::Group => {
                    found.group = match map.next_value::<Scalar>()? {
                        Scalar::Text(s) => Field::Found(s),
                        _ => Field::Wrong,
                    }
                }
                Which::Value | Which::Time => {
                    let v = match map.next_value::<Scalar>()? {
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
                }
            }
        }
        Ok(found)
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
enum Scalar {
    Text(String),
    Number(f64),
    Other,
}

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(v.to_owned()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Number(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Number(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Number(v as f64))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
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
