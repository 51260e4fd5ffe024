//! The protobuf wire-format scan held to prost-reflect's decoder as the
//! oracle: over generated and mutated messages of a schema with every kind
//! of field, the scan accepts exactly what `DynamicMessage::decode`
//! accepts, and reads the same value of every top-level field.

use std::path::PathBuf;

use eventsieve::config::input_config::compile;
use eventsieve::engine::event::{Limits, Seen};
use eventsieve::engine::input::Format;
use eventsieve::engine::key::KeySpec;
use eventsieve::engine::proto::Schema;
use proptest::prelude::*;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value};

fn schema() -> Schema {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/proto");
    let (pool, _) = compile(&[dir], &[PathBuf::from("everything.proto")]).expect("the test schema compiles");
    Schema::new(pool, "test.v1.All").unwrap()
}

/// A small deterministic generator, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn varint_value(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => self.below(128),
            2 => self.below(1 << 20),
            3 => u64::MAX - self.below(3),
            4 => (self.next() as i32) as i64 as u64,
            _ => self.next(),
        }
    }

    fn text(&mut self) -> Vec<u8> {
        const PARTS: [&str; 6] = ["a", "Z9", "é", "日本", "", "x y"];
        let mut out = String::new();
        for _ in 0..self.below(4) {
            out.push_str(PARTS[self.below(PARTS.len() as u64) as usize]);
        }
        out.into_bytes()
    }
}

fn wire_of(field: &FieldDescriptor) -> WireType {
    if field.is_map() {
        return WireType::LengthDelimited;
    }
    match field.kind() {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => WireType::SixtyFourBit,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => WireType::ThirtyTwoBit,
        Kind::String | Kind::Bytes => WireType::LengthDelimited,
        Kind::Message(_) if field.is_group() => WireType::StartGroup,
        Kind::Message(_) => WireType::LengthDelimited,
        _ => WireType::Varint,
    }
}

fn any_wire(rng: &mut Rng) -> WireType {
    [
        WireType::Varint,
        WireType::SixtyFourBit,
        WireType::LengthDelimited,
        WireType::StartGroup,
        WireType::EndGroup,
        WireType::ThirtyTwoBit,
    ][rng.below(6) as usize]
}

/// Fields of `message`, mostly well formed.
fn fields(rng: &mut Rng, message: &MessageDescriptor, depth: u32, out: &mut Vec<u8>) {
    let known: Vec<FieldDescriptor> = message.fields().collect();
    for _ in 0..rng.below(7) {
        let (number, field) = if !known.is_empty() && rng.chance(85) {
            let f = known[rng.below(known.len() as u64) as usize].clone();
            (f.number(), Some(f))
        } else {
            (1 + rng.below(400) as u32, None)
        };
        let wire = match &field {
            Some(f) if rng.chance(92) => {
                let packable =
                    f.is_list() && !matches!(f.kind(), Kind::String | Kind::Bytes | Kind::Message(_));
                if packable && rng.chance(50) {
                    WireType::LengthDelimited
                } else {
                    wire_of(f)
                }
            }
            _ => any_wire(rng),
        };
        value(rng, number, field.as_ref(), wire, depth, out);
    }
}

fn value(
    rng: &mut Rng,
    number: u32,
    field: Option<&FieldDescriptor>,
    wire: WireType,
    depth: u32,
    out: &mut Vec<u8>,
) {
    encode_key(number, wire, out);
    match wire {
        WireType::Varint => encode_varint(rng.varint_value(), out),
        WireType::ThirtyTwoBit => out.extend_from_slice(&(rng.next() as u32).to_le_bytes()),
        WireType::SixtyFourBit => {
            let v = if rng.chance(20) {
                f64::NAN.to_bits()
            } else {
                rng.next()
            };
            out.extend_from_slice(&v.to_le_bytes());
        }
        WireType::LengthDelimited => {
            let mut inner = Vec::new();
            match field.map(|f| (f.kind(), f.is_list() || f.is_map())) {
                Some((Kind::Message(m), _)) if depth < 5 => fields(rng, &m, depth + 1, &mut inner),
                Some((Kind::String, _)) if rng.chance(90) => inner = rng.text(),
                Some((kind, true)) if !matches!(kind, Kind::String | Kind::Bytes | Kind::Message(_)) => {
                    for _ in 0..rng.below(4) {
                        match kind {
                            Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => {
                                inner.extend_from_slice(&rng.next().to_le_bytes())
                            }
                            Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => {
                                inner.extend_from_slice(&(rng.next() as u32).to_le_bytes())
                            }
                            _ => encode_varint(rng.varint_value(), &mut inner),
                        }
                    }
                }
                _ => {
                    for _ in 0..rng.below(6) {
                        inner.push(rng.next() as u8);
                    }
                }
            }
            encode_varint(inner.len() as u64, out);
            out.extend_from_slice(&inner);
        }
        WireType::StartGroup => {
            if depth < 5 {
                match field.map(|f| f.kind()) {
                    Some(Kind::Message(m)) => fields(rng, &m, depth + 1, out),
                    _ => {
                        if rng.chance(50) {
                            let inner = 1 + rng.below(5) as u32;
                            value(rng, inner, None, WireType::Varint, depth + 1, out);
                        }
                    }
                }
            }
            let end = if rng.chance(90) {
                number
            } else {
                1 + rng.below(400) as u32
            };
            encode_key(end, WireType::EndGroup, out);
        }
        WireType::EndGroup => {}
    }
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        if bytes.is_empty() {
            bytes.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(bytes.len() as u64) as usize;
        match rng.below(4) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => {
                bytes.remove(at);
            }
            2 => bytes.insert(at, rng.next() as u8),
            _ => bytes.truncate(at),
        }
    }
}

/// What the scan should read of `field` in `message`, from the decoder.
fn expected(message: &DynamicMessage, field: &FieldDescriptor) -> Expected {
    if field.is_list() || field.is_map() {
        return if message.has_field(field) {
            Expected::Other
        } else {
            Expected::Missing
        };
    }
    if field.supports_presence() && !message.has_field(field) {
        return Expected::Missing;
    }
    match &*message.get_field(field) {
        Value::String(s) => Expected::Text(s.clone()),
        Value::Bool(b) => Expected::Bool(*b),
        Value::I32(v) => Expected::Number(f64::from(*v)),
        Value::I64(v) => Expected::Number(*v as f64),
        Value::U32(v) => Expected::Number(f64::from(*v)),
        Value::U64(v) => Expected::Number(*v as f64),
        Value::F32(v) => Expected::Number(f64::from(*v)),
        Value::F64(v) => Expected::Number(*v),
        Value::EnumNumber(n) => match &field.kind() {
            Kind::Enum(e) => match e.get_value(*n) {
                Some(v) => Expected::Text(v.name().to_owned()),
                None => Expected::Number(f64::from(*n)),
            },
            _ => unreachable!(),
        },
        Value::Message(m) if m.descriptor().full_name() == "google.protobuf.Timestamp" => {
            let t: prost_types::Timestamp = m.transcode_to().unwrap();
            Expected::Number(t.seconds as f64 + f64::from(t.nanos) * 1e-9)
        }
        _ => Expected::Other,
    }
}

#[derive(Debug, PartialEq)]
enum Expected {
    Missing,
    Other,
    Bool(bool),
    Number(f64),
    Text(String),
}

fn same(event: &[u8], seen: Seen, want: &Expected) -> bool {
    match (seen, want) {
        (Seen::Missing, Expected::Missing) | (Seen::Other, Expected::Other) => true,
        (Seen::Bool(a), Expected::Bool(b)) => a == *b,
        (Seen::Number(a), Expected::Number(b)) => a == *b || a.is_nan() && b.is_nan(),
        (Seen::Text { start, end }, Expected::Text(t)) => {
            &event[start as usize..end as usize] == t.as_bytes()
        }
        (Seen::Symbol(s), Expected::Text(t)) => s == t,
        _ => false,
    }
}

fn check(schema: &Schema, bytes: &[u8]) -> Result<(), TestCaseError> {
    let names: Vec<String> = schema.message().fields().map(|f| f.name().to_owned()).collect();
    let mut seen = vec![Seen::Missing; names.len()];
    let scanned = schema.capture(bytes, &names, &mut seen);
    let decoded = DynamicMessage::decode(schema.message().clone(), bytes);
    prop_assert_eq!(
        scanned.is_ok(),
        decoded.is_ok(),
        "scan {:?}, decoder {:?}, bytes {:02x?}",
        scanned,
        decoded.as_ref().err(),
        bytes
    );
    if let Ok(message) = decoded {
        for (field, seen) in schema.message().fields().zip(&seen) {
            let want = expected(&message, &field);
            prop_assert!(
                same(bytes, *seen, &want),
                "field {}: scan {:?}, decoder {:?}, bytes {:02x?}",
                field.name(),
                seen,
                want,
                bytes
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6000, ..ProptestConfig::default() })]

    #[test]
    fn the_scan_accepts_and_reads_what_the_decoder_does(seed in any::<u64>(), mutations in 0u8..3) {
        let schema = schema();
        let mut rng = Rng(seed);
        let mut bytes = Vec::new();
        fields(&mut rng, schema.message(), 0, &mut bytes);
        if mutations > 0 {
            mutate(&mut rng, &mut bytes);
        }
        check(&schema, &bytes)?;
    }
}

/// Messages encoded by prost-reflect itself, from random values: every
/// one accepted, every value read back.
#[test]
fn messages_the_encoder_writes_are_read_back() {
    let schema = schema();
    let mut rng = Rng(7);
    for _ in 0..2000 {
        let mut bytes = Vec::new();
        fields(&mut rng, schema.message(), 0, &mut bytes);
        let Ok(message) = DynamicMessage::decode(schema.message().clone(), &bytes[..]) else {
            continue;
        };
        // Re-encoded: canonical field order, packed lists, one value each.
        check(&schema, &message.encode_to_vec()).unwrap();
    }
}

#[test]
fn nesting_is_limited_as_the_decoder_limits_it() {
    let schema = schema();
    // Inner.next nested `depth` times below All.inner.
    let nested = |depth: usize| {
        let mut inner = Vec::new();
        for _ in 0..depth {
            let mut outer = Vec::new();
            encode_key(3, WireType::LengthDelimited, &mut outer);
            encode_varint(inner.len() as u64, &mut outer);
            outer.extend_from_slice(&inner);
            inner = outer;
        }
        let mut all = Vec::new();
        encode_key(17, WireType::LengthDelimited, &mut all);
        encode_varint(inner.len() as u64, &mut all);
        all.extend_from_slice(&inner);
        all
    };
    for depth in [0, 50, 98, 99, 100, 101, 150] {
        let bytes = nested(depth);
        let decoded = DynamicMessage::decode(schema.message().clone(), &bytes[..]).is_ok();
        let scanned = schema.capture(&bytes, &["inner"], &mut [Seen::Missing]).is_ok();
        assert_eq!(scanned, decoded, "depth {depth}");
    }
    assert!(
        schema
            .capture(&nested(150), &["s"], &mut [Seen::Missing])
            .is_err()
    );
}

#[test]
fn keys_of_each_kind_and_their_errors() {
    let format = Format::protobuf(schema());
    let limits = Limits::default();
    let all = |build: &dyn Fn(&mut DynamicMessage)| {
        let mut m = DynamicMessage::new(schema().message().clone());
        build(&mut m);
        m.encode_to_vec()
    };
    let key = |spec: &[&str], bytes: &[u8]| {
        let spec = KeySpec::parse(&spec.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        format
            .id_of(&spec, bytes, &limits)
            .map(|id| id.into_owned())
            .map_err(|e| e.to_string())
    };
    let text = all(&|m| m.set_field_by_name("s", Value::String("abc123".into())));
    assert_eq!(key(&["s"], &text).unwrap(), "abc123");
    let number = all(&|m| m.set_field_by_name("u64", Value::U64(u64::MAX)));
    assert_eq!(key(&["u64"], &number).unwrap(), u64::MAX.to_string());
    let negative = all(&|m| m.set_field_by_name("i64", Value::I64(-5)));
    assert!(key(&["i64"], &negative).unwrap_err().contains("negative"));
    assert!(
        key(&["s"], &number)
            .unwrap_err()
            .contains("missing, empty or zero")
    );
    let bad = all(&|m| m.set_field_by_name("s", Value::String("a-b".into())));
    assert!(key(&["s"], &bad).unwrap_err().contains("a-z, A-Z and 0-9"));
    let double = all(&|m| m.set_field_by_name("db", Value::F64(2.5)));
    assert!(
        key(&["db"], &double)
            .unwrap_err()
            .contains("not a string or an integer")
    );
    let nested = all(&|m| {
        let mut inner = DynamicMessage::new(
            m.descriptor()
                .get_field_by_name("inner")
                .unwrap()
                .kind()
                .as_message()
                .unwrap()
                .clone(),
        );
        inner.set_field_by_name("name", Value::String("x".into()));
        m.set_field_by_name("inner", Value::Message(inner));
        m.set_field_by_name("s", Value::String("abc123".into()));
    });
    let hashed = key(&["inner.name"], &nested).unwrap();
    assert_eq!(hashed.len(), 32);
    // The same value as a JSON event's path key gives the same id.
    let json = KeySpec::parse(&["inner.name".to_string()]).unwrap();
    assert_eq!(
        hashed,
        Format::Json
            .id_of(&json, br#"{"inner":{"name":"x"}}"#, &limits)
            .unwrap()
    );
    assert!(key(&["inner.name"], &text).unwrap_err().contains("inner.name"));
    assert_eq!(key(&["s", "inner.name"], &nested).unwrap().len(), 32);
    let content = key(&["content"], &text).unwrap();
    assert_eq!(content.len(), 32);
    let garbage = key(&["s"], &[0xff, 0xff]).unwrap_err();
    assert!(
        garbage.starts_with("event is not a valid test.v1.All"),
        "{garbage}"
    );
    assert!(
        key(&["content"], &[0x0a, 5, b'a'])
            .unwrap_err()
            .contains("buffer underflow")
    );
}
