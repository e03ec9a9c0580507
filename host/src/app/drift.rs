//! Model monitors across nodes and restarts. Every [`PUBLISH_EVERY`] each process stores
//! the time buckets its monitors changed (counts only); a drift answer, the drift gauges
//! and a rollout's drift gate add what every other process published for the window to
//! this one's live buckets, so they judge the whole cluster's traffic, and a restarted node
//! still has the hours before it. A window can be made a version's reference
//! (`POST .../reference`): stored once, every node scores against it.

use std::sync::Arc;
use std::time::Duration;

use super::App;
use crate::monitor::live::window_buckets;
use crate::monitor::profile::Profile;
use crate::monitor::{Counts, DriftState, MIN_SAMPLES, ModelMonitor, ReferenceSource};
use crate::nn::VersionModels;
use crate::store::{KEEP_BUCKETS_MS, ModelKey, StoredBucket, StoredReference};

/// How often a process publishes its monitors' changed buckets.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(5);
/// Every how many publications old buckets are forgotten (about hourly).
const FORGET_EVERY: u32 = 720;

/// Publishes this process's monitor buckets every [`PUBLISH_EVERY`] while the app lives.
pub(super) fn spawn_monitor_publisher(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u32;
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { return };
            app.settle_warmups().await;
            app.publish_monitors().await;
            if n.is_multiple_of(FORGET_EVERY) {
                match app
                    .meta
                    .forget_monitor_buckets(crate::unix_ms() - KEEP_BUCKETS_MS)
                    .await
                {
                    Ok(0) => {}
                    Ok(k) => tracing::debug!(buckets = k, "old monitor buckets forgotten"),
                    Err(e) => tracing::warn!("forgetting old monitor buckets: {e:#}"),
                }
            }
            n = n.wrapping_add(1);
        }
    });
}

/// A monitored model's window merged over the nodes, and whether another node's part was
/// missing (the store could not be read).
pub struct MergedWindow {
    pub counts: Counts,
    pub partial: bool,
}

impl App {
    /// Stores the buckets this process's monitors changed since the last call (also when
    /// the process stops, after the drain). Buckets that could not be stored are kept
    /// for the next call.
    pub async fn publish_monitors(&self) {
        // One publication at a time: an older snapshot must not land after a newer one.
        let _one = self.monitor_publishing.lock().await;
        for f in self.registry.functions() {
            for (version, entry) in &f.versions {
                let mut rows = Vec::new();
                let mut taken = Vec::new();
                for (model, m) in entry.models.monitors() {
                    let dirty = m.take_dirty();
                    for b in &dirty {
                        match serde_json::to_string(&b.counts) {
                            Ok(counts) => rows.push(StoredBucket {
                                model: model.to_string(),
                                span_ms: b.span_ms as i64,
                                at: b.at as i64,
                                counts,
                            }),
                            Err(e) => tracing::error!("encoding monitor counts: {e}"),
                        }
                    }
                    taken.push((m.clone(), dirty));
                }
                if rows.is_empty() {
                    continue;
                }
                if let Err(e) = self
                    .meta
                    .publish_monitor_buckets(&f.name, *version, &self.process, &rows)
                    .await
                {
                    tracing::warn!(function = %f.name, version, "publishing monitor buckets: {e:#}");
                    for (m, dirty) in taken {
                        m.mark_dirty(&dirty);
                    }
                }
            }
        }
    }

    /// Sets the bins of the monitors without a reference file that hold warm-up rows on
    /// this node (see [`App::settle_bins`]).
    async fn settle_warmups(&self) {
        for f in self.registry.functions() {
            for (version, entry) in &f.versions {
                for (model, m) in entry.models.monitors() {
                    if !m.prepare_due() || m.spec().reference.is_some() || m.warmup_rows() == 0 {
                        continue;
                    }
                    if let Err(e) = self
                        .settle_bins((&f.name, *version), &entry.models, m)
                        .await
                    {
                        tracing::warn!(function = %f.name, version, model, "setting a monitor's bins: {e}");
                        m.set_failed(&e);
                    }
                }
            }
        }
    }

    /// Makes a monitor without a reference file ready on the bins every node shares: the
    /// stored ones if a node stored them; else the bins of the function's newest earlier
    /// version with some for this model, when they fit its inputs (so the versions' counts
    /// line up and a rollout's drift gate compares them); else, once this node holds
    /// enough warm-up rows, the ones those rows make. What it stores is kept unless
    /// another node stored first (then that is used). Nothing happens while none is there.
    async fn settle_bins(
        &self,
        (function, version): (&str, u32),
        models: &VersionModels,
        monitor: &ModelMonitor,
    ) -> Result<(), String> {
        let key = ModelKey {
            function,
            version,
            model: monitor.name(),
        };
        let stored = self
            .meta
            .monitor_profile(key)
            .await
            .map_err(|e| format!("reading the stored bins: {e:#}"))?;
        let earlier = match stored {
            Some(_) => None,
            None => self
                .meta
                .earlier_monitor_profile(key)
                .await
                .map_err(|e| format!("reading the earlier version's bins: {e:#}"))?,
        };
        if stored.is_none() && earlier.is_none() && !monitor.warmup_full() {
            return Ok(());
        }
        let slot = models
            .get(monitor.name())
            .ok_or_else(|| format!("the version has no model {:?}", monitor.name()))?;
        let graph = self
            .runtime
            .models()
            .graph(slot)
            .await
            .map_err(|e| e.message)?;
        // The earlier version's bins when they fit this model's inputs.
        let earlier = earlier.filter(|json| {
            serde_json::from_str::<Profile>(json).is_ok_and(|p| p.fits(graph.graph.inputs()))
        });
        let json = match (stored, earlier) {
            (Some(json), _) => json,
            (None, Some(earlier)) => self.agree_bins(key, &earlier).await?,
            (None, None) if monitor.warmup_full() => {
                let mine = monitor.warmup_profile(&graph).await?;
                let mine = serde_json::to_string(&mine).map_err(|e| e.to_string())?;
                self.agree_bins(key, &mine).await?
            }
            (None, None) => return Ok(()),
        };
        let profile =
            serde_json::from_str(&json).map_err(|e| format!("stored bins unreadable: {e}"))?;
        monitor.adopt(profile, &graph)
    }

    /// Stores `profile` as `key`'s bins unless a node stored some first; returns the
    /// stored ones.
    async fn agree_bins(&self, key: ModelKey<'_>, profile: &str) -> Result<String, String> {
        self.meta
            .agree_monitor_profile(key, profile)
            .await
            .map_err(|e| format!("storing the bins: {e:#}"))
    }

    /// What `monitor` (of model `monitor.name()` in `models`, of `function`'s version
    /// `version`) saw over the `window_ms` before now on every node: this process's live
    /// buckets and what the others published. A monitor this process has not prepared
    /// yet is prepared first; `None` when that fails.
    pub async fn model_window(
        &self,
        (function, version): (&str, u32),
        models: &VersionModels,
        monitor: &ModelMonitor,
        window_ms: u64,
    ) -> Option<MergedWindow> {
        if monitor.prepare_due() {
            if monitor.spec().reference.is_some() {
                let _ = self
                    .runtime
                    .models()
                    .prepare_monitor(models, monitor.name())
                    .await;
            } else if let Err(e) = self.settle_bins((function, version), models, monitor).await {
                tracing::warn!(
                    function,
                    version,
                    model = monitor.name(),
                    "setting a monitor's bins: {e}"
                );
                monitor.set_failed(&e);
            }
        }
        let mut counts = monitor.window(window_ms)?;
        let (span_ms, from) = window_buckets(crate::unix_ms().max(0) as u64, window_ms);
        let key = ModelKey {
            function,
            version,
            model: monitor.name(),
        };
        let published = self
            .meta
            .monitor_buckets(key, span_ms as i64, from as i64, &self.process)
            .await;
        let partial = match published {
            Ok(rows) => {
                for json in rows {
                    match serde_json::from_str::<Counts>(&json) {
                        Ok(c) => {
                            if !counts.merge(&c) {
                                tracing::debug!(
                                    function,
                                    version,
                                    "monitor bucket of another shape skipped"
                                );
                            }
                        }
                        Err(e) => {
                            tracing::error!(function, version, "monitor bucket unreadable: {e}")
                        }
                    }
                }
                false
            }
            Err(e) => {
                tracing::warn!(
                    function,
                    version,
                    "reading other nodes' monitor buckets: {e:#}"
                );
                true
            }
        };
        Some(MergedWindow { counts, partial })
    }

    /// `monitor`'s drift over the `window_ms` before now, on every node's traffic, against
    /// the reference a window made if one was set, else the reference file. The flag says
    /// the store could not be read (this node's traffic only, or the file's reference).
    pub async fn model_drift(
        &self,
        (function, version): (&str, u32),
        models: &VersionModels,
        monitor: &ModelMonitor,
        window_ms: u64,
    ) -> (DriftState, bool) {
        let Some(w) = self
            .model_window((function, version), models, monitor, window_ms)
            .await
        else {
            return (monitor.not_ready(), false);
        };
        let key = ModelKey {
            function,
            version,
            model: monitor.name(),
        };
        let (reference, partial) = match self.meta.monitor_reference(key).await {
            Ok(r) => (r, w.partial),
            Err(e) => {
                tracing::warn!(function, version, "reading a monitor's reference: {e:#}");
                (None, true)
            }
        };
        let decoded = reference.and_then(|r| match serde_json::from_str::<Counts>(&r.counts) {
            Ok(c) => Some((r, c)),
            Err(e) => {
                tracing::error!(function, version, "stored reference unreadable: {e}");
                None
            }
        });
        let reference = decoded.map(|(r, c)| {
            let source = ReferenceSource::Window {
                window: humantime::format_duration(Duration::from_millis(r.window_ms as u64))
                    .to_string(),
                set_ms: r.set_ms,
                set_by: r.set_by,
            };
            (c, source)
        });
        let state = monitor.score(&w.counts, reference.as_ref().map(|(c, s)| (c, s.clone())));
        (state, partial)
    }

    /// Makes what every monitored model of `function`'s version `version` saw over the
    /// `window` before now (on every node) its reference, for every node's drift answers
    /// from now on. Each model needs [`MIN_SAMPLES`] rows in the window; nothing is stored
    /// unless all have them. Returns each model's name, rows and predictions.
    pub async fn set_reference(
        &self,
        function: &str,
        version: u32,
        window: Duration,
        set_by: &str,
    ) -> Result<Vec<(String, u64, u64)>, ReferenceError> {
        let entry = self
            .registry
            .route(function, Some(version))
            .map_err(ReferenceError::Route)?;
        let window_ms = window.as_millis() as u64;
        let mut made = Vec::new();
        for (model, monitor) in entry.models.monitors() {
            let Some(w) = self
                .model_window((function, version), &entry.models, monitor, window_ms)
                .await
            else {
                return Err(ReferenceError::NotReady(model.to_string()));
            };
            if w.partial {
                return Err(ReferenceError::Store(anyhow::anyhow!(
                    "the other nodes' monitor buckets could not be read"
                )));
            }
            let rows = w.counts.max_rows();
            if rows < MIN_SAMPLES {
                return Err(ReferenceError::TooFew {
                    model: model.to_string(),
                    rows,
                });
            }
            made.push((model.to_string(), w.counts));
        }
        if made.is_empty() {
            return Err(ReferenceError::NotConfigured);
        }
        let set_ms = crate::unix_ms();
        let mut out = Vec::new();
        for (model, counts) in made {
            let stored = StoredReference {
                counts: serde_json::to_string(&counts)
                    .map_err(|e| ReferenceError::Store(e.into()))?,
                window_ms: window_ms as i64,
                set_ms,
                set_by: set_by.to_string(),
            };
            let key = ModelKey {
                function,
                version,
                model: &model,
            };
            self.meta
                .set_monitor_reference(key, &stored)
                .await
                .map_err(ReferenceError::Store)?;
            out.push((model, counts.max_rows(), counts.predictions()));
        }
        Ok(out)
    }
}

/// Why a window could not be made a reference.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Route(crate::deploy::RouteError),
    #[error("the version monitors no model: deploy it with [models.<name>.monitor]")]
    NotConfigured,
    #[error(
        "model {0}'s monitor is not ready on this node yet (it prepares on the first sampled request); try again"
    )]
    NotReady(String),
    #[error(
        "model {model} saw {rows} rows in the window; a reference needs at least {MIN_SAMPLES}"
    )]
    TooFew { model: String, rows: u64 },
    #[error("the store: {0:#}")]
    Store(anyhow::Error),
}
