//! `[ordering]`: the optional reorder buffer, as written
//! ([`OrderingConfig`]) and checked ([`OrderingSettings`]).

use serde::{Deserialize, Serialize};

use super::{ConfigError, parse_duration_ms};

/// `[ordering]`: accepted events of a session released in the order of a
/// field of theirs, within a bound. Off unless `session` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingConfig {
    /// Top-level text field naming the session, e.g. `session_id`; empty:
    /// no reordering. Default empty.
    pub session: String,
    /// Top-level numeric field giving the order within a session: a
    /// sequence number (`time_unit` empty), or a timestamp. Default `seq`.
    pub by: String,
    /// Unit of `by` when it is a timestamp: `s` or `ms`; empty for a
    /// sequence number. Default empty.
    pub time_unit: String,
    /// How long an event waits for the events before it. With a sequence
    /// number, the next one expected goes at once. Default `2s`.
    pub hold: String,
    /// The sequence number a session starts with (its first event goes at
    /// once). Default 0.
    pub first_seq: i64,
    /// Most bytes of events held at once (a full buffer releases its
    /// oldest). Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        Self {
            session: String::new(),
            by: "seq".into(),
            time_unit: String::new(),
            hold: "2s".into(),
            first_seq: 0,
            max_bytes: 64 << 20,
        }
    }
}

/// `[ordering]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderingSettings {
    pub session: String,
    pub by: String,
    /// Milliseconds per unit of `by` for a timestamp; `None`: a sequence.
    pub ms_per_unit: Option<f64>,
    pub hold_ms: u64,
    pub first_seq: i64,
    pub max_bytes: usize,
}

impl OrderingConfig {
    /// `None` when off.
    ///
    /// # Errors
    ///
    /// The first field that is not valid, named.
    pub fn validate(&self) -> Result<Option<OrderingSettings>, ConfigError> {
        if self.session.is_empty() {
            return Ok(None);
        }
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !plain(&self.session) {
            return Err(ConfigError::field(
                "ordering.session",
                &self.session,
                "a top-level field name such as \"session_id\"",
            ));
        }
        if !plain(&self.by) || self.by == self.session {
            return Err(ConfigError::field(
                "ordering.by",
                &self.by,
                "a top-level numeric field other than the session's, such as \"seq\"",
            ));
        }
        let ms_per_unit = match self.time_unit.as_str() {
            "" => None,
            "s" => Some(1000.0),
            "ms" => Some(1.0),
            other => {
                return Err(ConfigError::field(
                    "ordering.time_unit",
                    other,
                    "\"s\", \"ms\", or empty for a sequence number",
                ));
            }
        };
        let hold_ms = parse_duration_ms(&self.hold)
            .filter(|ms| (1..=60_000).contains(ms))
            .ok_or_else(|| ConfigError::field("ordering.hold", &self.hold, "from 1ms to 60s, e.g. \"2s\""))?;
        if !(1024..=1 << 34).contains(&self.max_bytes) {
            return Err(ConfigError::field(
                "ordering.max_bytes",
                &self.max_bytes.to_string(),
                "from 1024 to 16 GiB",
            ));
        }
        Ok(Some(OrderingSettings {
            session: self.session.clone(),
            by: self.by.clone(),
            ms_per_unit,
            hold_ms,
            first_seq: self.first_seq,
            max_bytes: self.max_bytes,
        }))
    }
}
