//! The fast path of [`super::event`]: one pass over an event of the
//! usual shape, eight bytes at a time through strings, that finds the
//! top-level key and the captured fields without serde.
//!
//! It is a *recognizer*, never a judge: it answers only for a document it
//! has read to the end as well-formed JSON under the rules serde_json
//! applies to it (RFC 8259; nested values skipped as serde_json's
//! `IgnoredAny` skips them, `\u` escapes in skipped strings needing only
//! four hex digits). Anything else — an error, a key with escapes, a top
//! level that is not an object, nesting deeper than 64 — gives `None`, and
//! the caller reads the event with serde_json, which then decides (and
//! words the error). Values serde_json must *parse* rather than skip (the
//! key's value unless it is plain text, a captured number, object or
//! array, or text with escapes) are handed to serde_json on their own
//! bytes, so their meaning (numbers out of range, lone surrogates) is
//! serde_json's too. The property tests below hold the two paths equal.

use std::borrow::Cow;

use serde::de::{Deserialize, DeserializeSeed};

use super::event::{IdValue, Seen, SeenSeed, TopLevel, seen_text};

/// Reads `text` as [`super::event`]'s serde path would with `name` the
/// key (if any) and `capture` the captured fields (`seen` filled as it
/// would be), or `None` if it cannot tell: then `seen` is unspecified.
pub(super) fn top_level<'a, S: AsRef<str>>(
    text: &'a str,
    name: Option<&str>,
    capture: &[S],
    seen: &mut [Seen],
) -> Option<TopLevel<'a>> {
    let mut s = Scan { text, at: 0 };
    s.space();
    s.eat(b'{')?;
    s.space();
    let (mut ids, mut id) = (0u32, IdValue::NotString);
    if s.peek()? == b'}' {
        s.at += 1;
    } else {
        loop {
            let key = s.plain_key()?;
            let is_name = Some(key) == name;
            if is_name && ids == 0 {
                ids = 1;
                id = s.id_value()?;
                if let Some(k) = capture.iter().position(|c| Some(c.as_ref()) == name) {
                    seen[k] = match &id {
                        IdValue::Text(Cow::Borrowed(t)) => seen_text(t, text.as_ptr() as usize),
                        IdValue::Text(Cow::Owned(_)) => Seen::Escaped,
                        IdValue::NotString => Seen::Other,
                    };
                }
            } else if is_name {
                ids = ids.saturating_add(1);
                s.skip()?;
            } else {
                match capture.iter().position(|c| c.as_ref() == key) {
                    Some(k) if seen[k] == Seen::Missing => seen[k] = s.seen_value()?,
                    _ => s.skip()?,
                }
            }
            s.space();
            match s.peek()? {
                b',' => s.at += 1,
                b'}' => {
                    s.at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    s.space();
    (s.at == text.len()).then_some(TopLevel::Object { ids, id })
}

/// A cursor over the event.
struct Scan<'a> {
    text: &'a str,
    at: usize,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` that ends a run of plain string
/// bytes: `"`, `\` or a control character. Bits above the lowest may be
/// false (a borrow runs on), so only the lowest is used.
fn specials(w: u64) -> u64 {
    let quote = w ^ (ONES * u64::from(b'"'));
    let slash = w ^ (ONES * u64::from(b'\\'));
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    (zero(quote) | zero(slash) | (w.wrapping_sub(ONES * 0x20) & !w)) & HIGHS
}

impl<'a> Scan<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// How many plain string bytes start at the cursor.
    fn plain_run(&self) -> usize {
        let rest = &self.bytes()[self.at..];
        let mut n = 0;
        while let Some(chunk) = rest.get(n..n + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let ends = specials(w);
            if ends != 0 {
                return n + (ends.trailing_zeros() / 8) as usize;
            }
            n += 8;
        }
        n + rest[n..]
            .iter()
            .take_while(|&&c| c != b'"' && c != b'\\' && c >= 0x20)
            .count()
    }

    /// From just inside a string's opening quote to just past its closing
    /// one; whether it holds escapes.
    fn string(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            self.at += self.plain_run();
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match *self.bytes().get(self.at + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 2,
                        b'u' => {
                            let hex = self.bytes().get(self.at + 2..self.at + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.at += 6;
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }

    /// A key without escapes and its colon, spaces around them skipped.
    fn plain_key(&mut self) -> Option<&'a str> {
        self.space();
        self.eat(b'"')?;
        let start = self.at;
        if self.string()? {
            return None;
        }
        let key = self.text.get(start..self.at - 1)?;
        self.space();
        self.eat(b':')?;
        Some(key)
    }

    fn digits(&mut self) -> usize {
        let n = self.bytes()[self.at..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        self.at += n;
        n
    }

    /// A number by JSON's grammar (no leading zeros, digits after `.` and
    /// the exponent).
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => {
                self.at += 1;
                if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes().get(self.at..end)? == word).then(|| self.at = end)
    }

    /// Skips one value (spaces before it too) without recursion: the open
    /// containers are bits of `open` (1 for an object), at most 64.
    fn skip(&mut self) -> Option<()> {
        let (mut open, mut depth) = (0u64, 0u32);
        loop {
            self.space();
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    self.string()?;
                }
                c @ (b'{' | b'[') => {
                    self.at += 1;
                    if depth == 64 {
                        return None;
                    }
                    let object = c == b'{';
                    self.space();
                    if self.peek()? == if object { b'}' } else { b']' } {
                        self.at += 1;
                    } else {
                        open = open << 1 | u64::from(object);
                        depth += 1;
                        if object {
                            self.any_key()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // After a value: close what ends here, then the next value.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.space();
                let object = open & 1 == 1;
                match (self.peek()?, object) {
                    (b',', _) => {
                        self.at += 1;
                        if object {
                            self.any_key()?;
                        }
                        break;
                    }
                    (b'}', true) | (b']', false) => {
                        self.at += 1;
                        open >>= 1;
                        depth -= 1;
                    }
                    _ => return None,
                }
            }
        }
    }

    /// A key inside a skipped object (escapes allowed) and its colon.
    fn any_key(&mut self) -> Option<()> {
        self.space();
        self.eat(b'"')?;
        self.string()?;
        self.space();
        self.eat(b':')
    }

    /// Skips one value; its bytes, spaces before it excluded.
    fn value_text(&mut self) -> Option<&'a str> {
        self.space();
        let start = self.at;
        self.skip()?;
        self.text.get(start..self.at)
    }

    /// Plain text at the cursor (after spaces): its bytes; `None` (cursor
    /// unmoved) for anything else.
    fn plain_text(&mut self) -> Option<&'a str> {
        self.space();
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at + 1;
        let mut ahead = Scan {
            text: self.text,
            at: start,
        };
        if ahead.string()? {
            return None;
        }
        self.at = ahead.at;
        self.text.get(start..self.at - 1)
    }

    /// The key's value, as [`IdValue`] reads it.
    fn id_value(&mut self) -> Option<IdValue<'a>> {
        if let Some(text) = self.plain_text() {
            return Some(IdValue::Text(Cow::Borrowed(text)));
        }
        let value = self.value_text()?;
        IdValue::deserialize(&mut serde_json::Deserializer::from_str(value)).ok()
    }

    /// A captured value, as [`SeenSeed`] reads it.
    fn seen_value(&mut self) -> Option<Seen> {
        let base = self.text.as_ptr() as usize;
        if let Some(text) = self.plain_text() {
            return Some(seen_text(text, base));
        }
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| Seen::Bool(true)),
            b'f' => self.literal(b"false").map(|()| Seen::Bool(false)),
            b'n' => self.literal(b"null").map(|()| Seen::Null),
            _ => {
                let value = self.value_text()?;
                if let Some(x) = small_integer(value) {
                    return Some(Seen::Number(x));
                }
                let mut de = serde_json::Deserializer::from_str(value);
                SeenSeed(base).deserialize(&mut de).ok()
            }
        }
    }
}

/// `text` as a number if it is an integer of at most 18 digits, positive
/// or below zero: what serde_json gives for it (a `u64` or `i64`, as
/// `f64`). `-0` (which serde_json reads as `-0.0`) and every other number
/// are left to serde_json.
fn small_integer(text: &str) -> Option<f64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n = digits.bytes().fold(0i64, |n, c| n * 10 + i64::from(c - b'0'));
    match (negative, n) {
        (true, 0) => None,
        (true, n) => Some(-n as f64),
        (false, n) => Some(n as f64),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::event::serde_top_level;
    use super::*;
    use proptest::prelude::*;

    const CAPTURE: [&str; 3] = ["a", "b", "event_id"];

    /// Whether the fast path answered; panics if it answered other than
    /// serde_json.
    fn agrees(text: &str) -> bool {
        let with_key = agrees_naming(text, Some("event_id"));
        assert_eq!(agrees_naming(text, None), with_key, "{text:?}");
        with_key
    }

    /// As [`agrees`], with the key `name`.
    fn agrees_naming(text: &str, name: Option<&str>) -> bool {
        let mut fast_seen = [Seen::Missing; 3];
        let Some(fast) = top_level(text, name, &CAPTURE, &mut fast_seen) else {
            return false;
        };
        let mut seen = [Seen::Missing; 3];
        let slow = serde_top_level(text, name, &CAPTURE, &mut seen);
        assert_eq!(
            slow.as_ref().ok(),
            Some(&fast),
            "{text:?}: serde_json says {slow:?}"
        );
        assert_eq!(seen, fast_seen, "{text:?}");
        // -0.0 equals 0.0: the bits must agree too.
        for (a, b) in seen.iter().zip(&fast_seen) {
            if let (Seen::Number(a), Seen::Number(b)) = (a, b) {
                assert_eq!(a.to_bits(), b.to_bits(), "{text:?}");
            }
        }
        true
    }

    #[test]
    fn reads_the_usual_event() {
        let text = r#" {"event_id":"k1","a":12.5,"kind":"view","b":"sku\"9","x":[1,{"y":null}]} "#;
        assert!(agrees(text));
        let mut seen = [Seen::Missing; 3];
        let top = top_level(text, Some("event_id"), &CAPTURE, &mut seen).unwrap();
        assert_eq!(
            top,
            TopLevel::Object {
                ids: 1,
                id: IdValue::Text(Cow::Borrowed("k1"))
            }
        );
        assert_eq!(seen[0], Seen::Number(12.5));
        assert_eq!(seen[1], Seen::Escaped);
        assert_eq!(seen[2], Seen::Text { start: 14, end: 16 });
    }

    #[test]
    fn leaves_to_serde_what_it_must_not_judge() {
        let skipped_bad = [
            "01",
            "-",
            "1.",
            "1e",
            "1e+",
            ".5",
            "+1",
            "[1,]",
            "[,]",
            "{\"y\":1,}",
            "{\"y\"}",
            "{1:2}",
            "\"\\x\"",
            "\"\\u12G4\"",
            "\"a\u{1}\"",
            "tru",
            "nul",
            "[1 2]",
            "{\"y\":1 \"z\":2}",
            "\"open",
        ];
        for bad in skipped_bad {
            let text = format!(r#"{{"event_id":"a","x":{bad}}}"#);
            assert!(!agrees(&text), "{text}");
            assert!(serde_top_level(&text, Some("event_id"), &CAPTURE, &mut [Seen::Missing; 3]).is_err());
        }
        let not_read_here = [
            r#"{"event\u005fid":"a"}"#,      // a key with escapes
            r#"["event_id"]"#,               // not an object
            r#"{"event_id":"a"} x"#,         // trailing bytes
            r#"{"event_id":"a","a":1e400}"#, // a captured number out of range
            r#"{"event_id":"\ud800"}"#,      // the key's text must be decoded
        ];
        for text in not_read_here {
            assert!(!agrees(text), "{text}");
        }
        let deep = format!(r#"{{"event_id":"a","x":{}{}}}"#, "[".repeat(65), "]".repeat(65));
        assert!(!agrees(&deep));
    }

    #[test]
    fn reads_captured_integers_as_serde_does() {
        for n in [
            "0",
            "7",
            "-7",
            "123456789012345678",
            "-123456789012345678",
            "-0",
            "1234567890123456789",
            "1.5",
        ] {
            let text = format!(r#"{{"event_id":"a","a":{n}}}"#);
            assert!(agrees(&text), "{text}");
            let mut seen = [Seen::Missing; 3];
            serde_top_level(&text, None, &CAPTURE, &mut seen).unwrap();
            let Seen::Number(x) = seen[0] else {
                panic!("{n}: {:?}", seen[0])
            };
            assert_eq!(x.to_bits(), n.parse::<f64>().unwrap().to_bits(), "{n}");
        }
    }

    #[test]
    fn reads_what_serde_skips_as_serde_does() {
        for text in [
            r#"{"event_id":"a","x":"\ud800"}"#,
            r#"{"event_id":"a","x":{"\ud800":[]}}"#,
            r#"{"event_id":"a","x":-0.0e-0,"y":1E+9,"z":[[],{}]}"#,
            r#"{"event_id":"\u0041","a":"\n","b":[1]}"#,
            r#"{"event_id":7,"event_id":"b"}"#,
            r#"{}"#,
            "{\t\"a\"\r:\ntrue , \"b\":null,\"event_id\":{\"event_id\":1}}",
        ] {
            assert!(agrees(text), "{text}");
        }
        let deep = format!(r#"{{"event_id":"a","x":{}{}}}"#, "[".repeat(64), "]".repeat(64));
        assert!(agrees(&deep));
    }

    /// Any JSON value, its object keys often `event_id` or the captured
    /// `a` and `b` (also the event reader's tests' strategy).
    pub(in crate::engine) fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
            "[a-z0-9]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map("(event_id|a|b|.{0,4})", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(("(event_id|a|b|[a-z]{1,6})", json_value()), 0..8),
            any::<bool>(),
        )
            .prop_map(|(fields, pretty)| {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                    .collect();
                let text = format!("{{{}}}", body.join(","));
                if pretty {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    serde_json::to_string_pretty(&v).unwrap()
                } else {
                    text
                }
            })
    }

    /// Bytes that matter to JSON's grammar, and some that do not.
    const ALPHABET: &[u8] = b"{}[]\":,\\/ \t\n0123456789.eE+-trufalsnbxu\x01\x1f";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_object_of_plain_keys_is_read_as_serde_reads_it(text in object()) {
            prop_assert!(agrees(&text), "not read: {}", text);
        }

        #[test]
        fn an_edited_object_is_read_as_serde_reads_it_or_left_to_serde(
            text in object(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0..ALPHABET.len(), 0u8..3), 1..4),
        ) {
            let mut bytes = text.into_bytes();
            for (at, c, how) in edits {
                let at = at.index(bytes.len() + 1);
                match how {
                    0 => bytes.insert(at, ALPHABET[c]),
                    1 if at < bytes.len() => { bytes.remove(at); }
                    _ if at < bytes.len() => bytes[at] = ALPHABET[c],
                    _ => {}
                }
            }
            if let Ok(text) = String::from_utf8(bytes) {
                agrees(&text);
            }
        }

        #[test]
        fn any_text_of_json_bytes_is_read_as_serde_reads_it_or_left_to_serde(
            bytes in prop::collection::vec(prop::sample::select(ALPHABET), 0..64),
        ) {
            let mut text = String::from("{\"event_id\":");
            text.push_str(std::str::from_utf8(&bytes).unwrap());
            agrees(&text);
        }
    }
}
