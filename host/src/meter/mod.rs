//! Metering: what every request cost. Today the Prometheus metrics behind `GET /metrics`;
//! per-request usage records, prices and the ledger build on the same observations.

pub mod metrics;

pub use metrics::{Metrics, Outcome, VersionMetrics};
