//! The graph cache: every model of every version, loaded at most once per (model digest,
//! backend, target) and shared by all instances and requests; unloaded when idle (scale to
//! zero for models too) or to stay within the memory budget, and reloaded on demand.
//!
//! A version holds [`VersionModels`]: its model names mapped to shared [`ModelSlot`]s. Names
//! are the version's own, so one function can never reach another's models by name. Loads
//! happen at deploy (to fail early) or on first use after a restart or an unload; concurrent
//! first uses wait for one load.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::batch::BatchSpec;
use super::graph::{BatchingInfo, LoadedGraph};
use super::{BackendKind, Device, Encoding, ErrorCode, NnError, Target};
use crate::common::{BlobSource, Digest};
use crate::meter::Metrics;
use crate::monitor::{ModelMonitor, MonitorSpec};

/// A model as a version records it (persisted with the version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// The name guests pass to `graph.load-by-name`.
    pub name: String,
    /// Digest of the model blob.
    pub digest: Digest,
    /// Model size in bytes.
    pub size: u64,
    #[serde(default)]
    pub encoding: Encoding,
    #[serde(default)]
    pub target: Target,
    /// Backend asked for; `None` takes the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// Whether concurrent computes on it merge into batches.
    #[serde(default, skip_serializing_if = "BatchSpec::is_off")]
    pub batch: BatchSpec,
    /// Drift monitoring against a reference sample; `None`: not monitored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorSpec>,
}

/// What a version records about inference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NnSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelRef>,
    /// Largest model a guest may pass to `graph.load` itself, in bytes; `None`: not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_load_max_bytes: Option<u64>,
}

/// Settings of the graph cache.
#[derive(Debug, Clone)]
pub struct ModelsConfig {
    /// Backend for models that name none.
    pub default_backend: BackendKind,
    /// A graph unused this long is unloaded.
    pub idle_unload: Duration,
    /// Bound on the estimated memory of all loaded graphs, in bytes.
    pub memory_budget: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SlotKey {
    digest: Digest,
    backend: BackendKind,
    target: Target,
}

#[derive(Default)]
struct SlotState {
    graph: Option<Arc<LoadedGraph>>,
    /// Why the device differs from the target (auto fell back to the CPU).
    note: Option<String>,
    /// The last load failure, shown in the version info.
    error: Option<String>,
}

/// One model in the cache, shared by every version that names the same bytes.
pub struct ModelSlot {
    key: SlotKey,
    size: u64,
    state: Mutex<SlotState>,
    load_lock: tokio::sync::Mutex<()>,
    last_used_ms: AtomicU64,
    loads: AtomicU64,
    runs: AtomicU64,
    cache_hits: AtomicU64,
}

impl ModelSlot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one compute on this model.
    pub fn count_run(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one compute answered by the inference cache.
    pub fn count_cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// What makes this graph's outputs: model digest, backend and target.
    pub fn identity(&self) -> (Digest, BackendKind, Target) {
        (self.key.digest, self.key.backend, self.key.target)
    }
}

/// A version's models by name, and whether its guests may load their own.
#[derive(Default)]
pub struct VersionModels {
    models: BTreeMap<String, (ModelRef, Arc<ModelSlot>)>,
    /// Cap on a guest-supplied model; `None`: `graph.load` is refused.
    pub guest_load_max_bytes: Option<u64>,
    /// Where this version's compute results are cached; `None`: not cached.
    pub cache: Option<crate::cache::inference::InferenceScope>,
    /// Monitors of the models deployed with a reference, by model name.
    monitors: BTreeMap<String, Arc<ModelMonitor>>,
}

impl VersionModels {
    /// The slot of model `name`, if this version has one.
    pub fn get(&self, name: &str) -> Option<&Arc<ModelSlot>> {
        self.models.get(name).map(|(_, s)| s)
    }

    /// How model `name`'s computes batch in this version.
    pub fn batch(&self, name: &str) -> BatchSpec {
        self.models
            .get(name)
            .map_or(BatchSpec::Off, |(r, _)| r.batch)
    }

    /// The same models without their monitors (validation runs that must not count).
    pub fn without_monitors(mut self) -> Self {
        self.monitors.clear();
        self
    }

    /// The drift monitor of model `name`, if it has one.
    pub fn monitor(&self, name: &str) -> Option<&Arc<ModelMonitor>> {
        self.monitors.get(name)
    }

    /// Every monitored model of the version, by name.
    pub fn monitors(&self) -> impl Iterator<Item = (&str, &Arc<ModelMonitor>)> {
        self.monitors.iter().map(|(n, m)| (n.as_str(), m))
    }

    /// Names of this version's models.
    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }
}

/// Load state of one model of a version, for `GET /v1/functions/{name}/versions/{v}`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub digest: Digest,
    pub size: u64,
    pub encoding: Encoding,
    pub target: Target,
    pub backend: BackendKind,
    /// Where it runs (or will run) once loaded; `None` before the first load.
    pub device: Option<Device>,
    /// `loaded` or `unloaded`.
    pub state: &'static str,
    /// Times this graph was loaded since the server started (1 while it stays loaded).
    pub loads: u64,
    /// Computes run on it since the server started.
    pub runs: u64,
    /// Computes answered by the inference cache instead.
    pub cache_hits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Declared inputs and outputs, when loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<super::TensorInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<super::TensorInfo>>,
    /// Whether this version's computes on the model merge, and why (once loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchingInfo>,
    /// Its drift monitor's settings, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorSpec>,
}

/// The backends this server has and the cache of loaded graphs.
pub struct ModelManager {
    backends: Vec<Arc<dyn Backend>>,
    /// Why a backend compiled in is not usable here (e.g. no ONNX Runtime library).
    missing: HashMap<BackendKind, String>,
    config: ModelsConfig,
    slots: Mutex<HashMap<SlotKey, Weak<ModelSlot>>>,
    started: Instant,
    metrics: Arc<Metrics>,
    /// Where model bytes come from (the local folder, or the bucket through its cache).
    blobs: Arc<dyn BlobSource>,
}

impl ModelManager {
    /// A cache over `backends`; `missing` says why other backends are unavailable.
    pub fn new(
        backends: Vec<Arc<dyn Backend>>,
        missing: HashMap<BackendKind, String>,
        config: ModelsConfig,
        metrics: Arc<Metrics>,
        blobs: Arc<dyn BlobSource>,
    ) -> Arc<Self> {
        Arc::new(ModelManager {
            backends,
            missing,
            config,
            slots: Mutex::new(HashMap::new()),
            started: Instant::now(),
            metrics,
            blobs,
        })
    }

    /// Where inference times are recorded.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The backend of `kind`, or why this server has none.
    pub fn backend(&self, kind: BackendKind) -> Result<&Arc<dyn Backend>, NnError> {
        self.backends
            .iter()
            .find(|b| b.kind() == kind)
            .ok_or_else(|| {
                let why = self
                    .missing
                    .get(&kind)
                    .cloned()
                    .unwrap_or_else(|| "it is not compiled into this server".into());
                NnError::new(
                    ErrorCode::UnsupportedOperation,
                    format!("the {kind} backend is not available: {why}"),
                )
            })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Builds a version's model table (no loading).
    pub fn version_models(&self, spec: &NnSpec) -> VersionModels {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut models = BTreeMap::new();
        for m in &spec.models {
            let key = SlotKey {
                digest: m.digest,
                backend: m.backend.unwrap_or(self.config.default_backend),
                target: m.target,
            };
            let slot = match slots.get(&key).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    let s = Arc::new(ModelSlot {
                        key,
                        size: m.size,
                        state: Mutex::default(),
                        load_lock: tokio::sync::Mutex::new(()),
                        last_used_ms: AtomicU64::new(self.now_ms()),
                        loads: AtomicU64::new(0),
                        runs: AtomicU64::new(0),
                        cache_hits: AtomicU64::new(0),
                    });
                    slots.insert(key, Arc::downgrade(&s));
                    s
                }
            };
            models.insert(m.name.clone(), (m.clone(), slot));
        }
        slots.retain(|_, w| w.strong_count() > 0);
        let monitors = spec
            .models
            .iter()
            .filter_map(|m| {
                let spec = m.monitor.clone()?;
                Some((m.name.clone(), Arc::new(ModelMonitor::new(&m.name, spec))))
            })
            .collect();
        VersionModels {
            models,
            guest_load_max_bytes: spec.guest_load_max_bytes,
            cache: None,
            monitors,
        }
    }

    /// Loads every model of a version now (deploy), failing with the first model's error
    /// (explicit batch limits on a model that cannot batch included, and a monitor
    /// reference that does not fit the model); starts the calibration of models with
    /// `batch = "auto"`.
    pub async fn load_all(&self, models: &VersionModels) -> Result<(), (String, NnError)> {
        for (name, (r, slot)) in &models.models {
            let graph = self.graph(slot).await.map_err(|e| (name.clone(), e))?;
            self.prepare_batching(&graph, r.batch)
                .map_err(|e| (name.clone(), e))?;
            if let Some(m) = models.monitor(name) {
                m.prepare(&graph, self.blobs.as_ref()).await.map_err(|e| {
                    (
                        name.clone(),
                        NnError::invalid(format!("monitor reference: {e}")),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Prepares model `name`'s monitor in `models` now, loading the graph first if need
    /// be: a drift question reaching a node that has not served the version yet.
    pub async fn prepare_monitor(&self, models: &VersionModels, name: &str) -> Result<(), String> {
        let (Some(slot), Some(monitor)) = (models.get(name), models.monitor(name)) else {
            return Err(format!("model {name:?} has no monitor"));
        };
        let graph = self.graph(slot).await.map_err(|e| e.message)?;
        monitor.prepare(&graph, self.blobs.as_ref()).await
    }

    /// Where model and reference bytes come from.
    pub fn blobs(&self) -> &Arc<dyn BlobSource> {
        &self.blobs
    }

    /// Gets `graph` ready for a version asking for `spec`: calibrates for `"auto"`;
    /// refuses explicit limits on a model whose computes cannot merge.
    pub fn prepare_batching(
        &self,
        graph: &Arc<LoadedGraph>,
        spec: BatchSpec,
    ) -> Result<(), NnError> {
        match spec {
            BatchSpec::Auto => graph.calibrate_once(None),
            BatchSpec::Fixed(_) => {
                if let Some(why) = graph.unbatchable() {
                    return Err(NnError::invalid(format!(
                        "batch limits are set, but this model's computes cannot merge: {why}"
                    )));
                }
            }
            BatchSpec::Off => {}
        }
        Ok(())
    }

    /// The loaded graph of `slot`, loading it first if needed. Marks it used.
    pub async fn graph(&self, slot: &Arc<ModelSlot>) -> Result<Arc<LoadedGraph>, NnError> {
        slot.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        if let Some(g) = slot.state().graph.clone() {
            return Ok(g);
        }
        let _loading = slot.load_lock.lock().await;
        if let Some(g) = slot.state().graph.clone() {
            return Ok(g);
        }
        let result = self.load(slot).await;
        let mut state = slot.state();
        match result {
            Ok((graph, note)) => {
                let graph = Arc::new(graph);
                state.graph = Some(graph.clone());
                state.note = note;
                state.error = None;
                slot.loads.fetch_add(1, Ordering::Relaxed);
                slot.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
                Ok(graph)
            }
            Err(e) => {
                state.error = Some(e.message.clone());
                Err(e)
            }
        }
    }

    async fn load(&self, slot: &ModelSlot) -> Result<(LoadedGraph, Option<String>), NnError> {
        let backend = self.backend(slot.key.backend)?.clone();
        let (device, mut note) = resolve_device(backend.as_ref(), slot.key.target)?;
        let path = self
            .blobs
            .local(slot.key.digest)
            .await
            .map_err(|e| NnError::runtime("fetching the model blob", e))?;
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| NnError::runtime(&format!("reading model blob {}", path.display()), e))?;
        // Verify the bytes are the ones the version was deployed with.
        let digest = Digest::of(&bytes);
        if digest != slot.key.digest {
            return Err(NnError::runtime(
                "model blob",
                format!("content is {digest}, expected {}", slot.key.digest),
            ));
        }
        self.make_room(slot.size.saturating_mul(2))?;
        let target = slot.key.target;
        let kind = slot.key.backend;
        let loaded = tokio::task::spawn_blocking(move || {
            match backend.load(&bytes, device) {
                Ok(g) => Ok((g, device, None)),
                // `auto` falls back to the CPU when the GPU load itself fails.
                Err(e) if target == Target::Auto && device == Device::Gpu => {
                    backend.load(&bytes, Device::Cpu).map(|g| {
                        (
                            g,
                            Device::Cpu,
                            Some(format!("running on the CPU: {}", e.message)),
                        )
                    })
                }
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| NnError::runtime("model load task", e))??;
        let (graph, device, fallback) = loaded;
        if fallback.is_some() {
            note = fallback;
        }
        if let Some(n) = &note {
            tracing::warn!(digest = %slot.key.digest, "model target auto: {n}");
        }
        tracing::info!(digest = %slot.key.digest, backend = %kind, %device, "model loaded");
        Ok((
            LoadedGraph::new(graph, kind, device, self.metrics.clone()),
            note,
        ))
    }

    /// Live slots, without holding the lock while looking at them.
    fn live_slots(&self) -> Vec<Arc<ModelSlot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.values().filter_map(Weak::upgrade).collect()
    }

    /// Estimated bytes of all loaded graphs.
    fn loaded_bytes(&self) -> u64 {
        self.live_slots()
            .iter()
            .filter_map(|s| s.state().graph.as_ref().map(|g| g.graph.memory_bytes()))
            .sum()
    }

    /// Unloads idle graphs, least recently used first, until `need` more bytes fit the
    /// budget. Graphs in use by a request are never unloaded.
    fn make_room(&self, need: u64) -> Result<(), NnError> {
        let budget = self.config.memory_budget;
        if need > budget {
            return Err(NnError::new(
                ErrorCode::TooLarge,
                format!(
                    "the model needs about {need} bytes, more than the server's model memory budget of {budget} bytes"
                ),
            ));
        }
        let mut loaded: Vec<_> = self
            .live_slots()
            .into_iter()
            .filter(|s| s.state().graph.is_some())
            .collect();
        loaded.sort_by_key(|s| s.last_used_ms.load(Ordering::Relaxed));
        let mut used = self.loaded_bytes();
        for slot in loaded {
            if used + need <= budget {
                break;
            }
            if let Some(freed) = unload_if_unused(&slot) {
                tracing::info!(digest = %slot.key.digest, "model unloaded to make room");
                used = used.saturating_sub(freed);
            }
        }
        if used + need > budget {
            return Err(NnError::new(
                ErrorCode::TooLarge,
                format!(
                    "the server's model memory budget of {budget} bytes is taken by models in use; try again"
                ),
            ));
        }
        Ok(())
    }

    /// Unloads every graph unused for the idle time. Returns how many were unloaded.
    pub fn sweep_idle(&self) -> usize {
        let now = self.now_ms();
        let idle = self.config.idle_unload.as_millis() as u64;
        let mut n = 0;
        for slot in self.live_slots() {
            let last = slot.last_used_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= idle && unload_if_unused(&slot).is_some() {
                tracing::info!(digest = %slot.key.digest, "idle model unloaded");
                n += 1;
            }
        }
        n
    }

    /// Runs [`sweep_idle`](Self::sweep_idle) periodically until the manager is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period =
            (self.config.idle_unload / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                m.sweep_idle();
            }
        });
    }

    /// The info of each model of a version.
    pub fn info(&self, models: &VersionModels) -> Vec<ModelInfo> {
        models
            .models
            .iter()
            .map(|(name, (r, slot))| {
                let state = slot.state();
                let graph = state.graph.as_ref();
                ModelInfo {
                    name: name.clone(),
                    digest: r.digest,
                    size: r.size,
                    encoding: r.encoding,
                    target: r.target,
                    backend: slot.key.backend,
                    device: graph.map(|g| g.device),
                    state: if graph.is_some() {
                        "loaded"
                    } else {
                        "unloaded"
                    },
                    loads: slot.loads.load(Ordering::Relaxed),
                    runs: slot.runs.load(Ordering::Relaxed),
                    cache_hits: slot.cache_hits.load(Ordering::Relaxed),
                    note: state.note.clone(),
                    error: state.error.clone(),
                    inputs: graph.map(|g| g.graph.inputs().to_vec()),
                    outputs: graph.map(|g| g.graph.outputs().to_vec()),
                    batching: graph.map(|g| g.batching(r.batch)),
                    monitor: r.monitor.clone(),
                }
            })
            .collect()
    }

    /// Loads a model a guest passed in itself: private to the request, never cached.
    pub async fn load_guest_model(
        &self,
        bytes: Vec<u8>,
        target: Target,
    ) -> Result<Arc<LoadedGraph>, NnError> {
        let kind = self.config.default_backend;
        let backend = self.backend(kind)?.clone();
        let (device, _) = resolve_device(backend.as_ref(), target)?;
        let graph = tokio::task::spawn_blocking(move || backend.load(&bytes, device))
            .await
            .map_err(|e| NnError::runtime("model load task", e))??;
        Ok(Arc::new(LoadedGraph::new(
            graph,
            kind,
            device,
            self.metrics.clone(),
        )))
    }
}

/// Where `backend` will run a model asking for `target`, and why that is not the target
/// (an `auto` model on a host without a GPU). A GPU model on such a host is an error.
fn resolve_device(
    backend: &dyn Backend,
    target: Target,
) -> Result<(Device, Option<String>), NnError> {
    match (target, backend.gpu_unavailable()) {
        (Target::Cpu, _) => Ok((Device::Cpu, None)),
        (Target::Gpu | Target::Auto, None) => Ok((Device::Gpu, None)),
        (Target::Gpu, Some(why)) => Err(NnError::new(
            ErrorCode::UnsupportedOperation,
            format!(
                "the model asks for a GPU (target = \"gpu\"), but {why}; use target = \"auto\" to fall back to the CPU"
            ),
        )),
        (Target::Auto, Some(why)) => Ok((Device::Cpu, Some(format!("running on the CPU: {why}")))),
    }
}

/// Drops the slot's graph unless a request holds it; returns the bytes freed.
fn unload_if_unused(slot: &ModelSlot) -> Option<u64> {
    let mut state = slot.state();
    let graph = state.graph.as_ref()?;
    // One reference is the slot's own: more means a request is using it.
    if Arc::strong_count(graph) > 1 {
        return None;
    }
    let freed = graph.graph.memory_bytes();
    state.graph = None;
    Some(freed)
}
