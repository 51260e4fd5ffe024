//! `[nats]`: the connection, and the credentials it is made with.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A credential: used as given, printed as `<redacted>` (`eventsieve
/// config`, logs, error messages).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the connection only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `urls` (comma-separated) with the password of any `user:password@`
/// replaced, so that they can be printed.
pub fn redact_urls(urls: &str) -> String {
    let redact = |url: &str| -> String {
        let url = url.trim();
        let start = url.find("://").map_or(0, |i| i + 3);
        let Some(at) = url[start..].rfind('@').map(|i| start + i) else {
            return url.to_string();
        };
        match url[start..at].find(':') {
            Some(colon) => format!("{}:<redacted>{}", &url[..start + colon], &url[at..]),
            // A lone token or user before `@`: a credential too.
            None => format!("{}<redacted>{}", &url[..start], &url[at..]),
        }
    };
    urls.split(',').map(redact).collect::<Vec<_>>().join(",")
}

/// NATS connection settings (`[nats]`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// Client name shown by the server. Default `eventsieve`.
    pub name: String,
    /// User and password authentication, both or neither. Default none.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// Token authentication. Default none.
    pub token: Option<Secret>,
    /// Path of a `.creds` file (JWT + nkey). Default none.
    pub credentials: Option<PathBuf>,
    /// TLS: CA certificate (PEM) to trust, and a client certificate and key
    /// for mutual TLS. Default none.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Messages buffered per subscription before the client reports a slow
    /// consumer and drops. Default 65536.
    pub subscription_capacity: usize,
    /// Longest pause between two attempts to reconnect after the server
    /// went away (the pauses double from 1 ms up to it), so that service
    /// resumes within about this long once a server is back. The client's
    /// own default is 4 s. Default `250ms`.
    pub reconnect_delay_max: String,
    /// Prefix of the subjects this client receives replies on. With the
    /// shipped permissions each user has its own (`_INBOX_operator` for the
    /// `eventsieve` CLI run as operator), so that no user can read another's
    /// replies. Default `_INBOX`.
    pub inbox_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            name: "eventsieve".into(),
            user: None,
            password: None,
            token: None,
            credentials: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            subscription_capacity: 65_536,
            reconnect_delay_max: "250ms".into(),
            inbox_prefix: "_INBOX".into(),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_urls(&self.url))
            .field("name", &self.name)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("credentials", &self.credentials)
            .field("inbox_prefix", &self.inbox_prefix)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("reconnect_delay_max", &self.reconnect_delay_max)
            .finish()
    }
}
