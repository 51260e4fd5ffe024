//! What operators see: counters and the Prometheus endpoint ([`metrics`]),
//! logs and the shutdown signal ([`telemetry`]). Every layer may report
//! here; nothing here calls back into the layers.

pub mod metrics;
pub mod telemetry;
