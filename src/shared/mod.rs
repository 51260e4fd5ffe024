//! What the parts of one running sidecar share: the pipeline, the budget
//! of request bytes, the NATS connection and its subjects, the counters.
//! Both transports, the cluster keeper, the control plane and the
//! aggregate queries take it; no one of them owns it.

pub mod budget;

use std::sync::Arc;

use async_nats::Client;

use crate::nats::Subjects;
use crate::nats::ordered::OrderedRequests;
use crate::observe::metrics::Metrics;
use crate::output::Sink;
use crate::pipeline::Pipeline;
use crate::route::Router;

pub use budget::{Budget, Held};

/// The state every request handler and background task shares.
pub struct Shared {
    /// The verdict path, ending in the configured output.
    pub pipeline: Arc<Pipeline<Sink>>,
    /// Bytes of requests held at once.
    pub budget: Budget,
    pub client: Client,
    pub subjects: Subjects,
    pub metrics: Arc<Metrics>,
    /// The routing rules in force.
    pub router: Arc<Router>,
    /// Events sent on to their owners, in order.
    pub forwards: OrderedRequests,
}
