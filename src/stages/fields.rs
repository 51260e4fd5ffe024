//! Reads the few top-level fields a stage needs from an event, without
//! building a DOM: keys are compared as they stream by, the wanted values
//! are read (text borrowed unless escaped), every other value is skipped,
//! and the reading stops as soon as every wanted field has been seen (the
//! event was validated when its key was read). Of a field given twice,
//! the first counts, as when the batch path reads the fields with the key
//! ([`crate::engine::event::field_capturing`]).

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
///
/// A scanner reads the usual event (keys and wanted texts without
/// escapes, finite numbers) at a fraction of serde_json's cost; anything
/// else it leaves to serde_json, which reads every JSON event.
pub fn read<'a>(event: &'a [u8], wanted: Wanted<'_>) -> Option<Found<'a>> {
    match scan::read(event, wanted) {
        Some(found) => found,
        None => read_with_serde(event, wanted),
    }
}

/// [`read`] through serde_json.
fn read_with_serde<'a>(event: &'a [u8], wanted: Wanted<'_>) -> Option<Found<'a>> {
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
            // The first occurrence of a field counts.
            let again = match key {
                Which::Group => found.group != Field::Missing,
                Which::Value => found.value != Field::Missing,
                Which::Time => found.time != Field::Missing,
                Which::Other => true,
            };
            if again {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
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

/// The scanner of [`read`]: `None` when it leaves the event to serde_json.
mod scan {
    use super::{Field, Found, Wanted};
    use std::borrow::Cow;

    struct Scan<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl<'a> Scan<'a> {
        fn peek(&self) -> Option<u8> {
            self.b.get(self.i).copied()
        }

        fn space(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
                self.i += 1;
            }
        }

        /// At `"`: the bytes up to the closing quote; `None` if they have
        /// an escape (or no end).
        fn raw_text(&mut self) -> Option<&'a [u8]> {
            let start = self.i + 1;
            let len = memchr::memchr2(b'"', b'\\', self.b.get(start..)?)?;
            if self.b[start + len] != b'"' {
                return None;
            }
            self.i = start + len + 1;
            Some(&self.b[start..start + len])
        }

        /// [`Self::raw_text`] as text.
        fn text(&mut self) -> Option<&'a str> {
            std::str::from_utf8(self.raw_text()?).ok()
        }

        /// At `"`: past the closing quote, escapes and all.
        fn skip_text(&mut self) -> Option<()> {
            self.i += 1;
            loop {
                self.i += memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
                if self.b[self.i] == b'"' {
                    self.i += 1;
                    return Some(());
                }
                self.i += 2;
            }
        }

        /// A number, finite; `None` otherwise.
        fn number(&mut self) -> Option<f64> {
            let start = self.i;
            while matches!(self.peek(), Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')) {
                self.i += 1;
            }
            let digits = &self.b[start..self.i];
            // Whole numbers of up to 15 digits are exact in an f64.
            let x = match digits {
                [b'-', rest @ ..]
                    if (1..=15).contains(&rest.len()) && rest.iter().all(u8::is_ascii_digit) =>
                {
                    -(whole(rest) as f64)
                }
                _ if (1..=15).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) => {
                    whole(digits) as f64
                }
                _ => std::str::from_utf8(digits).ok()?.parse::<f64>().ok()?,
            };
            x.is_finite().then_some(x)
        }

        /// Past one value of any type.
        fn skip_value(&mut self) -> Option<()> {
            match self.peek()? {
                b'"' => self.skip_text(),
                b'{' | b'[' => {
                    let mut depth = 0usize;
                    loop {
                        match self.peek()? {
                            b'"' => {
                                self.skip_text()?;
                                continue;
                            }
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' => {
                                depth -= 1;
                                if depth == 0 {
                                    self.i += 1;
                                    return Some(());
                                }
                            }
                            _ => {}
                        }
                        self.i += 1;
                    }
                }
                _ => {
                    while !matches!(self.peek()?, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                        self.i += 1;
                    }
                    Some(())
                }
            }
        }
    }

    fn whole(digits: &[u8]) -> u64 {
        digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0'))
    }

    pub(super) fn read<'a>(event: &'a [u8], wanted: Wanted<'_>) -> Option<Option<Found<'a>>> {
        let mut found = Found {
            group: Field::Missing,
            value: Field::Missing,
            time: Field::Missing,
        };
        let mut s = Scan { b: event, i: 0 };
        s.space();
        if s.peek()? != b'{' {
            // Not an object: nothing to read (serde_json agrees).
            return Some(None);
        }
        s.i += 1;
        s.space();
        if s.peek()? == b'}' {
            return Some(Some(found));
        }
        let (group, value, time) = (
            wanted.group.as_bytes(),
            wanted.value.as_bytes(),
            wanted.time.as_bytes(),
        );
        loop {
            if s.peek()? != b'"' {
                return None;
            }
            let key = s.raw_text()?;
            s.space();
            if s.peek()? != b':' {
                return None;
            }
            s.i += 1;
            s.space();
            let at = s.peek()?;
            // The first occurrence of a field counts.
            let again = (key == group && found.group != Field::Missing)
                || (key == value && found.value != Field::Missing)
                || (key == time && found.time != Field::Missing);
            if again {
                s.skip_value()?;
            } else if key == group {
                found.group = if at == b'"' {
                    Field::Found(Cow::Borrowed(s.text()?))
                } else {
                    s.skip_value()?;
                    Field::Wrong
                };
            } else if key == value || (!time.is_empty() && key == time) {
                let v = if at == b'-' || at.is_ascii_digit() {
                    Field::Found(s.number()?)
                } else {
                    s.skip_value()?;
                    Field::Wrong
                };
                if key == value {
                    found.value = v;
                } else {
                    found.time = v;
                }
            } else {
                s.skip_value()?;
            }
            if found.complete(&wanted) {
                return Some(Some(found));
            }
            s.space();
            match s.peek()? {
                b',' => {
                    s.i += 1;
                    s.space();
                }
                b'}' => return Some(Some(found)),
                _ => return None,
            }
        }
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

    #[test]
    fn the_scanner_reads_what_serde_json_reads() {
        let events: &[&[u8]] = &[
            br#"{"event_id":"a1","nested":{"metric_name":"x","q":"}\"]"},"metric_name":"temp","list":[1,{"a":[2,"]"]}],"metric_value":-2.5e1,"timestamp":1678886400}"#,
            br#" { "metric_value" : 12 , "metric_name" : "a b" , "timestamp" : 1.5 } "#,
            br#"{"metric_name":"t\u00e9","metric_value":1,"timestamp":2}"#,
            br#"{"metric_n\u0061me":"x","metric_value":1,"timestamp":2}"#,
            br#"{"metric_name":7,"metric_value":"12","timestamp":null}"#,
            br#"{"metric_value":true,"metric_value":-0,"metric_name":"a","timestamp":1e400}"#,
            br#"{"metric_name":"a","metric_value":1,"timestamp":5,"metric_value":2}"#,
            br#"{"metric_value":123456789012345678901234,"metric_name":"","timestamp":-7}"#,
            br#"{"a":"\\","b":[[[]]],"c":{},"d":false,"metric_name":"z"}"#,
            br#"{"metric_value":0.1,"metric_name":"\u2603","timestamp":0}"#,
            b"{}",
            b" {\n}",
            b"[1]",
            b"\"x\"",
        ];
        for e in events {
            assert_eq!(
                read(e, W),
                read_with_serde(e, W),
                "{}",
                String::from_utf8_lossy(e)
            );
        }
        // The usual shapes are the scanner's, not left to serde_json.
        for i in [0, 1, 4, 6, 7, 8, 10, 11, 12, 13] {
            assert!(scan::read(events[i], W).is_some(), "event {i}");
        }
    }
}
