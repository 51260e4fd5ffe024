//! A routing rule's condition: CEL, parsed by the `cel` crate (the one
//! module that names it, as its minor versions change the API).
//!
//! The common subset is compiled into a tree of closures over the fields
//! read from the event's bytes ([`Compiled`]): top-level `event.<field>`,
//! `key`, `shard`, `subject`, literals (not bytes), `== != < <= > >=`, `&& || !`,
//! `in` a list of strings, `size`, `startsWith`, `endsWith`, `contains`. Everything else
//! runs in the crate's interpreter over the whole event ([`Condition`]
//! decides which, per expression). Both give the same answers: a
//! property test holds them to it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};
use cel::{Context, Program, Value};

use crate::engine::event::{self, Seen};
use crate::engine::input::Format;

/// Longest condition accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;

/// Functions a condition may call (besides operators): CEL's standard
/// ones that this build of the interpreter has.
const FUNCTIONS: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "string",
    "int",
    "uint",
    "double",
    "bytes",
    "type",
    "dyn",
    "max",
    "min",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "has",
];

/// Variables a condition may name.
const VARIABLES: &[&str] = &["event", "key", "shard", "subject"];

/// What a condition is evaluated against.
pub struct Input<'a> {
    /// The event's bytes (a JSON object).
    pub event: &'a [u8],
    /// The dedup id.
    pub key: &'a str,
    pub shard: u32,
    /// The subject the request came in on (see [`crate::route`]).
    pub subject: &'a str,
    /// The top-level fields [`Condition::fields`] names, read from the
    /// event (the same order).
    pub seen: &'a [Seen],
    /// How the event is read, for the interpreter.
    pub format: &'a Format,
}

/// A condition's outcome: matched or not, or why it could not be decided
/// (a missing field, a type mismatch: CEL's errors).
pub type Outcome = Result<bool, String>;

/// A parsed, checked condition.
pub struct Condition {
    program: Program,
    /// The compiled form, when the condition is in the common subset.
    compiled: Option<Compiled>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("compiled", &self.compiled.is_some())
            .finish()
    }
}

impl Condition {
    /// Parses and checks `source`; `fields` collects the top-level event
    /// fields the compiled form reads (shared by every rule of a set).
    ///
    /// # Errors
    ///
    /// Bad syntax, an unknown function or variable, or over
    /// [`MAX_EXPRESSION_BYTES`].
    pub fn parse(source: &str, fields: &mut Vec<String>) -> Result<Self, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!("longer than {MAX_EXPRESSION_BYTES} bytes"));
        }
        if source.trim().is_empty() {
            return Err("empty (write `true` to match every event)".into());
        }
        let program = Program::compile(source).map_err(|e| e.to_string())?;
        let refs = program.references();
        for f in refs.functions() {
            let operator = f.starts_with('_') || f.starts_with('@') || f.ends_with('_');
            if !operator && !FUNCTIONS.contains(&f) {
                return Err(format!(
                    "unknown function {f:?} (known: {})",
                    FUNCTIONS.join(", ")
                ));
            }
        }
        for v in refs.variables() {
            if !VARIABLES.contains(&v) {
                return Err(format!(
                    "unknown variable {v:?} (known: {})",
                    VARIABLES.join(", ")
                ));
            }
        }
        let compiled = compile(program.expression(), fields);
        Ok(Self { program, compiled })
    }

    /// Whether it runs compiled (else in the interpreter).
    pub fn is_compiled(&self) -> bool {
        self.compiled.is_some()
    }

    /// Evaluates the condition: compiled if it can be, else interpreted.
    pub fn eval(&self, input: &Input<'_>) -> Outcome {
        if let Some(compiled) = &self.compiled {
            match compiled.eval(input) {
                Val::Bool(b) => return Ok(b),
                Val::Error(e) => return Err(e),
                // A value the compiled form does not model (null, a bool
                // field, an escaped text, a nested value): the interpreter.
                Val::Unknown => {}
                other => return Err(format!("the condition gives {other:?}, not a bool")),
            }
        }
        self.interpret(input)
    }

    /// Evaluates the condition in the interpreter, over the whole event.
    pub fn interpret(&self, input: &Input<'_>) -> Outcome {
        let json: serde_json::Value = match input.format.schema() {
            None => serde_json::from_slice(input.event).map_err(|e| format!("the event is not JSON: {e}"))?,
            Some(schema) => schema.to_json_value(input.event)?,
        };
        let mut context = Context::default();
        context.add_variable_from_value("event", to_cel(&json));
        context.add_variable_from_value("key", Value::String(Arc::new(input.key.to_owned())));
        context.add_variable_from_value("shard", Value::Int(i64::from(input.shard)));
        context.add_variable_from_value("subject", Value::String(Arc::new(input.subject.to_owned())));
        match self.program.execute(&context) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the condition gives {other:?}, not a bool")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A JSON value as the interpreter sees it: integers as `int` (or `uint`
/// past `i64`), other numbers as `double`.
fn to_cel(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        serde_json::Value::Object(map) => {
            let map: HashMap<String, Value> = map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            Value::Map(map.into())
        }
    }
}

/// A value in the compiled form.
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Null,
    Bool(bool),
    Number(f64),
    Text(Text<'a>),
    /// CEL's error: the expression has no value on this input.
    Error(String),
    /// Something the compiled form does not model: ask the interpreter.
    Unknown,
}

/// A text: of the event (borrowed unless escaped), or a literal of the
/// condition (shared, so that evaluating it allocates nothing).
#[derive(Debug, Clone)]
enum Text<'a> {
    Event(Cow<'a, str>),
    Literal(Arc<str>),
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        match self {
            Text::Event(t) => t,
            Text::Literal(t) => t,
        }
    }
}

impl PartialEq for Text<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

type Node = Box<dyn for<'a> Fn(&Input<'a>) -> Val<'a> + Send + Sync>;

/// The compiled form of a condition.
struct Compiled(Node);

impl Compiled {
    fn eval<'a>(&self, input: &Input<'a>) -> Val<'a> {
        (self.0)(input)
    }
}

/// Compiles `expr` if it is in the common subset.
fn compile(expr: &IdedExpr, fields: &mut Vec<String>) -> Option<Compiled> {
    node(expr, fields).map(Compiled)
}

fn literal(value: &LiteralValue) -> Option<Val<'static>> {
    Some(match value {
        LiteralValue::Boolean(b) => Val::Bool(*b.inner()),
        LiteralValue::Double(d) => Val::Number(*d.inner()),
        // Exact in a double up to 2^53: beyond that, the interpreter.
        LiteralValue::Int(i) if i.inner().unsigned_abs() <= 1 << 53 => Val::Number(*i.inner() as f64),
        LiteralValue::UInt(u) if *u.inner() <= 1 << 53 => Val::Number(*u.inner() as f64),
        LiteralValue::String(s) => Val::Text(Text::Literal(Arc::from(s.inner()))),
        LiteralValue::Null => Val::Null,
        _ => return None,
    })
}

/// Whether the compiled `expr` gives a bool (or an error).
fn is_boolean(expr: &IdedExpr) -> bool {
    match &expr.expr {
        Expr::Literal(LiteralValue::Boolean(_)) => true,
        Expr::Call(call) => matches!(
            call.func_name.as_str(),
            operators::LOGICAL_AND
                | operators::LOGICAL_OR
                | operators::LOGICAL_NOT
                | operators::EQUALS
                | operators::NOT_EQUALS
                | operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS
                | operators::IN
                | "startsWith"
                | "endsWith"
                | "contains"
        ),
        _ => false,
    }
}

/// Whether `expr` is an operator or function that gives a bool (a
/// comparison's operands may be bool literals, not such tests).
fn is_test(expr: &IdedExpr) -> bool {
    matches!(expr.expr, Expr::Call(_)) && is_boolean(expr)
}

fn node(expr: &IdedExpr, fields: &mut Vec<String>) -> Option<Node> {
    match &expr.expr {
        Expr::Literal(value) => {
            let value = literal(value)?;
            Some(Box::new(move |_| value.clone()))
        }
        Expr::Ident(name) if name == "key" => {
            Some(Box::new(|input| Val::Text(Text::Event(Cow::Borrowed(input.key)))))
        }
        Expr::Ident(name) if name == "subject" => Some(Box::new(|input| {
            Val::Text(Text::Event(Cow::Borrowed(input.subject)))
        })),
        Expr::Ident(name) if name == "shard" => Some(Box::new(|input| Val::Number(f64::from(input.shard)))),
        Expr::Select(select) if !select.test => {
            let Expr::Ident(root) = &select.operand.expr else {
                return None;
            };
            if root != "event" {
                return None;
            }
            let at = slot(&select.field, fields);
            let name = select.field.clone();
            Some(Box::new(move |input| field(input, at, &name)))
        }
        Expr::Call(call) => {
            let name = call.func_name.as_str();
            match (name, call.target.as_deref(), call.args.as_slice()) {
                (operators::LOGICAL_AND | operators::LOGICAL_OR, None, [a, b])
                    if is_boolean(a) && is_boolean(b) =>
                {
                    let (a, b) = (node(a, fields)?, node(b, fields)?);
                    let and = name == operators::LOGICAL_AND;
                    Some(Box::new(move |input| logical(and, a(input), || b(input))))
                }
                (operators::LOGICAL_NOT, None, [a]) if is_boolean(a) => {
                    let a = node(a, fields)?;
                    Some(Box::new(move |input| match a(input) {
                        Val::Bool(b) => Val::Bool(!b),
                        other => other,
                    }))
                }
                (
                    operators::EQUALS
                    | operators::NOT_EQUALS
                    | operators::LESS
                    | operators::LESS_EQUALS
                    | operators::GREATER
                    | operators::GREATER_EQUALS,
                    None,
                    [a, b],
                ) if !is_test(a) && !is_test(b) => {
                    let op = match name {
                        operators::EQUALS => Cmp::Eq,
                        operators::NOT_EQUALS => Cmp::Ne,
                        operators::LESS => Cmp::Lt,
                        operators::LESS_EQUALS => Cmp::Le,
                        operators::GREATER => Cmp::Gt,
                        _ => Cmp::Ge,
                    };
                    // The commonest leaf, `event.<field> <op> <literal>` (or
                    // the other way round), without building values.
                    if let Some(leaf) = field_vs_literal(a, op, b, fields)
                        .or_else(|| field_vs_literal(b, op.flipped(), a, fields))
                    {
                        return Some(leaf);
                    }
                    let (a, b) = (node(a, fields)?, node(b, fields)?);
                    Some(Box::new(move |input| compare(op, a(input), b(input))))
                }
                (operators::IN, None, [probe, list]) => {
                    let Expr::List(list) = &list.expr else {
                        return None;
                    };
                    let items: Vec<String> = list
                        .elements
                        .iter()
                        .map(|e| match &e.expr {
                            Expr::Literal(LiteralValue::String(s)) => Some(s.inner().to_owned()),
                            _ => None,
                        })
                        .collect::<Option<_>>()?;
                    if !list.optional_indices.is_empty() || is_boolean(probe) {
                        return None;
                    }
                    let probe = node(probe, fields)?;
                    Some(Box::new(move |input| match probe(input) {
                        Val::Text(t) => Val::Bool(items.iter().any(|i| i == t.as_str())),
                        // Of another type: equal to no string.
                        Val::Number(_) | Val::Bool(_) | Val::Null => Val::Bool(false),
                        other => other,
                    }))
                }
                ("size", None, [a]) | ("size", Some(a), []) if !is_boolean(a) => {
                    let a = node(a, fields)?;
                    Some(Box::new(move |input| match a(input) {
                        Val::Text(t) => Val::Number(t.as_str().chars().count() as f64),
                        Val::Number(_) => Val::Unknown,
                        other => other,
                    }))
                }
                ("startsWith" | "endsWith" | "contains", Some(target), [arg])
                    if !is_boolean(target) && !is_boolean(arg) =>
                {
                    let (target, arg) = (node(target, fields)?, node(arg, fields)?);
                    let which = match name {
                        "startsWith" => Affix::Starts,
                        "endsWith" => Affix::Ends,
                        _ => Affix::Contains,
                    };
                    Some(Box::new(move |input| match (target(input), arg(input)) {
                        (Val::Text(t), Val::Text(a)) => {
                            let (t, a) = (t.as_str(), a.as_str());
                            Val::Bool(match which {
                                Affix::Starts => t.starts_with(a),
                                Affix::Ends => t.ends_with(a),
                                Affix::Contains => t.contains(a),
                            })
                        }
                        (Val::Error(e), _) => Val::Error(e),
                        (Val::Text(_), Val::Error(e)) => Val::Error(e),
                        _ => Val::Unknown,
                    }))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Where `name` is in `fields` (added at the end if it is not yet).
fn slot(name: &str, fields: &mut Vec<String>) -> usize {
    match fields.iter().position(|f| f == name) {
        Some(at) => at,
        None => {
            fields.push(name.to_owned());
            fields.len() - 1
        }
    }
}

/// `event.<field> <op> <literal>` as one node that compares what the reader
/// saw with the literal directly (numbers with numbers, text bytes with
/// text bytes), and leaves other pairs to [`compare`]; `None` if `field`
/// and `literal` are not of that form.
fn field_vs_literal(
    field_expr: &IdedExpr,
    op: Cmp,
    literal: &IdedExpr,
    fields: &mut Vec<String>,
) -> Option<Node> {
    let (Expr::Select(select), Expr::Literal(value)) = (&field_expr.expr, &literal.expr) else {
        return None;
    };
    if select.test || !matches!(&select.operand.expr, Expr::Ident(root) if root == "event") {
        return None;
    }
    let lit = self::literal(value)?;
    let at = slot(&select.field, fields);
    let name = select.field.clone();
    Some(Box::new(move |input| {
        match (input.seen.get(at).copied().unwrap_or(Seen::Missing), &lit) {
            (Seen::Number(x), Val::Number(y)) => ordered(op, x.partial_cmp(y)),
            // Texts of the event were checked to be UTF-8 when it was read:
            // byte order is code point order.
            (Seen::Text { start, end }, Val::Text(t)) => {
                match input.event.get(start as usize..end as usize) {
                    Some(bytes) => ordered(op, Some(bytes.cmp(t.as_str().as_bytes()))),
                    None => Val::Unknown,
                }
            }
            _ => compare(op, field(input, at, &name), lit.clone()),
        }
    }))
}

/// A comparison's answer from the order of two values of one type (`None`:
/// unordered numbers, NaN).
fn ordered<'a>(op: Cmp, ordering: Option<std::cmp::Ordering>) -> Val<'a> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    Val::Bool(match (op, ordering) {
        (Cmp::Eq, o) => o == Some(Equal),
        (Cmp::Ne, o) => o != Some(Equal),
        (_, None) => false,
        (Cmp::Lt, Some(o)) => o == Less,
        (Cmp::Le, Some(o)) => o != Greater,
        (Cmp::Gt, Some(o)) => o == Greater,
        (Cmp::Ge, Some(o)) => o != Less,
    })
}

/// A top-level field as the reader saw it.
fn field<'a>(input: &Input<'a>, at: usize, name: &str) -> Val<'a> {
    match input.seen.get(at).copied().unwrap_or(Seen::Missing) {
        Seen::Missing => Val::Error(format!("no such key: {name}")),
        Seen::Number(x) => Val::Number(x),
        Seen::Bool(b) => Val::Bool(b),
        Seen::Null => Val::Null,
        Seen::Text { start, end } => match input
            .event
            .get(start as usize..end as usize)
            .map(std::str::from_utf8)
        {
            Some(Ok(text)) => Val::Text(Text::Event(Cow::Borrowed(text))),
            _ => Val::Unknown,
        },
        Seen::Escaped => event::text(input.event, name).map_or(Val::Unknown, |t| Val::Text(Text::Event(t))),
        Seen::Symbol(name) => Val::Text(Text::Event(Cow::Borrowed(name))),
        Seen::Other => Val::Unknown,
    }
}

/// CEL's `&&` and `||`: commutative over errors (a false `&&` side, or a
/// true `||` side, decides even if the other is an error).
fn logical<'a>(and: bool, a: Val<'a>, b: impl FnOnce() -> Val<'a>) -> Val<'a> {
    let decides = Val::Bool(!and);
    if a == decides {
        return a;
    }
    let b = b();
    match (a, b) {
        (_, b) if b == decides => b,
        (Val::Unknown, _) | (_, Val::Unknown) => Val::Unknown,
        (Val::Error(e), _) | (_, Val::Error(e)) => Val::Error(e),
        (Val::Bool(_), Val::Bool(_)) => Val::Bool(and),
        _ => Val::Unknown,
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A string function that tests a text.
#[derive(Debug, Clone, Copy)]
enum Affix {
    Starts,
    Ends,
    Contains,
}

impl Cmp {
    /// The operator with its operands swapped: `a < b` is `b > a`.
    fn flipped(self) -> Self {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            same => same,
        }
    }
}

fn compare<'a>(op: Cmp, a: Val<'a>, b: Val<'a>) -> Val<'a> {
    use std::cmp::Ordering;
    let ordering = match (&a, &b) {
        (Val::Unknown, _) | (_, Val::Unknown) => return Val::Unknown,
        (Val::Error(e), _) | (_, Val::Error(e)) => return Val::Error(e.clone()),
        (Val::Number(x), Val::Number(y)) => x.partial_cmp(y),
        (Val::Text(x), Val::Text(y)) => Some(x.as_str().cmp(y.as_str())),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Null, Val::Null) => Some(Ordering::Equal),
        // Of different types: never equal, and not ordered.
        _ => None,
    };
    match op {
        Cmp::Eq | Cmp::Ne => ordered(op, ordering),
        // Only numbers and texts are ordered here; bools and nulls in the
        // interpreter's own way, other pairs not at all.
        _ if matches!(
            (&a, &b),
            (Val::Number(_), Val::Number(_)) | (Val::Text(_), Val::Text(_))
        ) =>
        {
            ordered(op, ordering)
        }
        _ => Val::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `source` parsed, and `with` called on it and `event` read for it
    /// (key `k1`, shard 3, come in on `dedup.shard.3.k1`).
    fn on_event<R>(source: &str, event: &str, with: impl FnOnce(&Condition, &Input<'_>) -> R) -> R {
        let mut fields = Vec::new();
        let condition = Condition::parse(source, &mut fields).unwrap();
        let mut seen = vec![Seen::Missing; fields.len()];
        event::capture(event.as_bytes(), &fields, &mut seen);
        let input = Input {
            event: event.as_bytes(),
            key: "k1",
            shard: 3,
            subject: "dedup.shard.3.k1",
            seen: &seen,
            format: &Format::Json,
        };
        with(&condition, &input)
    }

    fn run(source: &str, event: &str) -> (Outcome, Outcome, bool) {
        assert!(
            event::capture(event.as_bytes(), &[] as &[&str], &mut []),
            "an object"
        );
        on_event(source, event, |condition, input| {
            (
                condition.eval(input),
                condition.interpret(input),
                condition.is_compiled(),
            )
        })
    }

    #[test]
    fn the_brief_s_rule_compiles_and_answers_as_the_interpreter() {
        let rule = r#"event.type == "order_placed" && event.total > 1000.0"#;
        for (event, want) in [
            (r#"{"type":"order_placed","total":1500}"#, Ok(true)),
            (r#"{"type":"order_placed","total":999.5}"#, Ok(false)),
            (r#"{"type":"heartbeat"}"#, Ok(false)),
        ] {
            let (compiled, interpreted, is) = run(rule, event);
            assert!(is);
            assert_eq!(compiled, want, "{event}");
            assert_eq!(interpreted, want, "{event}");
        }
        let (compiled, interpreted, _) = run(rule, r#"{"type":"order_placed"}"#);
        assert!(
            compiled.is_err() && interpreted.is_err(),
            "{compiled:?} {interpreted:?}"
        );
    }

    #[test]
    fn bad_conditions_are_refused_with_the_reason() {
        let mut fields = Vec::new();
        for (source, why) in [
            ("event.type ==", "Syntax"),
            ("nope(event.a)", "unknown function"),
            ("other.a == 1", "unknown variable"),
            ("", "empty"),
        ] {
            let err = Condition::parse(source, &mut fields).unwrap_err();
            assert!(err.contains(why), "{source}: {err}");
        }
        let long = format!("event.a == '{}'", "x".repeat(MAX_EXPRESSION_BYTES));
        assert!(
            Condition::parse(&long, &mut fields)
                .unwrap_err()
                .contains("longer")
        );
    }

    /// A generated condition over the fields `a` (text), `n` (number),
    /// `b` (bool), `z` (null) and `missing`, with `key` and `shard`.
    fn condition() -> impl Strategy<Value = String> {
        let operand = prop_oneof![
            Just("event.a".to_string()),
            Just("event.n".to_string()),
            Just("event.b".to_string()),
            Just("event.z".to_string()),
            Just("event.e".to_string()),
            Just("event.missing".to_string()),
            Just("key".to_string()),
            Just("subject".to_string()),
            Just("shard".to_string()),
            Just("size(event.a)".to_string()),
            (-3i64..300).prop_map(|i| i.to_string()),
            (-3.0f64..300.0).prop_map(|x| format!("{x:.2}")),
            "[a-c]{0,2}".prop_map(|s| format!("'{s}'")),
            Just("true".to_string()),
        ];
        let leaf = prop_oneof![
            (operand.clone(), comparison(), operand.clone()).prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            operand.clone().prop_map(|a| format!("{a} in ['a', 'ab', 'k1']")),
            (operand.clone(), "[a-c]{0,2}").prop_map(|(a, s)| format!("{a}.startsWith('{s}')")),
            (operand, "[a-c]{0,2}").prop_map(|(a, s)| format!("{a}.contains('{s}')")),
        ];
        combined(leaf)
    }

    fn comparison() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            Just("=="),
            Just("!="),
            Just("<"),
            Just("<="),
            Just(">"),
            Just(">=")
        ]
    }

    /// `leaf` conditions joined by `&&`, `||` and `!`, three deep.
    fn combined(leaf: impl Strategy<Value = String> + 'static) -> impl Strategy<Value = String> {
        leaf.prop_recursive(3, 12, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
                inner.prop_map(|a| format!("!({a})")),
            ]
        })
    }

    /// A generated condition as rules are written: each field compared
    /// with values of its own type.
    fn typed_condition() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            Just("event.a"),
            Just("event.e"),
            Just("key"),
            Just("subject"),
            Just("event.missing")
        ];
        let number = prop_oneof![Just("event.n"), Just("shard"), Just("size(event.a)")];
        let cmp = comparison();
        let leaf = prop_oneof![
            (text.clone(), cmp.clone(), "[a-c]{0,2}").prop_map(|(a, op, s)| format!("{a} {op} '{s}'")),
            (number.clone(), cmp, -3.0f64..300.0).prop_map(|(a, op, x)| format!("{a} {op} {x:.1}")),
            text.clone().prop_map(|a| format!("{a} in ['a', 'ab', 'k1']")),
            (text.clone(), "[a-c]{0,2}").prop_map(|(a, s)| format!("{a}.startsWith('{s}')")),
            (text, "[a-c]{0,2}").prop_map(|(a, s)| format!("{a}.endsWith('{s}')")),
            any::<bool>().prop_map(|b| format!("event.b == {b}")),
            Just("event.z == null".to_string()),
            Just("subject.startsWith('dedup.shard.')".to_string()),
        ];
        combined(leaf)
    }

    fn event_json() -> impl Strategy<Value = String> {
        (
            proptest::option::of("[a-c]{0,3}"),
            proptest::option::of(prop_oneof![
                (-5i64..400).prop_map(|i| i.to_string()),
                (-5.0f64..400.0).prop_map(|x| format!("{x:.3}")),
            ]),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(a, n, b, escaped)| {
                let mut fields = vec![format!("\"b\":{b}"), "\"z\":null".to_string()];
                if let Some(a) = a {
                    fields.push(format!("\"a\":\"{a}\""));
                }
                if let Some(n) = n {
                    fields.push(format!("\"n\":{n}"));
                }
                if escaped {
                    fields.push(r#""e":"a\u0062""#.to_string());
                }
                format!("{{{}}}", fields.join(","))
            })
    }

    /// Whether the compiled form decides `source` on `event` by itself.
    fn compiled_decides(source: &str, event: &str) -> bool {
        on_event(source, event, |condition, input| {
            condition
                .compiled
                .as_ref()
                .is_some_and(|c| !matches!(c.eval(input), Val::Unknown))
        })
    }

    #[test]
    fn conditions_as_rules_are_written_run_compiled() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let (mut decided, total) = (0, 2000);
        for _ in 0..total {
            let source = typed_condition().new_tree(&mut runner).unwrap().current();
            let event = event_json().new_tree(&mut runner).unwrap().current();
            decided += usize::from(compiled_decides(&source, &event));
        }
        // The property below compares the two forms where the compiled one
        // answers: it must answer nearly all well-typed conditions.
        assert!(
            decided * 10 >= total * 9,
            "the compiled form decided {decided} of {total}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_compiled_form_answers_as_the_interpreter(
            source in prop_oneof![condition(), typed_condition()],
            event in event_json(),
        ) {
            let (compiled, interpreted, _) = run(&source, &event);
            // Both error, or both give the same answer (the errors' texts
            // differ).
            prop_assert_eq!(compiled.is_ok(), interpreted.is_ok(), "{} on {}: {:?} vs {:?}", source, event, compiled, interpreted);
            if let (Ok(c), Ok(i)) = (&compiled, &interpreted) {
                prop_assert_eq!(c, i, "{} on {}", source, event);
            }
        }
    }
}
