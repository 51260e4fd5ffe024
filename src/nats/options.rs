//! Connection options, apart from the connection: credentials, TLS,
//! capacities and the event callback, from the `[nats]` settings.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

use crate::config::{NatsConfig, Secret, redact_urls};
use crate::nats::NatsError;
use crate::observe::metrics::Metrics;

/// The options for `nats` (credentials files are read here).
///
/// # Errors
///
/// [`NatsError::Connect`] if a credentials file cannot be read.
pub async fn options(nats: &NatsConfig, metrics: Arc<Metrics>) -> Result<ConnectOptions, NatsError> {
    let delay_max =
        Duration::from_millis(crate::config::parse_duration_ms(&nats.reconnect_delay_max).unwrap_or(250));
    let mut options = ConnectOptions::new()
        .name(&nats.name)
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, delay_max))
        .subscription_capacity(nats.subscription_capacity)
        .custom_inbox_prefix(&nats.inbox_prefix)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        Metrics::inc(&metrics.slow_consumers);
                        tracing::warn!(message = "Slow consumer: the client dropped messages.", sid);
                    }
                    other => tracing::info!(message = "NATS connection event.", event = %other),
                }
            }
        });
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &nats.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(path) = &nats.credentials {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| NatsError::Connect(format!("credentials file {}: {e}", path.display())))?;
    }
    if let Some(ca) = &nats.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(options)
}

/// The pause before reconnection attempt `attempts` (counted from 1): none
/// for the first, then 2, 4, 8 … ms up to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(40);
    match attempts {
        0 | 1 => Duration::ZERO,
        _ => Duration::from_millis(1u64 << exp).min(max),
    }
}

/// `nats` with the credentials of its URLs (`user:password@`, `token@`)
/// moved into `user`/`password`/`token`, so that the client, which logs
/// the servers it tries, never holds them in a URL.
///
/// # Errors
///
/// [`NatsError::Connect`] if the URLs carry different credentials, or
/// credentials are also given in the settings.
fn lift_credentials(nats: &NatsConfig) -> Result<NatsConfig, NatsError> {
    let mut clean = Vec::new();
    let mut found: Option<(Option<String>, Secret)> = None;
    for url in nats.url.split(',').map(str::trim) {
        let start = url.find("://").map_or(0, |i| i + 3);
        let Some(at) = url[start..].rfind('@').map(|i| start + i) else {
            clean.push(url.to_string());
            continue;
        };
        let credentials = match url[start..at].split_once(':') {
            Some((user, password)) => (Some(user.to_string()), Secret::new(password)),
            None => (None, Secret::new(&url[start..at])),
        };
        if found.as_ref().is_some_and(|f| *f != credentials) {
            return Err(NatsError::Connect(format!(
                "nats.url {:?}: the servers carry different credentials; give them once in nats.user/password or nats.token",
                redact_urls(&nats.url)
            )));
        }
        found = Some(credentials);
        clean.push(format!("{}{}", &url[..start], &url[at + 1..]));
    }
    let mut lifted = nats.clone();
    lifted.url = clean.join(",");
    if let Some((user, secret)) = found {
        if nats.user.is_some() || nats.token.is_some() {
            return Err(NatsError::Connect(format!(
                "nats.url {:?} carries credentials and so do nats.user/nats.token: give them once",
                redact_urls(&nats.url)
            )));
        }
        match user {
            Some(user) => (lifted.user, lifted.password) = (Some(user), Some(secret)),
            None => lifted.token = Some(secret),
        }
    }
    Ok(lifted)
}

/// Connects to the servers in `nats.url` (comma-separated).
///
/// # Errors
///
/// [`NatsError::Connect`] if the URL is malformed or no server accepts.
pub async fn connect(nats: &NatsConfig, metrics: Arc<Metrics>) -> Result<Client, NatsError> {
    let nats = &lift_credentials(nats)?;
    let urls: Vec<async_nats::ServerAddr> = nats
        .url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| NatsError::Connect(format!("nats.url {:?}: {e}", redact_urls(&nats.url))))?;
    options(nats, metrics)
        .await?
        .connect(urls)
        .await
        .map_err(|e| NatsError::Connect(format!("{}: {e}", redact_urls(&nats.url))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_urls_for_the_settings() {
        let with = |url: &str| NatsConfig {
            url: url.into(),
            ..NatsConfig::default()
        };
        let lifted =
            lift_credentials(&with("nats://alice:s3cret@h1:4222, nats://alice:s3cret@h2:4222")).unwrap();
        assert_eq!(lifted.url, "nats://h1:4222,nats://h2:4222");
        assert_eq!(lifted.user.as_deref(), Some("alice"));
        assert_eq!(lifted.password.as_ref().map(Secret::expose), Some("s3cret"));
        let lifted = lift_credentials(&with("tls://t0ken@h1:4222")).unwrap();
        assert_eq!(
            (lifted.url.as_str(), lifted.token.as_ref().map(Secret::expose)),
            ("tls://h1:4222", Some("t0ken"))
        );
        assert_eq!(
            lift_credentials(&with("nats://h1:4222")).unwrap(),
            with("nats://h1:4222")
        );
        let err = lift_credentials(&with("nats://a:x@h1,nats://a:y@h2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("different credentials") && !err.contains(":x@") && !err.contains(":y@"),
            "{err}"
        );
        let twice = NatsConfig {
            token: Some(Secret::new("t")),
            ..with("nats://a:x@h1")
        };
        assert!(
            lift_credentials(&twice)
                .unwrap_err()
                .to_string()
                .contains("give them once")
        );
    }

    #[test]
    fn reconnect_pauses_double_up_to_the_maximum() {
        let max = Duration::from_millis(250);
        let pauses: Vec<u64> = (1..=12)
            .map(|a| reconnect_delay(a, max).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [0, 2, 4, 8, 16, 32, 64, 128, 250, 250, 250, 250]);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
    }
}
