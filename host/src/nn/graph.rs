//! [`LoadedGraph`]: one model loaded by one backend for one device, shared by every request
//! of every version that names the same bytes. It learns what its runs cost ([`CostModel`]),
//! decides per compute where a run goes, holds the graph's batching queue, and, when a
//! version asks for `batch = "auto"`, calibrates once and decides whether batching pays.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;

use super::backend::BackendGraph;
use super::batch::{BatchSpec, Batcher, Limits};
use super::cost::{self, CostModel, Decision, Fit};
use super::{BackendKind, Device, Tensor};
use crate::meter::Metrics;

/// Runs between two refits of an `"auto"` decision from the graph's own runs.
const REFIT_EVERY: u64 = 256;

/// A loaded graph and where it runs.
pub struct LoadedGraph {
    pub graph: Box<dyn BackendGraph>,
    pub backend: BackendKind,
    pub device: Device,
    /// What its runs cost, learnt from them.
    pub cost: CostModel,
    /// Its batching queue (used by versions that batch).
    pub batcher: Batcher,
    /// The output that names the predicted class, if one does (recorded per request).
    pub prediction: Option<crate::monitor::profile::PredictionSource>,
    /// Why computes on it cannot merge (unset: they can). Found on load from the model's
    /// declared shapes, or on the first merged run whose outputs could not be split.
    unbatchable: OnceLock<String>,
    auto: Mutex<Auto>,
    /// `"auto"` is timing the model or has (its state left `Idle`): read without the lock
    /// on every compute.
    timing_started: AtomicBool,
    /// Timing the model needs a real input (a free dimension besides the batch axis).
    needs_sample: bool,
    metrics: Arc<Metrics>,
}

/// Where `"auto"` stands for this graph.
#[derive(Debug, Clone)]
enum Auto {
    /// Nobody asked yet.
    Idle,
    /// Timing the model.
    Calibrating,
    Decided(Fit, Decision),
    Failed(String),
}

/// The `batching` object of a model in the version info.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchingInfo {
    /// `off`, `auto` or `fixed` (limits from the manifest).
    pub mode: &'static str,
    /// Whether this version's computes on the model merge now.
    pub on: bool,
    /// The fitted cost of a run: `fixed_us + per_row_us × rows` (once known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_row_us: Option<f64>,
    /// The limits in force, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_us: Option<u64>,
    pub reason: String,
}

impl LoadedGraph {
    /// Wraps a backend graph; `metrics` receives its batch sizes and waits.
    pub fn new(
        graph: Box<dyn BackendGraph>,
        backend: BackendKind,
        device: Device,
        metrics: Arc<Metrics>,
    ) -> Self {
        let unbatchable = OnceLock::new();
        if let Err(why) = cost::sample_inputs(graph.as_ref(), 1) {
            let _ = unbatchable.set(why);
        }
        let needs_sample = cost::needs_real_input(graph.as_ref());
        let prediction = crate::monitor::profile::prediction_source(graph.outputs());
        LoadedGraph {
            prediction,
            graph,
            backend,
            device,
            cost: CostModel::default(),
            batcher: Batcher::default(),
            unbatchable,
            auto: Mutex::new(Auto::Idle),
            timing_started: AtomicBool::new(false),
            needs_sample,
            metrics,
        }
    }

    /// Whether `"auto"` waits for a real input to time this graph: a compute's first row
    /// is then kept, and handed to [`calibrate_once`](Self::calibrate_once) once that
    /// compute has succeeded (an input the model refuses, or that makes it fail, never
    /// decides for every version sharing the graph).
    pub fn wants_sample(&self) -> bool {
        self.needs_sample && !self.timing_started.load(Ordering::Relaxed)
    }

    fn auto(&self) -> std::sync::MutexGuard<'_, Auto> {
        // Replaced whole on every change: a poisoned lock holds a consistent value.
        self.auto.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why computes on this graph cannot merge; `None` when they can.
    pub fn unbatchable(&self) -> Option<&str> {
        self.unbatchable.get().map(String::as_str)
    }

    /// Turns batching off on this graph for good: a merged run showed its computes cannot
    /// share runs (`why`). Later computes run by themselves, as without batching.
    pub fn refuse_batching(&self, why: &str) {
        if self.unbatchable.set(why.to_string()).is_ok() {
            tracing::warn!(backend = %self.backend, "batching turned off: {why}");
        }
    }

    /// Records a successful run of `rows` rows (`took` from the caller's side, `busy` the
    /// backend's busy time); now and then refits `"auto"`'s decision.
    pub fn ran(&self, rows: u32, took: Duration, busy: Duration) {
        self.cost.record(rows, took, busy);
        if self.cost.runs().is_multiple_of(REFIT_EVERY)
            && let Some(fit) = self.cost.fit()
        {
            let mut auto = self.auto();
            if let Auto::Decided(..) = *auto {
                *auto = Auto::Decided(fit, cost::decide(&fit));
            }
        }
    }

    /// Records the rows of a run and how long each of its computes waited for it.
    pub fn metrics_batch(&self, rows: u32, waits: impl Iterator<Item = Duration>) {
        self.metrics.batch(self.backend, self.device, rows, waits);
    }

    /// The limits a compute of a version asking for `spec` runs under; `None`: it runs
    /// by itself, as without batching.
    pub fn limits(&self, spec: BatchSpec) -> Option<Limits> {
        if self.unbatchable.get().is_some() {
            return None;
        }
        match spec {
            BatchSpec::Off => None,
            BatchSpec::Fixed(limits) => Some(limits),
            BatchSpec::Auto => match &*self.auto() {
                Auto::Decided(_, d) if d.on => Some(Limits {
                    max_rows: d.max_rows,
                    max_wait_us: d.max_wait_us,
                }),
                _ => None,
            },
        }
    }

    /// Starts the calibration `"auto"` needs, once, on the blocking pool, timing `sample`
    /// (one row of a real compute's inputs) tiled to each row count, or zeros without one. A model
    /// with free dimensions besides the batch axis (a text line's width, a sentence's
    /// length) waits for a real input: zeros of a guessed size would time another model.
    pub fn calibrate_once(self: &Arc<Self>, sample: Option<&[Tensor]>) {
        {
            let mut auto = self.auto();
            if !matches!(*auto, Auto::Idle) {
                return;
            }
            match sample {
                None if self.needs_sample => return,
                // Too large to time at 16 rows: a later, smaller compute will do.
                Some(sample) if !cost::sample_fits(sample) => return,
                _ => {}
            }
            self.timing_started.store(true, Ordering::Relaxed);
            if let Some(why) = self.unbatchable.get() {
                *auto = Auto::Failed(why.clone());
                return;
            }
            *auto = Auto::Calibrating;
        }
        let graph = self.clone();
        let sample = sample.map(<[Tensor]>::to_vec);
        tokio::task::spawn_blocking(move || {
            let timed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                cost::calibrate(graph.graph.as_ref(), sample.as_deref(), graph.device)
            }))
            .unwrap_or_else(|_| Err("the backend panicked while timing the model".into()));
            let outcome = match timed {
                Ok(fit) => {
                    let decision = cost::decide(&fit);
                    tracing::info!(
                        backend = %graph.backend,
                        on = decision.on,
                        "batching calibrated: {}",
                        decision.reason
                    );
                    Auto::Decided(fit, decision)
                }
                Err(why) => {
                    tracing::info!(backend = %graph.backend, "batching stays off: {why}");
                    Auto::Failed(why)
                }
            };
            *graph.auto() = outcome;
        });
    }

    /// What batching does on this graph for a version asking for `spec`.
    pub fn batching(&self, spec: BatchSpec) -> BatchingInfo {
        let fit = self.cost.fit();
        let mut info = BatchingInfo {
            mode: spec.mode(),
            on: false,
            fixed_us: fit.map(|f| round(f.fixed_us)),
            per_row_us: fit.map(|f| round(f.per_row_us)),
            max_rows: None,
            max_wait_us: None,
            reason: String::new(),
        };
        if let Some(why) = self.unbatchable.get()
            && !spec.is_off()
        {
            info.reason = format!("cannot batch: {why}");
            return info;
        }
        info.reason = match spec {
            BatchSpec::Off => "off in the manifest".into(),
            BatchSpec::Fixed(l) => {
                info.on = true;
                (info.max_rows, info.max_wait_us) = (Some(l.max_rows), Some(l.max_wait_us));
                "limits from the manifest".into()
            }
            BatchSpec::Auto => match &*self.auto() {
                Auto::Idle => "not calibrated yet (on the first compute)".into(),
                Auto::Calibrating => "calibrating".into(),
                Auto::Failed(why) => format!("cannot batch: {why}"),
                Auto::Decided(fit, d) => {
                    info.on = d.on;
                    info.fixed_us = Some(round(fit.fixed_us));
                    info.per_row_us = Some(round(fit.per_row_us));
                    if d.on {
                        (info.max_rows, info.max_wait_us) = (Some(d.max_rows), Some(d.max_wait_us));
                    }
                    d.reason.clone()
                }
            },
        };
        info
    }
}

/// Microseconds to three decimals, for the version info.
fn round(us: f64) -> f64 {
    (us * 1000.0).round() / 1000.0
}
