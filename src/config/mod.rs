//! Configuration: built-in defaults < a TOML file < `EVENTSIEVE_*`
//! environment variables (`__` separates nesting: `EVENTSIEVE_NATS__URL`).
//!
//! Every field, its default and its unit is documented here (one file per
//! section: [`nats_config`] for `[nats]`, [`cluster_config`] for
//! `[cluster]`, [`aggregate_config`] for `[[aggregate]]`) and in
//! `config/eventsieve.toml`. [`Config::load`] fails with a message naming
//! the field and the accepted values; the binary exits with status 2 then.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::engine::event::Limits;
use crate::engine::fingerprint::segments_per_shard;
use crate::engine::key::KeySpec;
use crate::engine::table::MAX_WINDOW_MS;

pub mod aggregate_config;
pub mod cluster_config;
pub mod input_config;
pub mod nats_config;
pub mod ordering_config;
pub mod routing_config;

pub use aggregate_config::{
    AggregateConfig, AggregateSettings, EmitConfig, EmitSettings, Stat, captured_fields,
};
pub use cluster_config::ClusterConfig;
pub use input_config::{InputConfig, InputSettings};
pub use nats_config::{NatsConfig, Secret, redact_urls};
pub use ordering_config::{OrderingConfig, OrderingSettings};
pub use routing_config::{RoutingSpec, RuleSpec};

/// Where the TOML file is looked for when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/eventsieve.toml";

/// How far a `true` verdict is guaranteed to be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Recorded in memory only: lost with the process. Fastest.
    Memory,
    /// Committed to the local LMDB store before the reply.
    Local,
    /// Acknowledged by the JetStream journal before the reply; shards are
    /// leased in the KV bucket and taken over when their owner dies.
    Replicated,
}

/// Where remembered ids live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Every id in the in-memory tables (about 14 bytes each).
    Memory,
    /// The newest ids in the tables, up to `hot_bytes`; older ones sealed
    /// in files on disk with a filter of about 1.2 bytes per id in RAM.
    Tiered,
}

/// How a batch request's new events are republished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchOutput {
    /// One message per shard of the batch: its new lines, newline-delimited,
    /// in request order, with the header `Eventsieve-Count`.
    PerShard,
    /// One message per new event, as for single-event requests.
    PerEvent,
}

/// Where new events are republished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Core NATS publish after the id is committed: at most once.
    Core,
    /// A JetStream stream, each event with `Nats-Msg-Id` = its `event_id`,
    /// acknowledged before the id is committed: exactly once in the stream
    /// for a producer that retries.
    Jetstream,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    /// Subject prefix. Default `dedup`.
    pub subject_prefix: String,
    /// Shard count; must match the server mapping `partition(N,1)`. Default 32.
    pub shards: u32,
    /// Shards this node serves: `"all"` or a list like `"0-15,20"`. Default `all`.
    #[serde(deserialize_with = "text_or_number")]
    pub owned_shards: String,
    /// What makes two events the same: `"event_id"` (default) or another
    /// top-level text field (the id itself); a dotted path, a list of fields
    /// whose values together are the key, or `"content"` (the event's
    /// bytes): hashed to a 32-hex-digit id. See the README.
    pub key: KeyConfig,
    /// What places an event in a shard: `""` (default) the key; or a
    /// top-level text field such as `"session_id"`, so that a session's
    /// events share a shard (and its order) while `key` still decides
    /// duplicates. Its value must be a valid id (it is the subject token
    /// producers address: `<prefix>.ingest.<value>`), and an id must
    /// always come with the same value. Fixed for a store's life.
    pub shard_key: String,
    /// Rolling window: a number with unit `ms`, `s`, `m`, `h` or `d`, at most `7d`. Default `7d`.
    pub window: String,
    /// Largest event in bytes. Default 1048576 (nats-server's `max_payload`).
    pub max_event_bytes: usize,
    /// Largest `event_id` in bytes. Default 256.
    pub max_id_bytes: usize,
    /// `memory`, `local` or `replicated` (the JetStream journal, shard
    /// leases and takeover; see `[cluster]`). Default `local`.
    pub durability: Durability,
    /// Longest time a request waits to be covered by a group commit. Default `1ms`.
    pub commit_interval: String,
    /// Flush every commit to disk (survives a machine crash, costs latency). Default false.
    pub fsync: bool,
    /// Directory of the LMDB store. Default `data`.
    pub data_dir: PathBuf,
    /// Before `run` opens an existing store, check every chunk's checksum
    /// in a separate process (`eventsieve store verify`), so that damaged
    /// files stop the start with a message instead of crashing it or
    /// forgetting ids. Reads the whole store once more. Default true.
    pub verify_store_on_start: bool,
    /// Longest that check may take, plus 1 s per 64 MiB of store; a check
    /// still running then (a damaged file can send it in circles) is
    /// killed and the store treated as damaged. Default `60s`.
    pub verify_store_timeout: String,
    /// Subject for new events; `{shard}` is replaced by the shard number.
    /// Default `events.unique.{shard}`.
    pub output_subject: String,
    /// How a batch's new events are republished: `per_shard` (one message
    /// per shard: the new lines, newline-delimited, in request order, with
    /// an `Eventsieve-Count` header) or `per_event` (one message each).
    /// Default `per_shard`.
    pub batch_output: BatchOutput,
    /// `core` (publish after the commit, at most once) or `jetstream` (into
    /// the stream `output_stream`, `Nats-Msg-Id` = `event_id`, acknowledged
    /// before the commit; one message per event, batches too). Default `core`.
    pub output: OutputKind,
    /// The JetStream stream of `output = "jetstream"`; created over
    /// `output_subject` (with `*` for the shard) if it does not exist.
    /// Default `EVENTSIEVE_OUTPUT`.
    pub output_stream: String,
    /// JetStream KV bucket of the window set at run time (key `window`,
    /// see `eventsieve window`); created if absent. Empty, or a server
    /// without JetStream: a window set at run time is kept in
    /// `<data_dir>/window` by each node. Default `eventsieve`.
    pub kv_bucket: String,
    /// Address of the Prometheus endpoint, or empty to disable. Default `127.0.0.1:9464`.
    pub metrics_addr: String,
    /// Most bytes the tables may take (0: no limit). Above it the window in
    /// force is halved (oldest ids go first) until they fit, with a warning
    /// and the metrics `eventsieve_window_in_force_ms` and
    /// `eventsieve_window_shrinks_total`; below half of it the window grows
    /// back to `window` as the ids it holds allow. Verdicts stay exact for
    /// the window in force. The 65 536 table segments take about 7 MiB
    /// once each has had an id, whatever the window: at least 8 MiB, and
    /// well above that to be useful. Default 0.
    pub max_table_bytes: u64,
    /// `memory` (every id in the tables) or `tiered` (the newest ids in
    /// the tables up to `hot_bytes`, older ones sealed on disk with a
    /// filter in RAM; verdicts stay exact). `tiered` needs `durability =
    /// "local"` or `"replicated"`: the sealed files are built from the
    /// LMDB store or the journal's local copy. Default `memory`.
    pub tier: Tier,
    /// With `tier = "tiered"`: bytes of table above which the ids older
    /// than a few seconds are sealed. At least 8388608. Default 1073741824
    /// (1 GiB, about 75 M ids).
    pub hot_bytes: u64,
    /// With `tier = "tiered"`: the directory of the sealed files (`""`:
    /// `<data_dir>/sealed`; within `data_dir` with `durability =
    /// "replicated"`). Default `""`.
    pub sealed_dir: String,
    /// With `tier = "tiered"`: bits per fingerprint of the sealed files'
    /// filters, 8 (about 1.3 bytes of RAM per sealed id; 0.39 % of new ids
    /// read a block per file) or 16 (about 2.5 bytes; 0.0015 %). Files
    /// written before a change keep theirs until merged. Default 8.
    pub sealed_filter_bits: u64,
    /// With `tier = "tiered"`: keep one filter per shard over every sealed
    /// file (the summary: a cuckoo filter of 16-bit fingerprints, 2.1 to 2.9
    /// bytes of RAM per sealed id, one probe per new id whatever the
    /// number of files) instead of each file's filters. The files' own
    /// filters are still written (`sealed_filter_bits`), so it can be
    /// turned off again. Default false.
    pub sealed_summary: bool,
    /// Address of the HTTP gateway (`POST /api/v1/events` and the rest, see
    /// the README), or empty to disable. Default empty.
    pub http_addr: String,
    /// Serve `GET /metrics` on the HTTP gateway too (the same text as
    /// `metrics_addr`). Default false.
    pub http_metrics: bool,
    /// Longest the HTTP gateway waits for a request's headers, and for the
    /// next request on an idle keep-alive connection; then it closes the
    /// connection. Default `10s`.
    pub http_header_timeout: String,
    /// HTTP connections served at once; further ones wait in the listen
    /// backlog until one closes. Kept below the open-files limit (each
    /// costs a file descriptor). Default 1024.
    pub http_max_connections: usize,
    /// Requests waiting for a commit before new ones wait (backpressure). Default 65536.
    pub max_pending: usize,
    /// Bytes of requests the sidecar holds at once (received and not yet
    /// answered). A request that would exceed it is answered 503 at once
    /// (`overloaded`) and its bytes are freed, so a flood costs a bounded
    /// amount of memory. At least `max_event_bytes`. Default 268435456
    /// (256 MiB).
    pub max_inflight_bytes: usize,
    /// Longest a graceful shutdown waits to answer requests in flight (on
    /// SIGINT/SIGTERM) before it commits what is pending and exits non-zero.
    /// A second signal exits at once. Default `10s`.
    pub shutdown_timeout: String,
    /// Log filter, `tracing` syntax (`RUST_LOG` overrides). Default `info`.
    pub log: String,
    /// Windowed aggregates over the accepted events (`[[aggregate]]`, any
    /// number; see the README). Default none.
    pub aggregate: Vec<AggregateConfig>,
    /// Leases and the journal of `durability = "replicated"`.
    pub cluster: ClusterConfig,
    /// Where accepted events go, by rules over their fields. Default: no
    /// rules, everything to `output_subject`.
    pub routing: RoutingSpec,
    /// The reorder buffer for sessions fed by several producers. Default off.
    pub ordering: OrderingConfig,
    /// The format events arrive in: JSON (default) or protobuf.
    pub input: InputConfig,
}

/// `key`: one name or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyConfig {
    One(String),
    Many(Vec<String>),
}

impl KeyConfig {
    fn names(&self) -> Vec<String> {
        match self {
            Self::One(name) => vec![name.clone()],
            Self::Many(names) => names.clone(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            subject_prefix: "dedup".into(),
            shards: 32,
            owned_shards: "all".into(),
            key: KeyConfig::One("event_id".into()),
            shard_key: String::new(),
            window: "7d".into(),
            max_event_bytes: 1024 * 1024,
            max_id_bytes: 256,
            durability: Durability::Local,
            commit_interval: "1ms".into(),
            fsync: false,
            data_dir: "data".into(),
            verify_store_on_start: true,
            verify_store_timeout: "60s".into(),
            output_subject: "events.unique.{shard}".into(),
            batch_output: BatchOutput::PerShard,
            output: OutputKind::Core,
            output_stream: "EVENTSIEVE_OUTPUT".into(),
            kv_bucket: "eventsieve".into(),
            metrics_addr: "127.0.0.1:9464".into(),
            max_table_bytes: 0,
            tier: Tier::Memory,
            hot_bytes: 1 << 30,
            sealed_filter_bits: 8,
            sealed_summary: false,
            sealed_dir: String::new(),
            http_addr: String::new(),
            http_metrics: false,
            http_header_timeout: "10s".into(),
            http_max_connections: 1024,
            max_pending: 65_536,
            max_inflight_bytes: 256 << 20,
            shutdown_timeout: "10s".into(),
            log: "info".into(),
            aggregate: Vec::new(),
            cluster: ClusterConfig::default(),
            routing: RoutingSpec::default(),
            ordering: OrderingConfig::default(),
            input: InputConfig::default(),
        }
    }
}

/// A configuration that cannot be used; the message names the field.
#[derive(Debug)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    fn message(message: String) -> Self {
        Self { message }
    }

    fn field(field: &str, value: &str, accepted: &str) -> Self {
        Self {
            message: format!("invalid `{field}` = {value:?}: accepted values are {accepted}"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment's message already names the key path and the source.
        let errors: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        Self {
            message: format!("invalid configuration: {}", errors.join("; ")),
        }
    }
}

/// Accepts `5` as well as `"5"` (an environment variable holding a number
/// arrives as one).
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrNumber {
        Text(String),
        Number(u64),
    }
    Ok(match TextOrNumber::deserialize(d)? {
        TextOrNumber::Text(s) => s,
        TextOrNumber::Number(n) => n.to_string(),
    })
}

const HOUR_MS: u64 = 3_600_000;

/// A duration field of 1 ms up to `max_ms` (`max` as written), or an error
/// naming the field with an example.
fn duration_field(
    name: &str,
    value: &str,
    max_ms: u64,
    max: &str,
    example: &str,
) -> Result<u64, ConfigError> {
    parse_duration_ms(value)
        .filter(|ms| (1..=max_ms).contains(ms))
        .ok_or_else(|| ConfigError::field(name, value, &format!("1ms to {max}, e.g. \"{example}\"")))
}

/// Parses `"7d"`, `"5m"`, `"30s"`, `"1500ms"`, `"2h"` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Parses `"all"` or `"0-15,20"` into a sorted list of shards below `shards`.
pub fn parse_shard_set(text: &str, shards: u32) -> Option<Vec<u32>> {
    if text.trim() == "all" {
        return Some((0..shards).collect());
    }
    let mut out = Vec::new();
    for part in text.split(',') {
        let (lo, hi): (u32, u32) = match part.trim().split_once('-') {
            Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
            None => {
                let n = part.trim().parse().ok()?;
                (n, n)
            }
        };
        if lo > hi || hi >= shards {
            return None;
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

/// A configuration with every field checked and converted.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub window_ms: u64,
    pub commit_interval_ms: u64,
    pub shutdown_timeout_ms: u64,
    /// The shards this node serves from the start.
    pub owned: Vec<u32>,
    pub metrics_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub http_header_timeout_ms: u64,
    pub verify_store_timeout_ms: u64,
    pub aggregates: Vec<AggregateSettings>,
    pub key: KeySpec,
    /// The reorder buffer, when on.
    pub ordering: Option<OrderingSettings>,
    /// This node's id in the cluster (given or made up).
    pub node_id: String,
    /// How events are read: JSON, or protobuf messages of a schema.
    pub format: crate::engine::input::Format,
    /// Protobuf events are republished in the canonical JSON mapping.
    pub output_json: bool,
    pub lease_ttl_ms: u64,
}

impl Settings {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            key: self.key.clone(),
            window_ms: self.window_ms,
            shards: self.config.shards,
            segments_per_shard: segments_per_shard(self.config.shards),
            limits: Limits {
                max_event_bytes: self.config.max_event_bytes,
                max_id_bytes: self.config.max_id_bytes,
            },
            capture: captured_fields(&self.aggregates),
            shard_key: (!self.config.shard_key.is_empty()).then(|| self.config.shard_key.clone()),
            format: self.format.clone(),
        }
    }
}

impl Config {
    /// Defaults, then the TOML file at `path` (or [`DEFAULT_PATH`] if it
    /// exists), then `EVENTSIEVE_*` variables, then validation.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field when a value cannot be used, or
    /// when an explicitly given file does not exist.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError {
                    message: format!("configuration file {} does not exist", p.display()),
                });
            }
            Some(p) => figment = figment.merge(Toml::file_exact(p)),
            None => figment = figment.merge(Toml::file(DEFAULT_PATH)),
        }
        let config: Config = figment
            .merge(Env::prefixed("EVENTSIEVE_").split("__"))
            .extract()?;
        config.validate()
    }

    /// Checks every field and converts the ones with units.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first field that cannot be used.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let window_ms = parse_duration_ms(&self.window)
            .filter(|ms| (1..=MAX_WINDOW_MS).contains(ms))
            .ok_or_else(|| {
                ConfigError::field(
                    "window",
                    &self.window,
                    "1ms to 7d, e.g. \"7d\", \"5m\", \"1500ms\"",
                )
            })?;
        let commit_interval_ms = parse_duration_ms(&self.commit_interval)
            .filter(|ms| *ms <= 1000)
            .ok_or_else(|| {
                ConfigError::field(
                    "commit_interval",
                    &self.commit_interval,
                    "0ms to 1s, e.g. \"1ms\"",
                )
            })?;
        parse_duration_ms(&self.nats.reconnect_delay_max)
            .filter(|ms| (1..=60_000).contains(ms))
            .ok_or_else(|| {
                ConfigError::field(
                    "nats.reconnect_delay_max",
                    &self.nats.reconnect_delay_max,
                    "1ms to 60s, e.g. \"250ms\"",
                )
            })?;
        let stream_ok = !self.output_stream.is_empty()
            && !self
                .output_stream
                .contains(|c: char| c.is_whitespace() || ".*>/\\".contains(c));
        if !stream_ok {
            return Err(ConfigError::field(
                "output_stream",
                &self.output_stream,
                "a JetStream stream name: not empty, no spaces, '.', '*', '>', '/' or '\\'",
            ));
        }
        // KV bucket names: letters, digits, '-' and '_'.
        if !self
            .kv_bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::field(
                "kv_bucket",
                &self.kv_bucket,
                "a KV bucket name (letters, digits, '-', '_'), or \"\" for none",
            ));
        }
        let shutdown_timeout_ms =
            duration_field("shutdown_timeout", &self.shutdown_timeout, HOUR_MS, "1h", "10s")?;
        let http_header_timeout_ms = duration_field(
            "http_header_timeout",
            &self.http_header_timeout,
            HOUR_MS,
            "1h",
            "10s",
        )?;
        let verify_store_timeout_ms = duration_field(
            "verify_store_timeout",
            &self.verify_store_timeout,
            24 * HOUR_MS,
            "1d",
            "60s",
        )?;
        if self.http_max_connections == 0 {
            return Err(ConfigError::field("http_max_connections", "0", "1 or more"));
        }
        if !(1..=65_536).contains(&self.shards) {
            return Err(ConfigError::field(
                "shards",
                &self.shards.to_string(),
                "1 to 65536",
            ));
        }
        let owned = parse_shard_set(&self.owned_shards, self.shards).ok_or_else(|| {
            ConfigError::field(
                "owned_shards",
                &self.owned_shards,
                "\"all\" or a list of shards below `shards`, e.g. \"0-15,20\"",
            )
        })?;
        let token_ok = |s: &str| !s.is_empty() && !s.contains(['*', '>', ' ', '.']);
        if !self.subject_prefix.split('.').all(token_ok) {
            return Err(ConfigError::field(
                "subject_prefix",
                &self.subject_prefix,
                "dot-separated NATS tokens without wildcards or spaces, e.g. \"dedup\"",
            ));
        }
        let output_ok = self
            .output_subject
            .split('.')
            .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ']));
        if !output_ok {
            return Err(ConfigError::field(
                "output_subject",
                &self.output_subject,
                "a NATS subject without wildcards, may contain {shard}",
            ));
        }
        if !(64..=64 * 1024 * 1024).contains(&self.max_event_bytes) {
            return Err(ConfigError::field(
                "max_event_bytes",
                &self.max_event_bytes.to_string(),
                "64 to 67108864",
            ));
        }
        if !(1..=4096).contains(&self.max_id_bytes) {
            return Err(ConfigError::field(
                "max_id_bytes",
                &self.max_id_bytes.to_string(),
                "1 to 4096",
            ));
        }
        if self.max_inflight_bytes < self.max_event_bytes || self.max_inflight_bytes > u32::MAX as usize {
            return Err(ConfigError::field(
                "max_inflight_bytes",
                &self.max_inflight_bytes.to_string(),
                "at least max_event_bytes and at most 4294967295",
            ));
        }
        if self.max_table_bytes != 0 && self.max_table_bytes < 8 << 20 {
            return Err(ConfigError::field(
                "max_table_bytes",
                &self.max_table_bytes.to_string(),
                "0 (no limit) or at least 8388608 (the table segments alone take about 7 MiB)",
            ));
        }
        if self.tier == Tier::Tiered && self.durability == Durability::Memory {
            return Err(ConfigError::field(
                "tier",
                "tiered",
                "\"memory\", or \"tiered\" with durability = \"local\" or \"replicated\" (sealed files are built from the LMDB store or the journal's local copy)",
            ));
        }
        if self.tier == Tier::Tiered
            && self.durability == Durability::Replicated
            && !self.sealed_dir.is_empty()
            && !Path::new(&self.sealed_dir).starts_with(&self.data_dir)
        {
            return Err(ConfigError::field(
                "sealed_dir",
                &self.sealed_dir,
                "empty or a directory within data_dir with durability = \"replicated\" (a local copy of another journal stream is moved aside with everything in data_dir)",
            ));
        }
        if !matches!(self.sealed_filter_bits, 8 | 16) {
            return Err(ConfigError::field(
                "sealed_filter_bits",
                &self.sealed_filter_bits.to_string(),
                "8 or 16",
            ));
        }
        if self.hot_bytes < 8 << 20 {
            return Err(ConfigError::field(
                "hot_bytes",
                &self.hot_bytes.to_string(),
                "at least 8388608 (the table segments alone take about 7 MiB)",
            ));
        }
        if self.max_pending == 0 {
            return Err(ConfigError::field("max_pending", "0", "1 or more"));
        }
        if self.nats.subscription_capacity == 0 {
            return Err(ConfigError::field("nats.subscription_capacity", "0", "1 or more"));
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return Err(ConfigError::field(
                "nats.user",
                "(one of user / password)",
                "both user and password, or neither (a token goes in nats.token)",
            ));
        }
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            return Err(ConfigError::field(
                "nats.tls_cert",
                "(one of tls_cert / tls_key)",
                "both tls_cert and tls_key, or neither",
            ));
        }
        let address = |field: &str, value: &str, example: &str| match value.trim() {
            "" => Ok(None),
            addr => addr.parse().map(Some).map_err(|_| {
                ConfigError::field(
                    field,
                    addr,
                    &format!("an IP:port such as \"{example}\", or \"\" to disable"),
                )
            }),
        };
        let metrics_addr = address("metrics_addr", &self.metrics_addr, "127.0.0.1:9464")?;
        let http_addr = address("http_addr", &self.http_addr, "127.0.0.1:8080")?;
        let aggregates = self
            .aggregate
            .iter()
            .enumerate()
            .map(|(i, a)| a.validate(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut names: Vec<&str> = aggregates.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::field(
                "aggregate.name",
                w[0],
                "a name no other aggregate has",
            ));
        }
        let names = self.key.names();
        let key = KeySpec::parse(&names).map_err(|e| ConfigError::field("key", &names.join(","), &e))?;
        let plain_field = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !plain_field(&self.shard_key) {
            return Err(ConfigError::field(
                "shard_key",
                &self.shard_key,
                "\"\" (the key) or a top-level field name such as \"session_id\"",
            ));
        }
        let lease_ttl_ms = parse_duration_ms(&self.cluster.lease_ttl)
            .filter(|ms| ms % 1000 == 0 && (1000..=60_000).contains(ms))
            .ok_or_else(|| {
                ConfigError::field(
                    "cluster.lease_ttl",
                    &self.cluster.lease_ttl,
                    "whole seconds from 1s to 60s, e.g. \"3s\"",
                )
            })?;
        let node_ok = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !node_ok(&self.cluster.node_id) || self.cluster.node_id.len() > 64 {
            return Err(ConfigError::field(
                "cluster.node_id",
                &self.cluster.node_id,
                "up to 64 letters, digits, `-` and `_`, or empty for one made up at start",
            ));
        }
        let node_id = if self.cluster.node_id.is_empty() {
            made_up_node_id()
        } else {
            self.cluster.node_id.clone()
        };
        if !(1..=5).contains(&self.cluster.replicas) {
            return Err(ConfigError::field(
                "cluster.replicas",
                &self.cluster.replicas.to_string(),
                "1 to 5 (1 on a single server, 3 on a cluster)",
            ));
        }
        if self.durability == Durability::Replicated && self.kv_bucket.is_empty() {
            return Err(ConfigError::field(
                "kv_bucket",
                "",
                "a bucket name: durability \"replicated\" keeps its shard leases there",
            ));
        }
        let ordering = self.ordering.validate()?;
        let InputSettings { format, output_json } = self.input.validate()?;
        if let Some(schema) = format.schema() {
            let shard_key = (!self.shard_key.is_empty()).then_some(self.shard_key.as_str());
            input_config::check_fields(&schema, &key, shard_key, &aggregates, ordering.as_ref())
                .map_err(|e| ConfigError::message(format!("input.message {}: {e}", schema.name())))?;
        }
        Ok(Settings {
            format,
            output_json,
            node_id,
            lease_ttl_ms,
            key,
            ordering,
            aggregates,
            window_ms,
            commit_interval_ms,
            shutdown_timeout_ms,
            http_header_timeout_ms,
            verify_store_timeout_ms,
            owned,
            metrics_addr,
            http_addr,
            config: self,
        })
    }
}

/// A node id made up at start when `cluster.node_id` is empty: time and
/// process id, base 36.
pub fn made_up_node_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut n = nanos ^ (u128::from(std::process::id()) << 64);
    let mut id = String::new();
    while n > 0 && id.len() < 22 {
        id.push(
            char::from_digit((n % 36) as u32, 36)
                .unwrap_or('0')
                .to_ascii_uppercase(),
        );
        n /= 36;
    }
    id
}

#[cfg(test)]
// `figment::Jail` closures return `figment::Error`, which is large by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_err(jail_setup: impl FnOnce(&mut Jail) -> figment::error::Result<()>) -> String {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail_setup(jail)?;
            message = Config::load(None).unwrap_err().to_string();
            Ok(())
        });
        message
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("1500ms"), Some(1500));
        assert_eq!(parse_duration_ms("2 h"), Some(7_200_000));
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("m"), None);
        assert_eq!(parse_duration_ms("3w"), None);
    }

    #[test]
    fn shard_sets() {
        assert_eq!(parse_shard_set("all", 3), Some(vec![0, 1, 2]));
        assert_eq!(parse_shard_set("0-2, 5,1", 8), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_shard_set("8", 8), None);
        assert_eq!(parse_shard_set("3-1", 8), None);
        assert_eq!(parse_shard_set("", 8), None);
    }

    #[test]
    fn defaults_without_file_or_env() {
        Jail::expect_with(|_| {
            let s = Config::load(None).unwrap();
            assert_eq!(s.config, Config::default());
            assert_eq!(s.window_ms, MAX_WINDOW_MS);
            assert_eq!(s.owned.len(), 32);
            assert_eq!(s.shutdown_timeout_ms, 10_000);
            Ok(())
        });
    }

    #[test]
    fn secrets_are_redacted_wherever_they_are_printed() {
        assert_eq!(
            redact_urls("nats://alice:hunter2@h1:4222, tls://t0ken@h2, nats://h3"),
            "nats://alice:<redacted>@h1:4222,tls://<redacted>@h2,nats://h3"
        );
        let nats = NatsConfig {
            url: "nats://alice:hunter2@h1:4222".into(),
            user: Some("bob".into()),
            password: Some(Secret::new("hunter3")),
            token: Some(Secret::new("t0ken")),
            ..NatsConfig::default()
        };
        let printed = format!("{nats:?} {nats:#?}");
        for secret in ["hunter2", "hunter3", "t0ken"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(
            printed.contains("alice") && printed.contains("bob"),
            "users are not secret"
        );
    }

    #[test]
    fn half_given_credentials_are_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("EVENTSIEVE_NATS__USER", "bob");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("nats.user") && err.contains("both user and password"),
                "{err}"
            );
            jail.set_env("EVENTSIEVE_NATS__PASSWORD", "hunter3");
            assert!(Config::load(None).is_ok());
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("EVENTSIEVE_NATS__PASSWORD", "hunter3");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("nats.user") && !err.contains("hunter3"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file(
                DEFAULT_PATH,
                r#"
                    window = "5m"
                    shards = 16
                    [nats]
                    url = "nats://file:4222"
                    user = "fileuser"
                    password = "filepass"
                "#,
            )?;
            jail.set_env("EVENTSIEVE_NATS__URL", "nats://env:4222");
            jail.set_env("EVENTSIEVE_DURABILITY", "memory");
            jail.set_env("EVENTSIEVE_BATCH_OUTPUT", "per_event");
            let s = Config::load(None).unwrap();
            assert_eq!(s.config.batch_output, BatchOutput::PerEvent);
            assert_eq!(s.config.nats.url, "nats://env:4222");
            assert_eq!(s.config.nats.user.as_deref(), Some("fileuser"));
            assert_eq!(s.config.shards, 16);
            assert_eq!(s.window_ms, 300_000);
            assert_eq!(s.config.durability, Durability::Memory);
            assert_eq!(s.config.subject_prefix, "dedup", "default kept");
            Ok(())
        });
    }

    #[test]
    fn an_explicit_path_is_used_and_must_exist() {
        Jail::expect_with(|jail| {
            jail.create_file("other.toml", "shards = 4")?;
            assert_eq!(
                Config::load(Some(Path::new("other.toml"))).unwrap().config.shards,
                4
            );
            let err = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_key_is_one_name_or_several() {
        Jail::expect_with(|jail| {
            jail.create_file("k.toml", "key = [\"node_id\", \"device.serial\"]\n")?;
            let s = Config::load(Some(Path::new("k.toml"))).unwrap();
            assert_eq!(
                s.key,
                KeySpec::Fields(vec![
                    vec!["node_id".into()],
                    vec!["device".into(), "serial".into()]
                ])
            );
            jail.set_env("EVENTSIEVE_KEY", "content");
            assert_eq!(
                Config::load(Some(Path::new("k.toml"))).unwrap().key,
                KeySpec::Content
            );
            jail.set_env("EVENTSIEVE_KEY", "a..b");
            let err = Config::load(Some(Path::new("k.toml"))).unwrap_err().to_string();
            assert!(err.contains("`key`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn each_invalid_value_names_its_field() {
        let cases: [(&str, &str, &str); 22] = [
            ("EVENTSIEVE_KV_BUCKET", "a.b", "`kv_bucket`"),
            ("EVENTSIEVE_BATCH_OUTPUT", "per_line", "batch_output"),
            ("EVENTSIEVE_OUTPUT", "kafka", "output"),
            ("EVENTSIEVE_OUTPUT_STREAM", "a.b", "`output_stream`"),
            (
                "EVENTSIEVE_NATS__RECONNECT_DELAY_MAX",
                "0ms",
                "reconnect_delay_max",
            ),
            ("EVENTSIEVE_MAX_INFLIGHT_BYTES", "1000", "`max_inflight_bytes`"),
            ("EVENTSIEVE_SHUTDOWN_TIMEOUT", "forever", "`shutdown_timeout`"),
            ("EVENTSIEVE_WINDOW", "8d", "`window`"),
            ("EVENTSIEVE_WINDOW", "soon", "`window`"),
            ("EVENTSIEVE_SHARDS", "0", "`shards`"),
            ("EVENTSIEVE_DURABILITY", "disk", "durability"),
            ("EVENTSIEVE_COMMIT_INTERVAL", "5s", "`commit_interval`"),
            ("EVENTSIEVE_OWNED_SHARDS", "40", "`owned_shards`"),
            ("EVENTSIEVE_SUBJECT_PREFIX", "a.*", "`subject_prefix`"),
            ("EVENTSIEVE_METRICS_ADDR", "nowhere", "`metrics_addr`"),
            ("EVENTSIEVE_HTTP_ADDR", "port 80", "`http_addr`"),
            ("EVENTSIEVE_MAX_TABLE_BYTES", "1000", "`max_table_bytes`"),
            ("EVENTSIEVE_MAX_ID_BYTES", "0", "`max_id_bytes`"),
            ("EVENTSIEVE_TIER", "disk", "tier"),
            ("EVENTSIEVE_HOT_BYTES", "1000", "`hot_bytes`"),
            ("EVENTSIEVE_SEALED_FILTER_BITS", "12", "`sealed_filter_bits`"),
            (
                "EVENTSIEVE_NATS__SUBSCRIPTION_CAPACITY",
                "many",
                "subscription_capacity",
            ),
        ];
        for (var, value, field) in cases {
            let message = load_err(|jail| {
                jail.set_env(var, value);
                Ok(())
            });
            assert!(message.to_lowercase().contains(field), "{var}={value}: {message}");
        }
        let message = load_err(|jail| {
            jail.create_dir("config")?;
            jail.create_file(DEFAULT_PATH, "windw = \"5m\"").map(drop)
        });
        assert!(message.contains("windw"), "{message}");
    }

    #[test]
    fn a_tiered_table_needs_a_store_and_its_files_follow_the_copy() {
        let mut c = Config {
            tier: Tier::Tiered,
            ..Config::default()
        };
        assert!(c.clone().validate().is_ok());
        c.durability = Durability::Memory;
        let message = c.clone().validate().unwrap_err().to_string();
        assert!(
            message.contains("`tier`") && message.contains("local"),
            "{message}"
        );
        c.durability = Durability::Replicated;
        assert!(c.clone().validate().is_ok());
        c.sealed_dir = "/elsewhere/sealed".into();
        let message = c.clone().validate().unwrap_err().to_string();
        assert!(
            message.contains("`sealed_dir`") && message.contains("data_dir"),
            "{message}"
        );
        c.sealed_dir = c.data_dir.join("sealed").display().to_string();
        assert!(c.clone().validate().is_ok());
        c.durability = Durability::Local;
        c.sealed_dir = "/elsewhere/sealed".into();
        assert!(c.clone().validate().is_ok());
    }

    #[test]
    fn ordering_and_shard_key_are_checked_with_the_field_named() {
        let mut c = Config::default();
        assert!(c.clone().validate().unwrap().ordering.is_none(), "off by default");
        c.ordering.session = "session_id".into();
        let s = c.clone().validate().unwrap();
        let o = s.ordering.expect("on");
        assert_eq!((o.hold_ms, o.ms_per_unit), (2000, None));
        for (change, field) in [
            (
                (|c: &mut Config| c.ordering.hold = "2 weeks".into()) as fn(&mut Config),
                "ordering.hold",
            ),
            (|c| c.ordering.by = "session_id".into(), "ordering.by"),
            (|c| c.ordering.time_unit = "h".into(), "ordering.time_unit"),
            (|c| c.ordering.max_bytes = 10, "ordering.max_bytes"),
            (|c| c.shard_key = "a.b".into(), "shard_key"),
        ] {
            let mut bad = c.clone();
            change(&mut bad);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_shipped_configuration_file_states_the_defaults() {
        let shipped: Config = Figment::new()
            .merge(figment::providers::Toml::string(include_str!(
                "../../config/eventsieve.toml"
            )))
            .extract()
            .expect("config/eventsieve.toml parses");
        assert_eq!(
            shipped,
            Config::default(),
            "config/eventsieve.toml and Config::default() differ"
        );
    }
}
