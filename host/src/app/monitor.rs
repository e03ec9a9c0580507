//! Keeps `kiln_model_drift_score` current: every [`EVERY`], each monitored model of each
//! version gets its largest feature score over the last [`WINDOW`]; the series of versions
//! that are gone (or whose monitor is not ready) are removed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::App;
use crate::meter::ModelLabels;
use crate::monitor::DriftState;

/// How often the gauges are refreshed.
const EVERY: Duration = Duration::from_secs(15);
/// The window the gauges score.
const WINDOW: Duration = Duration::from_secs(15 * 60);

/// Refreshes the drift gauges every [`EVERY`] while the app lives.
pub(super) fn spawn_drift_gauges(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shown: HashSet<ModelLabels> = HashSet::new();
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { return };
            shown = app.refresh_drift_gauges(&shown);
        }
    });
}

impl App {
    /// Sets the gauge of every ready monitor, removes those in `before` not set now, and
    /// returns the ones set.
    fn refresh_drift_gauges(&self, before: &HashSet<ModelLabels>) -> HashSet<ModelLabels> {
        let mut now = HashSet::new();
        for f in self.registry.functions() {
            for (version, entry) in &f.versions {
                for (model, monitor) in entry.models.monitors() {
                    if let DriftState::Ready(d) = monitor.drift(WINDOW.as_millis() as u64) {
                        let labels = ModelLabels {
                            function: f.name.clone(),
                            version: version.to_string(),
                            model: model.to_string(),
                        };
                        self.metrics.model_drift(&labels, Some(d.max_score));
                        now.insert(labels);
                    }
                }
            }
        }
        for gone in before.difference(&now) {
            self.metrics.model_drift(gone, None);
        }
        now
    }
}
