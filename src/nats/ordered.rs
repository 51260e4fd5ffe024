//! Requests that leave in the order they were sent: the message is
//! published before [`OrderedRequests::send`] returns, and the answer is
//! awaited afterwards. (A `Client::request` sends its message only when
//! first polled past the client's full command channel, so requests
//! awaited in tasks of their own may leave in any order.)
//!
//! Answers come back on one subscription of the client's inbox prefix,
//! `<inbox>.<n>`, and go to the request that waits for `n`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use async_nats::{Client, HeaderMap, Message, StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::nats::NatsError;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// See the module's documentation.
pub struct OrderedRequests {
    client: Client,
    /// `<inbox>.`: a request's answer comes to this plus its number.
    prefix: String,
    next: AtomicU64,
    waiting: Waiting,
    /// Hands answers to their requests.
    task: JoinHandle<()>,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAnswer {
    /// The message could not be published.
    NotSent(String),
    /// No one subscribes to the subject.
    NoResponders,
    /// The connection dropped the request.
    Dropped,
}

/// The answer to one request, once it comes.
pub struct Answer {
    rx: oneshot::Receiver<Message>,
    /// Removes the request from the waiting ones if it is given up on.
    _waiting: Forget,
}

struct Forget {
    waiting: Waiting,
    n: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.n);
    }
}

impl Answer {
    /// The answer, or why none will come.
    ///
    /// # Errors
    ///
    /// [`NoAnswer::NoResponders`] (the server's 503), or
    /// [`NoAnswer::Dropped`] if the connection ended.
    pub async fn get(self) -> Result<Message, NoAnswer> {
        match self.rx.await {
            Ok(m) if m.status == Some(StatusCode::NO_RESPONDERS) => Err(NoAnswer::NoResponders),
            Ok(m) => Ok(m),
            Err(_) => Err(NoAnswer::Dropped),
        }
    }
}

impl OrderedRequests {
    /// Subscribes to `<a new inbox>.*` and starts handing answers out.
    ///
    /// # Errors
    ///
    /// [`NatsError::Subscribe`] if the server refuses the subscription.
    pub async fn start(client: Client) -> Result<Self, NatsError> {
        let inbox = client.new_inbox();
        let mut answers = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| NatsError::Subscribe(format!("{inbox}.*: {e}")))?;
        let waiting: Waiting = Arc::default();
        let task = tokio::spawn({
            let waiting = waiting.clone();
            async move {
                while let Some(answer) = answers.next().await {
                    let n = answer.subject.rsplit('.').next().and_then(|n| n.parse().ok());
                    let to =
                        n.and_then(|n| waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&n));
                    if let Some(to) = to {
                        let _ = to.send(answer);
                    }
                }
            }
        });
        Ok(Self {
            client,
            prefix: format!("{inbox}."),
            next: AtomicU64::new(0),
            waiting,
            task,
        })
    }

    /// Publishes a request to `subject`: queued for the server when this
    /// returns, after every request sent before it. The answer comes with
    /// [`Answer::get`] (bound it with a timeout).
    ///
    /// # Errors
    ///
    /// [`NoAnswer::NotSent`] if the client refused the message.
    pub async fn send(&self, subject: Subject, headers: HeaderMap, body: Bytes) -> Result<Answer, NoAnswer> {
        let n = self.next.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(n, tx);
        let forget = Forget {
            waiting: self.waiting.clone(),
            n,
        };
        let reply = Subject::from(format!("{}{n}", self.prefix));
        self.client
            .publish_with_reply_and_headers(subject, reply, headers, body)
            .await
            .map_err(|e| NoAnswer::NotSent(e.to_string()))?;
        Ok(Answer { rx, _waiting: forget })
    }
}

impl Drop for OrderedRequests {
    fn drop(&mut self) {
        self.task.abort();
    }
}
