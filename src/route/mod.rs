//! Routing rules: where each accepted event goes, decided by an ordered
//! list of CEL conditions ([`expr`]) that can be replaced while the
//! sidecar runs ([`Router::install`]).
//!
//! A rule that matches sends the event to its `to` subjects and stops the
//! list, unless it says `continue`; a `shadow` rule only counts its
//! matches. An event no rule stopped goes to the `default` subject. An
//! event whose evaluation failed (a missing field, a type mismatch) goes to
//! `error_subject` only, or nowhere. Subjects may contain `{shard}`.
//!
//! A set is checked whole ([`RuleSet::build`]): one bad rule rejects it
//! and the set in force stays. Each request's events are routed by one
//! version (a request takes the set once).

pub mod expr;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_nats::Subject;

use crate::config::RoutingSpec;
use crate::engine::event::{Limits, Seen};
use crate::engine::input::Format;
use crate::engine::key::KeySpec;

pub use expr::{Condition, Input};

/// Most rules in a set.
pub const MAX_RULES: usize = 256;
/// Most subjects one rule sends to.
pub const MAX_DESTINATIONS: usize = 16;

/// A subject, with `{shard}` filled in per shard.
#[derive(Debug, Clone)]
enum Target {
    Fixed(Subject),
    PerShard(Box<[Subject]>),
}

impl Target {
    fn new(template: &str, shards: u32) -> Result<Self, String> {
        let ok = !template.is_empty()
            && template
                .split('.')
                .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ', '\t', '\r', '\n']));
        if !ok {
            return Err(format!(
                "{template:?} is not a NATS subject without wildcards (it may contain {{shard}})"
            ));
        }
        Ok(if template.contains("{shard}") {
            Target::PerShard(
                (0..shards)
                    .map(|s| Subject::from(template.replace("{shard}", &s.to_string())))
                    .collect(),
            )
        } else {
            Target::Fixed(Subject::from(template))
        })
    }

    fn subject(&self, shard: u32) -> &Subject {
        match self {
            Target::Fixed(s) => s,
            Target::PerShard(all) => &all[shard as usize],
        }
    }
}

/// A rule's counters, kept across versions of the set by its name.
#[derive(Debug, Default)]
pub struct RuleCounters {
    pub matches: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Debug)]
struct Rule {
    name: String,
    condition: Condition,
    /// Indices into [`RuleSet::targets`].
    to: Vec<usize>,
    and_continue: bool,
    shadow: bool,
    counters: Arc<RuleCounters>,
}

/// A checked rule set, ready to route.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Every distinct subject template of the set.
    targets: Vec<Target>,
    templates: Vec<String>,
    default: Option<usize>,
    error: Option<usize>,
    /// The top-level fields the compiled conditions read.
    fields: Vec<String>,
    uses_key: bool,
    /// No rules, and the default is the `output_subject`: route as without
    /// rules.
    plain: bool,
    shards: u32,
    /// The KV revision it came from (0: the configuration).
    pub revision: u64,
    /// As written.
    pub spec: RoutingSpec,
}

/// Where one event goes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Indices of the set's subjects, each once, in rule order.
    pub targets: Vec<usize>,
    /// The rules that matched (shadow ones too), by their place in the set
    /// ([`RuleSet::rule_name`]).
    pub matched: Vec<usize>,
    /// The evaluation failed: the rule and CEL's reason.
    pub error: Option<(String, String)>,
}

impl RuleSet {
    /// Checks `spec` whole.
    ///
    /// # Errors
    ///
    /// The first problem, naming the rule: bad name, duplicate name, bad
    /// condition, bad subject, or over [`MAX_RULES`] or
    /// [`MAX_DESTINATIONS`].
    pub fn build(
        spec: &RoutingSpec,
        output_subject: &str,
        shards: u32,
        revision: u64,
        counters: &dyn Fn(&str) -> Arc<RuleCounters>,
    ) -> Result<Self, String> {
        if spec.rule.len() > MAX_RULES {
            return Err(format!("{} rules: at most {MAX_RULES}", spec.rule.len()));
        }
        let mut templates: Vec<String> = Vec::new();
        let mut targets = Vec::new();
        let mut target = |template: &str| -> Result<usize, String> {
            if let Some(at) = templates.iter().position(|t| t == template) {
                return Ok(at);
            }
            targets.push(Target::new(template, shards)?);
            templates.push(template.to_owned());
            Ok(templates.len() - 1)
        };
        let default_template = spec.default.as_deref().unwrap_or(output_subject);
        let default = match default_template {
            "" => None,
            t => Some(target(t).map_err(|e| format!("default: {e}"))?),
        };
        let error = match spec.error_subject.as_str() {
            "" => None,
            t => Some(target(t).map_err(|e| format!("error_subject: {e}"))?),
        };
        let mut fields = Vec::new();
        let mut rules: Vec<Rule> = Vec::new();
        let mut uses_key = false;
        for (i, r) in spec.rule.iter().enumerate() {
            let name_ok = !r.name.is_empty()
                && r.name.len() <= 64
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(format!(
                    "rule {i}: name {:?} must be 1 to 64 letters, digits, `_` or `-`",
                    r.name
                ));
            }
            if rules.iter().any(|other| other.name == r.name) {
                return Err(format!("rule {i}: the name {:?} is used twice", r.name));
            }
            if r.to.len() > MAX_DESTINATIONS {
                return Err(format!(
                    "rule {:?}: at most {MAX_DESTINATIONS} subjects in `to`",
                    r.name
                ));
            }
            let condition = Condition::parse(&r.when, &mut fields)
                .map_err(|e| format!("rule {:?}: when: {e}", r.name))?;
            uses_key |= mentions(&r.when, "key");
            let to =
                r.to.iter()
                    .map(|t| target(t).map_err(|e| format!("rule {:?}: to: {e}", r.name)))
                    .collect::<Result<Vec<_>, _>>()?;
            rules.push(Rule {
                name: r.name.clone(),
                condition,
                to,
                and_continue: r.and_continue,
                shadow: r.shadow,
                counters: counters(&r.name),
            });
        }
        let plain = rules.is_empty() && default_template == output_subject;
        Ok(Self {
            rules,
            targets,
            templates,
            default,
            error,
            fields,
            uses_key,
            plain,
            shards,
            revision,
            spec: spec.clone(),
        })
    }

    /// No rules, and everything goes to the `output_subject`.
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The shard count the subjects were made for.
    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// The name of the `index`th rule.
    pub fn rule_name(&self, index: usize) -> &str {
        &self.rules[index].name
    }

    /// How many distinct subjects the set sends to.
    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    /// The subject of target `index` for `shard`.
    pub fn subject(&self, index: usize, shard: u32) -> &Subject {
        self.targets[index].subject(shard)
    }

    /// The subject template of target `index`, as written.
    pub fn template(&self, index: usize) -> &str {
        &self.templates[index]
    }

    /// How many rules run compiled (the rest in the interpreter).
    pub fn compiled(&self) -> usize {
        self.rules.iter().filter(|r| r.condition.is_compiled()).count()
    }

    /// Routes one event of `shard`: reads the fields the rules need (and
    /// its key, if they name it), then goes down the list. Counts.
    pub fn route(&self, event: &[u8], (shard, subject): (u32, &str), key: &KeyReader, out: &mut Routed) {
        self.route_with(event, (shard, subject), key, None, out, true);
    }

    /// The top-level fields the compiled conditions read.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Where each of [`Self::fields`] is in `names` (the fields the batch
    /// path read with each line's key), if all are.
    pub fn positions_in(&self, names: &[String]) -> Option<Vec<usize>> {
        self.fields
            .iter()
            .map(|f| names.iter().position(|n| n == f))
            .collect()
    }

    /// As [`Self::route`], for an event whose fields were read with its
    /// key: `line_seen` in the order of the names [`Self::positions_in`]
    /// gave `at` for. Saves reading the event again.
    pub fn route_read(
        &self,
        event: &[u8],
        (shard, subject): (u32, &str),
        key: &KeyReader,
        (at, line_seen): (&[usize], &[Seen]),
        out: &mut Routed,
    ) {
        self.route_with(event, (shard, subject), key, Some((at, line_seen)), out, true);
    }

    /// Where `event` would go and why, without counting: its key, shard,
    /// the rules it matches, the subjects, or the error.
    pub fn explain(&self, event: &[u8], subject: &str, key: &KeyReader) -> serde_json::Value {
        let id = match key.format.id_of(&key.spec, event, &key.limits) {
            Ok(id) => id,
            Err(e) => return serde_json::json!({ "error": e.to_string() }),
        };
        let shard = crate::engine::shard::shard_of(&id, self.shards);
        let mut out = Routed::default();
        self.route_with(event, (shard, subject), key, None, &mut out, false);
        let to: Vec<String> = out
            .targets
            .iter()
            .map(|&t| self.subject(t, shard).to_string())
            .collect();
        let matched: Vec<&str> = out.matched.iter().map(|&r| self.rule_name(r)).collect();
        let mut v = serde_json::json!({ "key": id, "shard": shard, "matched": matched, "to": to });
        if let Some((rule, why)) = out.error {
            v["error"] = serde_json::json!({ "rule": rule, "reason": why });
        }
        v
    }

    fn route_with(
        &self,
        event: &[u8],
        (shard, subject): (u32, &str),
        key: &KeyReader,
        read: Option<(&[usize], &[Seen])>,
        out: &mut Routed,
        count: bool,
    ) {
        out.targets.clear();
        out.matched.clear();
        out.error = None;
        if self.plain {
            out.targets.extend(self.default);
            return;
        }
        let mut seen = [Seen::Missing; 8];
        let mut more;
        let seen: &mut [Seen] = if self.fields.len() <= seen.len() {
            &mut seen[..self.fields.len()]
        } else {
            more = vec![Seen::Missing; self.fields.len()];
            &mut more
        };
        let format = &key.format;
        let id;
        let key = if self.uses_key {
            id = key.id(event);
            id.as_deref().unwrap_or("")
        } else {
            ""
        };
        match read {
            Some((at, line_seen)) => {
                for (slot, &i) in seen.iter_mut().zip(at) {
                    *slot = line_seen[i];
                }
            }
            None if !self.fields.is_empty() && !format.capture(event, &self.fields, seen) => {
                out.error = Some((
                    String::new(),
                    "the event is not a JSON object or a message of the schema".into(),
                ));
                out.targets.extend(self.error);
                return;
            }
            None => {}
        }
        let input = Input {
            event,
            key,
            shard,
            subject,
            seen,
            format,
        };
        let mut stopped = false;
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.condition.eval(&input) {
                Ok(false) => {}
                Ok(true) => {
                    if count {
                        rule.counters.matches.fetch_add(1, Relaxed);
                    }
                    out.matched.push(i);
                    if rule.shadow {
                        continue;
                    }
                    for &t in &rule.to {
                        if !out.targets.contains(&t) {
                            out.targets.push(t);
                        }
                    }
                    if !rule.and_continue {
                        stopped = true;
                        break;
                    }
                }
                Err(e) => {
                    if count {
                        rule.counters.errors.fetch_add(1, Relaxed);
                    }
                    out.error = Some((rule.name.clone(), e));
                    out.targets.clear();
                    out.targets.extend(self.error);
                    return;
                }
            }
        }
        if !stopped
            && let Some(d) = self.default
            && !out.targets.contains(&d)
        {
            out.targets.push(d);
        }
    }
}

/// Whether `source` names the identifier `name` (a rough check, to read
/// the key only for sets that may need it).
fn mentions(source: &str, name: &str) -> bool {
    source
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|t| t == name)
}

/// Reads an event's dedup id, for rules that name `key`.
#[derive(Debug, Clone)]
pub struct KeyReader {
    pub spec: KeySpec,
    pub limits: Limits,
    pub format: Format,
}

impl KeyReader {
    fn id(&self, event: &[u8]) -> Option<String> {
        self.format
            .id_of(&self.spec, event, &self.limits)
            .ok()
            .map(std::borrow::Cow::into_owned)
    }
}

/// The rule set in force, swapped whole.
pub struct Router {
    current: RwLock<Arc<RuleSet>>,
    output_subject: String,
    shards: u32,
    /// Every rule's counters by name, across versions.
    counters: Mutex<BTreeMap<String, Arc<RuleCounters>>>,
    pub key: KeyReader,
    /// Sets refused (`eventsieve_rules_rejected_total`).
    pub rejected: AtomicU64,
    /// The last refusal: the KV revision and why.
    last_rejection: Mutex<Option<(u64, String)>>,
    /// The set of the configuration, in force when the KV key is deleted.
    configured: RoutingSpec,
}

impl Router {
    /// A router with `spec` in force.
    ///
    /// # Errors
    ///
    /// As [`RuleSet::build`].
    pub fn new(
        spec: &RoutingSpec,
        output_subject: &str,
        shards: u32,
        key: KeyReader,
    ) -> Result<Self, String> {
        let counters = Mutex::new(BTreeMap::new());
        let set = RuleSet::build(spec, output_subject, shards, 0, &|name| counter(&counters, name))?;
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            output_subject: output_subject.to_owned(),
            shards,
            counters,
            key,
            rejected: AtomicU64::new(0),
            last_rejection: Mutex::new(None),
            configured: spec.clone(),
        })
    }

    /// The set in force: take it once per request.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks `spec` without installing it.
    ///
    /// # Errors
    ///
    /// As [`RuleSet::build`].
    pub fn check(&self, spec: &RoutingSpec, revision: u64) -> Result<RuleSet, String> {
        // Counters of a set only tried are not the running rules'.
        let scratch = Mutex::new(BTreeMap::new());
        RuleSet::build(spec, &self.output_subject, self.shards, revision, &|n| {
            counter(&scratch, n)
        })
    }

    /// Puts `spec` (from KV `revision`) in force, or keeps the set in force
    /// and records the refusal.
    ///
    /// # Errors
    ///
    /// Why the set was refused.
    pub fn install(&self, spec: &RoutingSpec, revision: u64) -> Result<Arc<RuleSet>, String> {
        let built = RuleSet::build(spec, &self.output_subject, self.shards, revision, &|name| {
            counter(&self.counters, name)
        });
        match built {
            Ok(set) => {
                let set = Arc::new(set);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = set.clone();
                *self.last_rejection.lock().unwrap_or_else(PoisonError::into_inner) = None;
                Ok(set)
            }
            Err(e) => {
                self.rejected.fetch_add(1, Relaxed);
                *self.last_rejection.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((revision, e.clone()));
                Err(e)
            }
        }
    }

    /// The set of the configuration.
    pub fn configured(&self) -> &RoutingSpec {
        &self.configured
    }

    /// Records a set refused before it could be built (unreadable text).
    pub fn refuse(&self, revision: u64, why: &str) {
        self.rejected.fetch_add(1, Relaxed);
        *self.last_rejection.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((revision, why.to_owned()));
    }

    /// The last set refused since one was installed: its revision and why.
    pub fn last_rejection(&self) -> Option<(u64, String)> {
        self.last_rejection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every rule's counters ever in force, by name.
    pub fn counters(&self) -> Vec<(String, Arc<RuleCounters>)> {
        let all = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        all.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }
}

impl crate::observe::metrics::Render for Router {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let set = self.current();
        let _ = writeln!(
            out,
            "# HELP eventsieve_rules_revision The KV revision of the routing rules in force (0: the configuration's).\n# TYPE eventsieve_rules_revision gauge\neventsieve_rules_revision {}",
            set.revision
        );
        let _ = writeln!(
            out,
            "# HELP eventsieve_rules_rejected_total Rule sets refused (bad syntax, unknown function, bad subject, duplicate name, over the limits); the set in force stayed.\n# TYPE eventsieve_rules_rejected_total counter\neventsieve_rules_rejected_total {}",
            self.rejected.load(Relaxed)
        );
        let counters = self.counters();
        if counters.is_empty() {
            return;
        }
        for (metric, help, pick) in [
            (
                "eventsieve_rule_matches_total",
                "Events a routing rule matched (shadow rules too).",
                (|c: &RuleCounters| c.matches.load(Relaxed)) as fn(&RuleCounters) -> u64,
            ),
            (
                "eventsieve_rule_errors_total",
                "Events whose evaluation failed at a routing rule (sent to error_subject).",
                |c: &RuleCounters| c.errors.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for (name, c) in &counters {
                let _ = writeln!(out, "{metric}{{rule=\"{name}\"}} {}", pick(c));
            }
        }
    }
}

fn counter(all: &Mutex<BTreeMap<String, Arc<RuleCounters>>>, name: &str) -> Arc<RuleCounters> {
    all.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(name.to_owned())
        .or_default()
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> Result<RuleSet, String> {
        let spec = RoutingSpec::parse(text)?;
        RuleSet::build(&spec, "events.unique.{shard}", 4, 0, &|_| Arc::default())
    }

    fn route(set: &RuleSet, event: &str) -> (Vec<String>, Vec<String>, bool) {
        let key = KeyReader {
            spec: KeySpec::Field("event_id".into()),
            limits: Limits::default(),
            format: Format::Json,
        };
        let mut out = Routed::default();
        set.route(event.as_bytes(), (2, "dedup.ingest"), &key, &mut out);
        let subjects = out
            .targets
            .iter()
            .map(|&t| set.subject(t, 2).to_string())
            .collect();
        let matched = out.matched.iter().map(|&r| set.rule_name(r).to_owned()).collect();
        (subjects, matched, out.error.is_some())
    }

    const BRIEF: &str = include_str!("../../config/rules.example.toml");

    #[test]
    fn the_brief_s_example_routes_as_it_says() {
        let set = set(BRIEF).unwrap();
        assert_eq!(set.compiled(), 2);
        let big = r#"{"event_id":"a1","type":"order_placed","total":1500}"#;
        assert_eq!(
            route(&set, big).0,
            ["fraud.orders", "events.unique.2"],
            "fraud and the default"
        );
        let small = r#"{"event_id":"a2","type":"order_placed","total":10}"#;
        assert_eq!(route(&set, small).0, ["events.unique.2"]);
        let beat = r#"{"event_id":"a3","type":"heartbeat"}"#;
        assert!(route(&set, beat).0.is_empty(), "heartbeats go nowhere");
        let broken = r#"{"event_id":"a4","type":"order_placed"}"#;
        assert_eq!(
            route(&set, broken),
            (vec!["events.rule_errors".to_string()], vec![], true)
        );
    }

    #[test]
    fn shadow_rules_count_and_send_nothing() {
        let set =
            set("[[rule]]\nname = \"try\"\nwhen = 'event.n > 1'\nto = [\"x.y\"]\nshadow = true\n").unwrap();
        assert_eq!(
            route(&set, r#"{"event_id":"a","n":2}"#),
            (
                vec!["events.unique.2".to_string()],
                vec!["try".to_string()],
                false
            )
        );
    }

    #[test]
    fn a_bad_set_is_refused_whole_with_the_rule_named() {
        for (text, why) in [
            (
                "[[rule]]\nname = \"a\"\nwhen = 'event.x =='\n",
                "rule \"a\": when",
            ),
            (
                "[[rule]]\nname = \"a\"\nwhen = 'true'\n[[rule]]\nname = \"a\"\nwhen = 'true'\n",
                "used twice",
            ),
            ("[[rule]]\nname = \"a b\"\nwhen = 'true'\n", "name"),
            ("[[rule]]\nname = \"a\"\nwhen = 'true'\nto = [\"x.*\"]\n", "to:"),
            ("[[rule]]\nname = \"a\"\nwhen = 'frob(1)'\n", "unknown function"),
            ("default = \"a..b\"\n", "default"),
            (
                "[[rule]]\nname = \"a\"\nwhen = 'true'\nextra = 1\n",
                "unknown field",
            ),
        ] {
            let err = set(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn a_refused_set_leaves_the_one_in_force() {
        let key = KeyReader {
            spec: KeySpec::Field("event_id".into()),
            limits: Limits::default(),
            format: Format::Json,
        };
        let router = Router::new(&RoutingSpec::default(), "events.unique.{shard}", 4, key).unwrap();
        assert!(router.current().is_plain());
        let good = RoutingSpec::parse(BRIEF).unwrap();
        router.install(&good, 7).unwrap();
        assert_eq!(router.current().revision, 7);
        let bad = RoutingSpec::parse("[[rule]]\nname = \"x\"\nwhen = '('\n").unwrap();
        assert!(router.install(&bad, 8).is_err());
        assert_eq!(router.current().revision, 7);
        assert_eq!(router.rejected.load(Relaxed), 1);
        assert_eq!(router.last_rejection().unwrap().0, 8);
    }
}
