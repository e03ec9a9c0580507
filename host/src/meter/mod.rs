//! Metering: what every request used and cost. [`UsageRecord`]s priced by a [`Pricing`]
//! plan go to the durable [`Ledger`] (SQLite or PostgreSQL, group commit); [`query`] answers usage
//! totals and exports; [`Metrics`] serves `GET /metrics`.

pub mod budgets;
pub mod ledger;
mod metric_labels;
pub mod metrics;
mod model_metrics;
mod outcome;
pub mod query;
pub mod usage;
pub mod window;

pub use ledger::{Durability, Ledger, LedgerStore};
pub use metric_labels::{ModelLabels, VersionLabels};
pub use metrics::{CacheMetrics, Metrics, Outcome, VersionMetrics};
pub use usage::{Pricing, UsageRecord};
pub use window::{Aggregate, ShadowStats, ShadowWindow, Stats, Window, ended_seconds};
