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
mod warmup;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::common::{BlobSource, Digest};
use crate::nn::Tensor;
use crate::nn::backend::Cancel;
use crate::nn::graph::LoadedGraph;

pub use drift::{MIN_SAMPLES, ModelDrift, ReferenceSource};
pub use live::{Bucket, Counts};
use live::{Fold, Live};
use profile::{FeatureMode, Profile};
pub use warmup::WARMUP_ROWS;
use warmup::{Warmup, warmup_arrays};

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
    /// Digest of the reference sample (`.npy` or `.npz`), uploaded like a model; `None`:
    /// the bins come from the first [`WARMUP_ROWS`] rows the version sees, and a window
    /// can be made the reference later (`POST .../reference`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Digest>,
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
    /// The defaults for a reference (or none): every compute, 64 features, PSI 0.2.
    pub fn new(reference: Option<Digest>) -> Self {
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
    /// Without a reference file: the rows held until the bins are set.
    warmup: Mutex<Warmup>,
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
        /// Warming up: the rows held so far (the bins are set at [`WARMUP_ROWS`]).
        #[serde(skip_serializing_if = "Option::is_none")]
        rows: Option<u64>,
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
            warmup: Mutex::new(Warmup::default()),
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
        let Some(reference) = self.spec.reference else {
            // Its bins come from its first rows (see `adopt`).
            return Ok(());
        };
        if self.ready.get().is_some() {
            return Ok(());
        }
        match self.profile(reference, graph, blobs).await {
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
        reference: Digest,
        graph: &Arc<LoadedGraph>,
        blobs: &dyn BlobSource,
    ) -> Result<Profile, String> {
        let path = blobs
            .local(reference)
            .await
            .map_err(|e| format!("fetching the reference {reference}: {e:#}"))?;
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
            profile_arrays(&arrays, &graph, max_features)
        })
        .await
        .map_err(|e| format!("profiling the reference: {e}"))?
    }

    /// Whether this compute is summarised (`sample_percent` of them, evenly spread).
    /// Before the monitor is prepared, starts preparing it in the background and answers
    /// no; a monitor without a reference file samples into its warm-up until it is full.
    pub fn sample(self: &Arc<Self>, graph: &Arc<LoadedGraph>, blobs: &Arc<dyn BlobSource>) -> bool {
        if self.ready.get().is_none() && self.spec.reference.is_none() {
            // Warming up: sampled computes are held until there are enough rows.
            if lock(&self.warmup).full() {
                return false;
            }
        } else if self.ready.get().is_none() {
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
        let Some(ready) = self.ready() else {
            if self.spec.reference.is_none() {
                self.hold(inputs);
            }
            return;
        };
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

    /// Whether its reference is profiled (it summarises and scores).
    pub fn is_ready(&self) -> bool {
        self.ready.get().is_some()
    }

    /// Whether preparing (or setting the bins of) this monitor may be tried now: not
    /// ready, not being prepared, and the last failure (if any) older than the retry
    /// delay.
    pub fn prepare_due(&self) -> bool {
        self.ready().is_none()
            && !self.preparing.load(Ordering::Acquire)
            && self
                .failed()
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() >= RETRY_PREPARE)
    }

    /// Remembers why the bins could not be set (shown, and retried after a delay).
    pub fn set_failed(&self, e: &str) {
        *self.failed() = Some((e.to_string(), std::time::Instant::now()));
    }

    /// Holds a compute's inputs for the warm-up, while it is not full.
    fn hold(&self, inputs: &[Tensor]) {
        let mut w = lock(&self.warmup);
        if w.full() || self.ready().is_some() {
            return;
        }
        let rows = inputs
            .first()
            .and_then(|t| t.dims.first())
            .map_or(1, |d| (*d as usize).max(1));
        let bytes = inputs.iter().map(|t| t.data.len()).sum::<usize>();
        if w.bytes + bytes > warmup::WARMUP_BYTES {
            return;
        }
        w.rows += rows;
        w.bytes += bytes;
        w.computes.push(inputs.to_vec());
    }

    /// Rows held for the warm-up (a monitor without a reference file, not ready yet).
    pub fn warmup_rows(&self) -> usize {
        lock(&self.warmup).rows
    }

    /// Whether the warm-up holds enough rows to set the bins from.
    pub fn warmup_full(&self) -> bool {
        lock(&self.warmup).full()
    }

    /// The profile the warm-up rows make for `graph`: bins at their deciles, and the
    /// model's classes on them.
    pub async fn warmup_profile(&self, graph: &Arc<LoadedGraph>) -> Result<Profile, String> {
        let computes = lock(&self.warmup).computes.clone();
        let graph = graph.clone();
        let max_features = self.spec.max_features as usize;
        tokio::task::spawn_blocking(move || {
            let arrays = warmup_arrays(&computes, graph.graph.inputs())?;
            profile_arrays(&arrays, &graph, max_features)
        })
        .await
        .map_err(|e| format!("profiling the first rows: {e}"))?
    }

    /// Becomes ready on `profile` (a stored profile every node of the cluster adopts, so
    /// that their buckets line up), after checking it fits `graph`; folds in the warm-up
    /// rows held, and drops them.
    pub fn adopt(&self, mut profile: Profile, graph: &LoadedGraph) -> Result<(), String> {
        let inputs = graph.graph.inputs();
        if !profile.fits(inputs) {
            return Err("the stored profile does not fit the model's inputs".into());
        }
        profile.prediction = profile::prediction_source(graph.graph.outputs());
        let _ = self.ready.set(Ready {
            live: Mutex::new(Live::new(profile.inputs.len(), profile.total_bins)),
            profile: Arc::new(profile),
        });
        let held = std::mem::take(&mut *lock(&self.warmup));
        for inputs in &held.computes {
            self.observe_inputs(inputs);
        }
        Ok(())
    }

    /// Its model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What this process saw over the `window_ms` before now (`None` until prepared).
    pub fn window(&self, window_ms: u64) -> Option<Counts> {
        let ready = self.ready()?;
        let mut live = lock(&ready.live);
        let now = now_ms();
        live.trim(now);
        Some(live.window(now, window_ms))
    }

    /// The buckets that changed since the last call, for the other nodes to read (and for
    /// this version's history to outlive the process).
    pub fn take_dirty(&self) -> Vec<Bucket> {
        self.ready()
            .map(|r| lock(&r.live).take_dirty())
            .unwrap_or_default()
    }

    /// Marks `buckets` changed again: publishing them failed.
    pub fn mark_dirty(&self, buckets: &[Bucket]) {
        if let Some(r) = self.ready() {
            lock(&r.live).mark_dirty(buckets);
        }
    }

    /// Scores `counts` (a window's, merged over the nodes) against the reference file's
    /// profile, or against `reference` (counts a window made the reference) when given.
    pub fn score(
        &self,
        counts: &Counts,
        reference: Option<(&Counts, ReferenceSource)>,
    ) -> DriftState {
        let Some(ready) = self.ready() else {
            return self.not_ready();
        };
        let own = if self.spec.reference.is_none() {
            ReferenceSource::FirstRows
        } else {
            ReferenceSource::File
        };
        let (profile, source) = match reference {
            Some((r, source)) if r.bins.len() == ready.profile.total_bins => {
                (Cow::Owned(rebase(&ready.profile, r)), source)
            }
            _ => (Cow::Borrowed(&*ready.profile), own),
        };
        let mut d = drift::score(&self.name, &profile, counts, self.spec.drift_threshold);
        d.reference = source;
        DriftState::Ready(Box::new(d))
    }

    /// Why it has no answer: preparing, or failed (with the reason).
    pub fn not_ready(&self) -> DriftState {
        if self.spec.reference.is_none() && self.failed().is_none() {
            return DriftState::NotReady {
                model: self.name.clone(),
                state: "warming_up",
                error: None,
                rows: Some(self.warmup_rows() as u64),
            };
        }
        match self.failed().as_ref() {
            Some((e, _)) => DriftState::NotReady {
                model: self.name.clone(),
                state: "failed",
                error: Some(e.clone()),
                rows: None,
            },
            None => DriftState::NotReady {
                model: self.name.clone(),
                state: "preparing",
                error: None,
                rows: None,
            },
        }
    }

    /// Whether `other`'s counts line up with this one's: both ready, with the same bins
    /// (the same reference file watched the same way, or the same stored profile).
    pub fn comparable(&self, other: &ModelMonitor) -> bool {
        match (self.ready(), other.ready()) {
            (Some(a), Some(b)) => a.profile.same_bins(&b.profile),
            _ => false,
        }
    }
}

/// `profile` with `counts` in place of the reference's own: the reference a window made,
/// or the stable version's counts standing in for it.
fn rebase(profile: &Profile, counts: &Counts) -> Profile {
    let mut base = profile.clone();
    for input in &mut base.inputs {
        for f in &mut input.features {
            let n = f.reference.len();
            f.reference
                .copy_from_slice(&counts.bins[f.start..f.start + n]);
        }
    }
    base.rows = counts.max_rows();
    base.reference_classes = counts.classes.clone();
    base
}

/// The candidate's drift from the stable version over the same window, from each one's
/// counts (`cw`, `sw`, merged over the nodes): what stable saw stands in for the
/// reference. `None` unless the two are [`ModelMonitor::comparable`];
/// `Some(Err((candidate rows, stable rows)))` while either saw fewer than
/// [`MIN_SAMPLES`] rows.
pub fn compare(
    candidate: &ModelMonitor,
    stable: &ModelMonitor,
    cw: &Counts,
    sw: &Counts,
) -> Option<Result<ModelDrift, (u64, u64)>> {
    if !candidate.comparable(stable) {
        return None;
    }
    let s = stable.ready()?;
    if cw.max_rows() < MIN_SAMPLES || sw.max_rows() < MIN_SAMPLES {
        return Some(Err((cw.max_rows(), sw.max_rows())));
    }
    Some(Ok(drift::score(
        &candidate.name,
        &rebase(&s.profile, sw),
        cw,
        candidate.spec.drift_threshold,
    )))
}

/// Profiles reference `arrays` for `graph` (blocking: it runs the model on the rows for
/// the reference's class shares, at most [`MAX_REFERENCE_PREDICTIONS`] of them).
fn profile_arrays(
    arrays: &std::collections::BTreeMap<String, npy::Array>,
    graph: &LoadedGraph,
    max_features: usize,
) -> Result<Profile, String> {
    let (inputs, outputs) = (graph.graph.inputs(), graph.graph.outputs());
    let mut profile = Profile::build(arrays, inputs, outputs, max_features)?;
    if let Some(source) = profile.prediction.clone() {
        let chunk = match inputs.first().and_then(|i| i.dims.first()) {
            Some(Some(fixed)) => *fixed as usize,
            _ => 64,
        };
        let batches = Profile::reference_batches(arrays, inputs, chunk.max(1)).unwrap_or_default();
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
}

fn now_ms() -> u64 {
    crate::unix_ms().max(0) as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every fold is a few counter increments, every hold a push: a poisoned lock holds
    // consistent state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
