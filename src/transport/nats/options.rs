//! Connection options, apart from the connection: credentials, TLS,
//! capacities and the event callback, from the `[nats]` settings.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

use crate::config::NatsConfig;
use crate::observe::metrics::Metrics;
use crate::transport::nats::NatsError;

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
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &nats.token {
        options = options.token(token.clone());
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

/// Connects to the servers in `nats.url` (comma-separated).
///
/// # Errors
///
/// [`NatsError::Connect`] if the URL is malformed or no server accepts.
pub async fn connect(nats: &NatsConfig, metrics: Arc<Metrics>) -> Result<Client, NatsError> {
    let urls: Vec<async_nats::ServerAddr> = nats
        .url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| NatsError::Connect(format!("nats.url {:?}: {e}", nats.url)))?;
    options(nats, metrics)
        .await?
        .connect(urls)
        .await
        .map_err(|e| NatsError::Connect(format!("{}: {e}", nats.url)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
