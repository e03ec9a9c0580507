//! Keeps the model gauges current: every [`EVERY`], `kiln_model_drift_score` of each
//! monitored model of each version (its largest feature score over the last [`WINDOW`], on
//! every node's traffic);
//! every [`ACCURACY_EVERY`] ticks (and soon after feedback is accepted),
//! `kiln_model_accuracy` of each version with labelled predictions in the last
//! [`ACCURACY_WINDOW`] (one grouped query on the ledger). Series of versions that are gone
//! are removed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::App;
use crate::meter::{ModelLabels, VersionLabels};
use crate::monitor::DriftState;

/// How often the gauges are refreshed.
const EVERY: Duration = Duration::from_secs(15);
/// The window the gauges score.
const WINDOW: Duration = Duration::from_secs(15 * 60);
/// How often the accuracy gauges are refreshed (a ledger query).
const ACCURACY_EVERY: u32 = 4;
/// The window of the accuracy gauges.
const ACCURACY_WINDOW: Duration = Duration::from_secs(3600);

/// Refreshes the drift gauges every [`EVERY`] while the app lives.
pub(super) fn spawn_drift_gauges(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    let stale = app.accuracy_stale.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shown: HashSet<ModelLabels> = HashSet::new();
        let mut drifted: HashSet<ModelLabels> = HashSet::new();
        let mut accuracies: HashSet<VersionLabels> = HashSet::new();
        let mut n = 0u32;
        loop {
            let woken = tokio::select! {
                _ = tick.tick() => false,
                () = stale.notified() => true,
            };
            let Some(app) = weak.upgrade() else { return };
            if !woken {
                (shown, drifted) = app.refresh_drift_gauges(&shown, &drifted).await;
                n = n.wrapping_add(1);
            }
            if woken || n % ACCURACY_EVERY == 1 {
                match app.refresh_accuracy_gauges(&accuracies).await {
                    Ok(now) => accuracies = now,
                    Err(e) => tracing::warn!("accuracy gauges: {e:#}"),
                }
            }
        }
    });
}

impl App {
    /// Asks for the accuracy gauges to be refreshed now (feedback was accepted).
    pub(crate) fn accuracy_changed(&self) {
        self.accuracy_stale.notify_one();
    }

    /// Sets the gauge of every ready monitor (on every node's traffic), removes those in
    /// `before` not set now, and returns the ones set and the ones drifted now; a model
    /// that drifted since `was_drifted` raises `drift.detected`, from one node of a
    /// cluster only (the live node with the smallest id: they all see the same numbers).
    async fn refresh_drift_gauges(
        &self,
        before: &HashSet<ModelLabels>,
        was_drifted: &HashSet<ModelLabels>,
    ) -> (HashSet<ModelLabels>, HashSet<ModelLabels>) {
        let mut now = HashSet::new();
        let mut drifted = HashSet::new();
        let alerting = self.alerts.enabled() && self.alerts_drift().await;
        for f in self.registry.functions() {
            for (version, entry) in &f.versions {
                for (model, monitor) in entry.models.monitors() {
                    // Only monitors this node prepared (the gauges load no model), but the
                    // node that alerts prepares every one: it must see them all.
                    if !monitor.is_ready() && !alerting {
                        continue;
                    }
                    let (state, partial) = self
                        .model_drift(
                            (&f.name, *version),
                            &entry.models,
                            monitor,
                            WINDOW.as_millis() as u64,
                        )
                        .await;
                    // Part of the picture (the stored reference or another node's buckets
                    // unreadable) moves no gauge and raises no alert.
                    let DriftState::Ready(d) = state else {
                        continue;
                    };
                    if partial {
                        continue;
                    }
                    let labels = ModelLabels {
                        function: f.name.clone(),
                        version: version.to_string(),
                        model: model.to_string(),
                    };
                    self.metrics.models.drift(&labels, Some(d.max_score));
                    if d.drifted {
                        if alerting && !was_drifted.contains(&labels) {
                            self.alerts.send(
                                "drift.detected",
                                serde_json::json!({
                                    "function": f.name,
                                    "version": version,
                                    "model": model,
                                    "window": "15m",
                                    "samples": d.samples,
                                    "max_score": d.max_score,
                                    "threshold": monitor.spec().drift_threshold,
                                }),
                            );
                        }
                        drifted.insert(labels.clone());
                    }
                    now.insert(labels);
                }
            }
        }
        for gone in before.difference(&now) {
            self.metrics.models.drift(gone, None);
        }
        (now, drifted)
    }

    /// Whether this node raises the cluster's `drift.detected` alerts: the live node with
    /// the smallest id (always, on a single node or when the nodes cannot be read).
    async fn alerts_drift(&self) -> bool {
        match self.nodes().await {
            Ok(nodes) => nodes
                .iter()
                .map(|n| n.id.as_str())
                .min()
                .is_none_or(|first| first >= self.node_id.as_str()),
            Err(_) => true,
        }
    }

    /// Sets the accuracy gauge of every version with labelled predictions in the last
    /// [`ACCURACY_WINDOW`], removes those in `before` not set now, returns the ones set.
    async fn refresh_accuracy_gauges(
        &self,
        before: &HashSet<VersionLabels>,
    ) -> anyhow::Result<HashSet<VersionLabels>> {
        let Some(ledger) = &self.ledger else {
            return Ok(HashSet::new());
        };
        let since = crate::unix_ms() - ACCURACY_WINDOW.as_millis() as i64;
        let mut now = HashSet::new();
        for (function, version, labelled, correct) in
            crate::monitor::feedback::accuracy_by_version(ledger, since).await?
        {
            // Only versions this node serves: the series of deleted ones go away.
            if labelled == 0
                || self
                    .registry
                    .function(&function)
                    .is_none_or(|f| !f.versions.contains_key(&version))
            {
                continue;
            }
            let labels = VersionLabels {
                function,
                version: version.to_string(),
            };
            self.metrics
                .models
                .accuracy(&labels, Some(correct as f64 / labelled as f64));
            now.insert(labels);
        }
        for gone in before.difference(&now) {
            self.metrics.models.accuracy(gone, None);
        }
        Ok(now)
    }
}
