//! The metrics of monitored models: drift (from the wasi-nn boundary's summaries),
//! accuracy (predictions against posted feedback) and the feedback itself.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `kiln_model_drift_score` | gauge (largest feature PSI, last 15 min) | function, version, model |
//! | `kiln_model_accuracy` | gauge (labelled predictions that were right, last hour) | function, version |
//! | `kiln_feedback_total` | counter | outcome (`accepted`, `duplicate`, `unknown`) |

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::metric_labels::{ModelLabels, OutcomeLabels, VersionLabels};

/// Monitoring's series, registered with the server's other metrics.
#[derive(Clone)]
pub struct ModelMetrics {
    drift: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    accuracy: Family<VersionLabels, Gauge<f64, AtomicU64>>,
    feedback: Family<OutcomeLabels, Counter>,
}

impl ModelMetrics {
    /// Registers the series in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = ModelMetrics {
            drift: Family::default(),
            accuracy: Family::default(),
            feedback: Family::default(),
        };
        registry.register(
            "model_drift_score",
            "Largest input feature drift score (PSI against the reference) of a monitored model over the last 15 minutes",
            m.drift.clone(),
        );
        registry.register(
            "model_accuracy",
            "Share of a version's labelled predictions (feedback posted in the last hour) that were right",
            m.accuracy.clone(),
        );
        registry.register(
            "feedback",
            "Feedback items posted, by what became of them",
            m.feedback.clone(),
        );
        m
    }

    /// Sets the drift gauge of one monitored model (`None`: removes its series).
    pub fn drift(&self, labels: &ModelLabels, score: Option<f64>) {
        match score {
            Some(s) => {
                self.drift.get_or_create(labels).set(s);
            }
            None => {
                self.drift.remove(labels);
            }
        }
    }

    /// Sets a version's accuracy gauge (`None`: removes its series).
    pub fn accuracy(&self, labels: &VersionLabels, accuracy: Option<f64>) {
        match accuracy {
            Some(a) => {
                self.accuracy.get_or_create(labels).set(a);
            }
            None => {
                self.accuracy.remove(labels);
            }
        }
    }

    /// Counts `n` feedback items that ended as `outcome`.
    pub fn feedback(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.feedback
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(n);
        }
    }
}
