//! Model monitoring at the `wasi:nn` boundary: a model deployed with a reference sample
//! (`[models.<name>.monitor]`) has every sampled compute's inputs folded into per-feature
//! histograms over the reference's quantile edges, and its predicted classes counted, in
//! time buckets ([`live`]). A window's counts are scored against the reference's
//! ([`drift`]): no pipeline, no stored payloads, bounded memory per model.
//!
//! - [`npy`]: the reference file (`.npy`, or `.npz` with one array per input name).
//! - [`profile`]: features (one per value, or per-row mean/std/min/max for wide inputs),
//!   bin edges, the reference's counts, and which output is the prediction.
//!
//! The reference's own predictions come from running the model on it once, when the
//! version is deployed (or, after a restart, on its first sampled compute, in the
//! background).

pub mod alerts;
pub mod drift;
pub mod feedback;
pub mod live;
pub mod npy;
pub mod profile;
pub mod validate;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::common::{BlobSource, Digest};
use crate::nn::Tensor;
use crate::nn::backend::Cancel;
use crate::nn::graph::LoadedGraph;

pub use drift::{MIN_SAMPLES, ModelDrift};
use live::{Fold, Live};
use profile::{FeatureMode, Profile};

/// Most values a reference may hold (16 Mi: 128 MiB while it is read); sample it down.
pub const MAX_REFERENCE_VALUES: usize = 1 << 24;
/// Reference rows the model is run on for the reference predictions.
const MAX_REFERENCE_PREDICTIONS: usize = 10_000;
/// Most features per input (`max_features`): with [`profile::BINS`] bins (and an underflow
/// and an overflow bin) each, a bucket of one input is at most about 23 KiB, and the 168
/// buckets a model keeps at most about 3.8 MiB (freed once their time has passed).
pub const MAX_FEATURES: u32 = 256;

/// `[models.<name>.monitor]` as a version records it: the reference blob and how to watch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSpec {
    /// Digest of the reference sample (`.npy` or `.npz`), uploaded like a model.
    pub reference: Digest,
    /// Share of computes whose tensors are summarised, 0 to 100.
    #[serde(default = "default_sample_percent")]
    pub sample_percent: u8,
    /// Inputs with rows of up to this many values get one feature per value; wider ones
    /// are summarised per row (mean, std, min, max).
    #[serde(default = "default_max_features")]
    pub max_features: u32,
    /// A feature (or the prediction) whose score passes this counts as drifted.
    #[serde(default = "default_drift_threshold")]
    pub drift_threshold: f64,
}

// The threshold is checked to be finite at deploy; a spec never holds NaN.
impl Eq for MonitorSpec {}

fn default_sample_percent() -> u8 {
    100
}
fn default_max_features() -> u32 {
    64
}
fn default_drift_threshold() -> f64 {
    0.2
}

impl MonitorSpec {
    /// The defaults for a reference: every compute, 64 features, PSI 0.2.
    pub fn new(reference: Digest) -> Self {
        MonitorSpec {
            reference,
            sample_percent: default_sample_percent(),
            max_features: default_max_features(),
            drift_threshold: default_drift_threshold(),
        }
    }

    /// Checks the settings' ranges; the message names the bad one.
    pub fn check(&self) -> Result<(), String> {
        if self.sample_percent > 100 {
            return Err(format!(
                "monitor.sample_percent is {}; it is a share from 0 to 100",
                self.sample_percent
            ));
        }
        if !(1..=MAX_FEATURES).contains(&self.max_features) {
            return Err(format!(
                "monitor.max_features is {}; it must be from 1 to {MAX_FEATURES}",
                self.max_features
            ));
        }
        if !(self.drift_threshold.is_finite() && self.drift_threshold > 0.0) {
            return Err(format!(
                "monitor.drift_threshold is {}; it must be a positive number (0.2 is usual for PSI)",
                self.drift_threshold
            ));
        }
        Ok(())
    }
}

/// A ready monitor: the reference's profile and the buckets of what the model saw.
struct Ready {
    profile: Arc<Profile>,
    live: Mutex<Live>,
}

/// How long after a failed preparation (the reference blob unreachable, say) the next
/// compute tries again.
const RETRY_PREPARE: std::time::Duration = std::time::Duration::from_secs(30);

/// The monitor of one model of one version.
pub struct ModelMonitor {
    name: String,
    spec: MonitorSpec,
    ready: OnceLock<Ready>,
    /// The last failure to prepare, and when: retried after [`RETRY_PREPARE`].
    failed: Mutex<Option<(String, std::time::Instant)>>,
    preparing: AtomicBool,
    computes: AtomicU64,
}

/// What a monitor's drift answer says about its state.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum DriftState {
    Ready(Box<ModelDrift>),
    /// Not prepared yet (no sampled compute since a restart), or it failed.
    NotReady {
        model: String,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl ModelMonitor {
    /// A monitor of model `name` with `spec`, prepared later.
    pub fn new(name: &str, spec: MonitorSpec) -> Self {
        ModelMonitor {
            name: name.to_string(),
            spec,
            ready: OnceLock::new(),
            failed: Mutex::new(None),
            preparing: AtomicBool::new(false),
            computes: AtomicU64::new(0),
        }
    }

    /// The settings it runs with.
    pub fn spec(&self) -> &MonitorSpec {
        &self.spec
    }

    /// Reads the reference, profiles it for `graph`, and runs the model on it for the
    /// reference predictions. Once prepared, later calls answer at once; a failure is
    /// remembered (and shown) until a later call succeeds.
    pub async fn prepare(
        &self,
        graph: &Arc<LoadedGraph>,
        blobs: &dyn BlobSource,
    ) -> Result<(), String> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        match self.profile(graph, blobs).await {
            Ok(profile) => {
                let _ = self.ready.set(Ready {
                    live: Mutex::new(Live::new(profile.inputs.len(), profile.total_bins)),
                    profile: Arc::new(profile),
                });
                *self.failed() = None;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(model = %self.name, "model monitor not ready: {e}");
                *self.failed() = Some((e.clone(), std::time::Instant::now()));
                Err(e)
            }
        }
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, Option<(String, std::time::Instant)>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn profile(
        &self,
        graph: &Arc<LoadedGraph>,
        blobs: &dyn BlobSource,
    ) -> Result<Profile, String> {
        let path = blobs
            .local(self.spec.reference)
            .await
            .map_err(|e| format!("fetching the reference {}: {e:#}", self.spec.reference))?;
        let graph = graph.clone();
        let max_features = self.spec.max_features as usize;
        tokio::task::spawn_blocking(move || {
            let size = std::fs::metadata(&path)
                .map_err(|e| format!("reading the reference: {e}"))?
                .len();
            // Eight bytes a value at most, plus headers.
            if size > (MAX_REFERENCE_VALUES as u64) * 8 + (1 << 20) {
                return Err(format!(
                    "the reference is {size} bytes; at most {MAX_REFERENCE_VALUES} values are read (sample it down)"
                ));
            }
            let bytes = std::fs::read(&path).map_err(|e| format!("reading the reference: {e}"))?;
            let arrays = npy::read_reference(&bytes, MAX_REFERENCE_VALUES)?;
            let (inputs, outputs) = (graph.graph.inputs(), graph.graph.outputs());
            let mut profile = Profile::build(&arrays, inputs, outputs, max_features)?;
            if let Some(source) = profile.prediction.clone() {
                let chunk = match inputs.first().and_then(|i| i.dims.first()) {
                    Some(Some(fixed)) => *fixed as usize,
                    _ => 64,
                };
                let batches = Profile::reference_batches(&arrays, inputs, chunk.max(1))
                    .unwrap_or_default();
                let mut rows = 0;
                for batch in batches {
                    if rows >= MAX_REFERENCE_PREDICTIONS {
                        break;
                    }
                    rows += batch.first().map_or(0, |t| t.dims[0] as usize);
                    match graph.graph.run(batch, &Cancel::default()) {
                        Ok(out) => source.classes(&out, |c| {
                            *profile.reference_classes.entry(c).or_default() += 1
                        }),
                        Err(e) => {
                            tracing::warn!("running the model on its reference: {}", e.message);
                            profile.reference_classes.clear();
                            break;
                        }
                    }
                }
            }
            Ok(profile)
        })
        .await
        .map_err(|e| format!("profiling the reference: {e}"))?
    }

    /// Whether this compute is summarised (`sample_percent` of them, evenly spread).
    /// Before the monitor is prepared, starts preparing it in the background and answers
    /// no.
    pub fn sample(self: &Arc<Self>, graph: &Arc<LoadedGraph>, blobs: &Arc<dyn BlobSource>) -> bool {
        if self.ready.get().is_none() {
            let due = self
                .failed()
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() >= RETRY_PREPARE);
            if due && !self.preparing.swap(true, Ordering::AcqRel) {
                let (me, graph, blobs) = (self.clone(), graph.clone(), blobs.clone());
                tokio::spawn(async move {
                    let _ = me.prepare(&graph, blobs.as_ref()).await;
                    me.preparing.store(false, Ordering::Release);
                });
            }
            return false;
        }
        let pct = self.spec.sample_percent as u64;
        let n = self.computes.fetch_add(1, Ordering::Relaxed);
        (n + 1) * pct / 100 > n * pct / 100
    }

    fn ready(&self) -> Option<&Ready> {
        self.ready.get()
    }

    /// Folds a sampled compute's inputs (in the model's input order) into the buckets.
    pub fn observe_inputs(&self, inputs: &[Tensor]) {
        let Some(ready) = self.ready() else { return };
        let now = now_ms();
        for (i, input) in ready.profile.inputs.iter().enumerate() {
            let Some(t) = inputs.get(input.position) else {
                continue;
            };
            let (rows, width) = profile::rows_of(t, input.width);
            if width != input.width || t.data.len() != rows * width * t.ty.size() {
                lock(&ready.live).fold(now, &Fold::Mismatched(rows as u64));
                continue;
            }
            let mut bins = Vec::with_capacity(rows * input.features.len());
            match input.mode {
                FeatureMode::Elements => profile::for_each_value(t.ty, &t.data, |k, v| {
                    let f = &input.features[k % width];
                    bins.push((f.start + f.bin(v)) as u32);
                }),
                FeatureMode::Rows => {
                    let mut row = Vec::with_capacity(width);
                    profile::for_each_value(t.ty, &t.data, |_, v| {
                        row.push(v);
                        if row.len() == width {
                            profile::row_features(FeatureMode::Rows, &row, |k, v| {
                                let f = &input.features[k];
                                bins.push((f.start + f.bin(v)) as u32);
                            });
                            row.clear();
                        }
                    });
                }
            }
            lock(&ready.live).fold(
                now,
                &Fold::Bins {
                    input: i,
                    rows: rows as u64,
                    bins: &bins,
                },
            );
        }
    }

    /// Counts a sampled compute's predicted classes.
    pub fn observe_outputs(&self, outputs: &[Tensor]) {
        let Some(ready) = self.ready() else { return };
        let Some(source) = &ready.profile.prediction else {
            return;
        };
        let mut classes = Vec::new();
        source.classes(outputs, |c| classes.push(c));
        if !classes.is_empty() {
            lock(&ready.live).fold(now_ms(), &Fold::Classes(&classes));
        }
    }

    /// Drift over the `window_ms` before now.
    pub fn drift(&self, window_ms: u64) -> DriftState {
        if let Some(ready) = self.ready.get() {
            let counts = {
                let mut live = lock(&ready.live);
                live.trim(now_ms());
                live.window(now_ms(), window_ms)
            };
            return DriftState::Ready(Box::new(drift::score(
                &self.name,
                &ready.profile,
                &counts,
                self.spec.drift_threshold,
            )));
        }
        match self.failed().as_ref() {
            Some((e, _)) => DriftState::NotReady {
                model: self.name.clone(),
                state: "failed",
                error: Some(e.clone()),
            },
            None => DriftState::NotReady {
                model: self.name.clone(),
                state: "preparing",
                error: None,
            },
        }
    }
}

/// The candidate's drift from the stable version over the same `window_ms`: what `stable`
/// saw stands in for the reference. `None` unless both are ready and watch the same
/// reference the same way (their bins line up); `Some(Err((candidate rows, stable rows)))`
/// while either saw fewer than [`MIN_SAMPLES`] rows.
pub fn compare(
    candidate: &ModelMonitor,
    stable: &ModelMonitor,
    window_ms: u64,
) -> Option<Result<ModelDrift, (u64, u64)>> {
    let (c, s) = (candidate.ready()?, stable.ready()?);
    if candidate.spec.reference != stable.spec.reference
        || candidate.spec.max_features != stable.spec.max_features
        || c.profile.total_bins != s.profile.total_bins
    {
        return None;
    }
    let now = now_ms();
    let cw = lock(&c.live).window(now, window_ms);
    let sw = lock(&s.live).window(now, window_ms);
    let rows = |w: &live::Counts| w.rows.iter().copied().max().unwrap_or(0);
    if rows(&cw) < MIN_SAMPLES || rows(&sw) < MIN_SAMPLES {
        return Some(Err((rows(&cw), rows(&sw))));
    }
    let mut base = (*s.profile).clone();
    for input in &mut base.inputs {
        for f in &mut input.features {
            let n = f.reference.len();
            f.reference.copy_from_slice(&sw.bins[f.start..f.start + n]);
        }
    }
    base.reference_classes = sw.classes.clone();
    Some(Ok(drift::score(
        &candidate.name,
        &base,
        &cw,
        candidate.spec.drift_threshold,
    )))
}

fn now_ms() -> u64 {
    crate::unix_ms().max(0) as u64
}

fn lock(live: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    // Every fold is a few counter increments: a poisoned lock holds consistent counts.
    live.lock().unwrap_or_else(|p| p.into_inner())
}
