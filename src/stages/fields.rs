//! The few top-level fields a stage reads from an accepted event, as it
//! sees them (text, number, missing or of the wrong type). They are read
//! by the engine's one reader of top-level fields for the input's format:
//! with the key on the batch path ([`Format::id_capturing`]), on their own
//! otherwise ([`Format::capture`]); so the key and the stages agree on
//! every event. Of a JSON field given twice the first counts; of a
//! protobuf field, the last (as protobuf's decoders read it).

use std::borrow::Cow;

use crate::engine::event::Seen;
use crate::engine::input::Format;

/// The names of the fields wanted.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub group: &'a str,
    pub value: &'a str,
    /// Empty: no time field (arrival time).
    pub time: &'a str,
    /// The item `top(k)` ranks (e.g. `product_id`); empty: none.
    pub item: &'a str,
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
    pub item: Field<Cow<'a, str>>,
}

/// Reads `wanted` from `event`; `None` if it is not a JSON object (an
/// accepted event always is).
pub fn read<'a>(format: &Format, event: &'a [u8], wanted: Wanted<'_>) -> Option<Found<'a>> {
    let names = [wanted.group, wanted.value, wanted.time, wanted.item];
    let mut seen = [Seen::Missing; 4];
    format
        .capture(event, &names, &mut seen)
        .then(|| found(format, event, &seen, [0, 1, 2, 3], wanted))
}

/// The wanted fields of `event` from what the reader saw: the group at
/// `seen[at[0]]`, the value at `seen[at[1]]`, the time at `seen[at[2]]`
/// (if `wanted.time` is set), the item at `seen[at[3]]` (if
/// `wanted.item` is set). An escaped text is decoded by reading the event
/// again.
pub fn found<'a>(
    format: &Format,
    event: &'a [u8],
    seen: &[Seen],
    at: [usize; 4],
    wanted: Wanted<'_>,
) -> Found<'a> {
    let number = |seen: Seen| match seen {
        Seen::Missing => Field::Missing,
        Seen::Number(x) => Field::Found(x),
        _ => Field::Wrong,
    };
    let text = |seen: Seen, name: &str| match seen {
        Seen::Missing => Field::Missing,
        Seen::Text { start, end } => match event.get(start as usize..end as usize).map(std::str::from_utf8) {
            Some(Ok(text)) => Field::Found(Cow::Borrowed(text)),
            _ => format.text(event, name).map_or(Field::Wrong, Field::Found),
        },
        Seen::Escaped => format.text(event, name).map_or(Field::Wrong, Field::Found),
        Seen::Symbol(name) => Field::Found(Cow::Borrowed(name)),
        Seen::Number(_) | Seen::Bool(_) | Seen::Null | Seen::Other => Field::Wrong,
    };
    Found {
        group: text(seen[at[0]], wanted.group),
        item: if wanted.item.is_empty() {
            Field::Missing
        } else {
            text(seen[at[3]], wanted.item)
        },
        value: number(seen[at[1]]),
        time: if wanted.time.is_empty() {
            Field::Missing
        } else {
            number(seen[at[2]])
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Wanted = Wanted {
        group: "metric_name",
        value: "metric_value",
        time: "timestamp",
        item: "",
    };

    #[test]
    fn wanted_fields_are_read_and_the_rest_skipped() {
        let e = br#"{"event_id":"a1","nested":{"metric_name":"x"},"metric_name":"temp\u00e9","list":[1,{"a":2}],"metric_value":-2.5e1,"timestamp":1678886400}"#;
        assert_eq!(
            read(&Format::Json, e, W),
            Some(Found {
                group: Field::Found("temp\u{e9}".into()),
                value: Field::Found(-25.0),
                time: Field::Found(1_678_886_400.0),
                item: Field::Missing,
            })
        );
        let e = br#"{"metric_name":7,"metric_value":"12","timestamp":null}"#;
        assert_eq!(
            read(&Format::Json, e, W),
            Some(Found {
                group: Field::Wrong,
                value: Field::Wrong,
                time: Field::Wrong,
                item: Field::Missing,
            })
        );
        let none = Found {
            group: Field::Missing,
            value: Field::Missing,
            time: Field::Missing,
            item: Field::Missing,
        };
        assert_eq!(read(&Format::Json, b"{}", W), Some(none));
        assert_eq!(read(&Format::Json, b"[1]", W), None);
        let arrival = Wanted { time: "", ..W };
        assert_eq!(
            read(&Format::Json, br#"{"timestamp":5}"#, arrival).unwrap().time,
            Field::Missing
        );
    }

    #[test]
    fn the_stages_read_what_the_key_path_captured() {
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
        let names: Vec<String> = [W.group, W.value, W.time].map(String::from).to_vec();
        let limits = crate::engine::event::Limits::default();
        let mut compared = 0;
        for e in events {
            let with_key: Vec<u8> = [&br#"{"event_id":"k1","#[..], &e.trim_ascii()[1..]].concat();
            let mut seen = [Seen::Missing; 3];
            let keyed =
                crate::engine::event::field_capturing(&with_key, "event_id", &limits, &names, &mut seen);
            if keyed.is_err() || !e.trim_ascii().starts_with(b"{") || e.trim_ascii().len() < 3 {
                continue;
            }
            assert_eq!(
                read(&Format::Json, &with_key, W),
                Some(found(&Format::Json, &with_key, &seen, [0, 1, 2, 0], W)),
                "{}",
                String::from_utf8_lossy(&with_key)
            );
            compared += 1;
        }
        assert!(compared >= 8, "compared {compared} events");
        // Of a field given twice, the first counts.
        let e = br#"{"metric_name":"a","metric_value":1,"timestamp":5,"metric_value":2,"metric_name":"b"}"#;
        let read = read(&Format::Json, e, W).unwrap();
        assert_eq!(
            (read.group, read.value),
            (Field::Found("a".into()), Field::Found(1.0))
        );
    }
}
