//! The connection to NATS, below every part that talks to it: options
//! and connecting, every subject, the shared KV bucket.
//!
//! | module | role |
//! |---|---|
//! | [`options`] | connection options from `[nats]`, and connecting |
//! | [`subjects`] | every subject, built in one place |
//! | [`kv`] | the KV bucket the sidecars share: opened or created, per-key TTL |
//! | [`ordered`] | requests that leave in the order they were sent |

pub mod kv;
pub mod options;
pub mod ordered;
pub mod subjects;

use async_nats::Client;
use bytes::Bytes;

pub use subjects::Subjects;

/// Why the NATS transport could not start.
#[derive(Debug)]
pub enum NatsError {
    /// The server could not be reached or refused the connection.
    Connect(String),
    /// A subscription could not be made.
    Subscribe(String),
}

impl std::fmt::Display for NatsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect to NATS: {e}"),
            Self::Subscribe(e) => write!(f, "cannot subscribe: {e}"),
        }
    }
}

impl std::error::Error for NatsError {}

/// Returns once the server has processed every subscription this client
/// made before the call. `Client::flush` only writes the socket; a message
/// the client sends itself and gets back has passed the server after them
/// (a server handles one connection's protocol in order).
///
/// # Errors
///
/// If the message does not come back within 10 s.
pub async fn registered(client: &Client) -> Result<(), NatsError> {
    use futures_util::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| NatsError::Subscribe(e.to_string()))?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(NatsError::Connect(
            "the server did not confirm the subscriptions within 10 s".into(),
        )),
    }
}
