//! The `wasi:nn` imports a guest calls, on top of the per-request [`NnCtx`].
//!
//! - `graph.load-by-name` looks only at the calling version's models; the graph comes from
//!   the shared cache (loading it if it was unloaded).
//! - `graph.load` (guest-supplied bytes) is refused unless the version enabled it, and then
//!   capped in size; such a graph lives only as long as the request.
//! - `compute` checks every input against the model first, then runs: inline when the
//!   run is known to be quick *for its rows*, otherwise on the blocking pool so that the
//!   request's timeout still fires (and cancels the run where the backend allows). With
//!   batching on for the model (`[models.<name>] batch`), it goes through the graph's
//!   batching queue instead and is billed its share of the merged run.
//! - Identical inputs on the same graph come from the version's inference cache (blake3
//!   key over graph identity and every input), concurrent identical computes run once.
//! - Inference wall time is added up per device for metering and `server-timing`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use super::backend::check_inputs;
use super::batch::{self, BatchSpec, Served};
use super::graph::LoadedGraph;
use super::models::{ModelManager, ModelSlot, VersionModels};
use super::{Device, ElementType, ErrorCode, NnError, Target, Tensor};
use crate::cache::Lookup;
use crate::cache::inference as inference_cache;
use crate::monitor::ModelMonitor;

mod generated {
    wasmtime::component::bindgen!({
        world: "ml",
        path: "../wit/wasi-nn.wit",
        with: {
            "wasi:nn/graph.graph": super::GraphHandle,
            "wasi:nn/tensor.tensor": crate::nn::Tensor,
            "wasi:nn/inference.graph-execution-context": super::ExecContext,
            "wasi:nn/errors.error": crate::nn::NnError,
        },
        imports: {
            "wasi:nn/graph.load": async | trappable,
            "wasi:nn/graph.load-by-name": async | trappable,
            "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
            default: trappable,
        },
    });
}

use generated::wasi::nn::{errors, graph, inference, tensor};

/// A graph as a guest holds it: the shared loaded graph, the cache slot it came from, and
/// how the guest's version batches it.
#[derive(Clone)]
pub struct GraphHandle {
    graph: Arc<LoadedGraph>,
    slot: Option<Arc<ModelSlot>>,
    batch: BatchSpec,
    /// The version's drift monitor of this model, if it has one.
    monitor: Option<Arc<ModelMonitor>>,
}

/// An execution context: which graph it runs.
pub struct ExecContext {
    graph: GraphHandle,
}

/// Inference time of one request, per device, and its inference cache hits and misses,
/// shared with the code that reports them.
#[derive(Debug, Default)]
pub struct InferenceTime {
    cpu_ns: AtomicU64,
    gpu_ns: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    /// Part of the above that ran on the guest's own thread (inside its CPU time).
    inline_ns: AtomicU64,
    /// Most rows in a run one of its computes shared (0: no compute ran).
    batch_rows: AtomicU32,
    /// A compute went through a batching queue.
    batched: AtomicBool,
    /// The class the request's first classifying compute predicted for its first row.
    prediction: std::sync::OnceLock<i64>,
}

impl InferenceTime {
    fn add(&self, device: Device, d: Duration) {
        let ns = d.as_nanos() as u64;
        match device {
            Device::Cpu => self.cpu_ns.fetch_add(ns, Ordering::Relaxed),
            Device::Gpu => self.gpu_ns.fetch_add(ns, Ordering::Relaxed),
        };
    }

    /// Inference run on the guest's thread so far (already counted as inference, so
    /// metering takes it out of the guest's CPU time).
    pub fn inline(&self) -> Duration {
        Duration::from_nanos(self.inline_ns.load(Ordering::Relaxed))
    }

    /// Most rows in a backend run one of this request's computes shared (0 without a
    /// run), and whether any went through a batching queue.
    pub fn batch(&self) -> (u32, bool) {
        (
            self.batch_rows.load(Ordering::Relaxed),
            self.batched.load(Ordering::Relaxed),
        )
    }

    /// The class this request's model predicted (the first compute with a class output,
    /// its first row), if any.
    pub fn prediction(&self) -> Option<i64> {
        self.prediction.get().copied()
    }

    /// Inference cache hits and misses of this request so far.
    pub fn cache(&self) -> (u64, u64) {
        (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
        )
    }

    /// Time spent in inference on `device` so far.
    pub fn on(&self, device: Device) -> Duration {
        Duration::from_nanos(match device {
            Device::Cpu => self.cpu_ns.load(Ordering::Relaxed),
            Device::Gpu => self.gpu_ns.load(Ordering::Relaxed),
        })
    }
}

/// Per-request `wasi:nn` state.
pub struct NnCtx {
    models: Arc<VersionModels>,
    manager: Arc<ModelManager>,
    deadline: Instant,
    time: Arc<InferenceTime>,
}

impl NnCtx {
    /// State for one request of a version with `models`, ending at `deadline`.
    pub fn new(
        models: Arc<VersionModels>,
        manager: Arc<ModelManager>,
        deadline: Instant,
        time: Arc<InferenceTime>,
    ) -> Self {
        NnCtx {
            models,
            manager,
            deadline,
            time,
        }
    }
}

/// What the generated bindings call into: the request's state and its resource table.
pub struct NnView<'a> {
    pub ctx: &'a mut NnCtx,
    pub table: &'a mut ResourceTable,
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds the `wasi:nn` imports to `linker`; `view` finds the request's state.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    graph::add_to_linker::<T, HasNn>(linker, view)?;
    tensor::add_to_linker::<T, HasNn>(linker, view)?;
    inference::add_to_linker::<T, HasNn>(linker, view)?;
    errors::add_to_linker::<T, HasNn>(linker, view)?;
    Ok(())
}

type GuestResult<T> = wasmtime::Result<Result<Resource<T>, Resource<NnError>>>;

impl NnView<'_> {
    /// Hands a result to the guest: values and errors both become resources.
    fn give<T: Send + 'static>(&mut self, r: Result<T, NnError>) -> GuestResult<T> {
        match r {
            Ok(v) => Ok(Ok(self.table.push(v)?)),
            Err(e) => {
                tracing::debug!(code = ?e.code, "wasi-nn error for the guest: {}", e.message);
                Ok(Err(self.table.push(e)?))
            }
        }
    }
}

fn element_type(t: tensor::TensorType) -> ElementType {
    use tensor::TensorType as W;
    match t {
        W::Fp16 => ElementType::F16,
        W::Fp32 => ElementType::F32,
        W::Fp64 => ElementType::F64,
        W::Bf16 => ElementType::Bf16,
        W::U8 => ElementType::U8,
        W::I32 => ElementType::I32,
        W::I64 => ElementType::I64,
    }
}

fn tensor_type(t: ElementType) -> tensor::TensorType {
    use tensor::TensorType as W;
    match t {
        ElementType::F16 => W::Fp16,
        ElementType::F32 => W::Fp32,
        ElementType::F64 => W::Fp64,
        ElementType::Bf16 => W::Bf16,
        ElementType::U8 => W::U8,
        ElementType::I32 => W::I32,
        ElementType::I64 => W::I64,
    }
}

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builders: Vec<graph::GraphBuilder>,
        encoding: graph::GraphEncoding,
        target: graph::ExecutionTarget,
    ) -> GuestResult<GraphHandle> {
        let r = async {
            let Some(cap) = self.ctx.models.guest_load_max_bytes else {
                return Err(NnError::new(
                    ErrorCode::Security,
                    "graph.load with guest-supplied bytes is off for this function: load its models by name, or enable it with [nn] guest_load_max_mb in kiln.toml",
                ));
            };
            if encoding != graph::GraphEncoding::Onnx {
                return Err(NnError::new(
                    ErrorCode::InvalidEncoding,
                    format!("encoding {encoding:?} is not supported: only onnx"),
                ));
            }
            let target = match target {
                graph::ExecutionTarget::Cpu => Target::Cpu,
                graph::ExecutionTarget::Gpu => Target::Gpu,
                graph::ExecutionTarget::Tpu => {
                    return Err(NnError::new(
                        ErrorCode::UnsupportedOperation,
                        "no TPU on this server",
                    ));
                }
            };
            let [model] = <[Vec<u8>; 1]>::try_from(builders).map_err(|b| {
                NnError::invalid(format!("an ONNX model is one builder, got {}", b.len()))
            })?;
            if model.len() as u64 > cap {
                return Err(NnError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the model is {} bytes; this function allows {cap}",
                        model.len()
                    ),
                ));
            }
            let graph = self.ctx.manager.load_guest_model(model, target).await?;
            Ok(GraphHandle {
                graph,
                slot: None,
                batch: BatchSpec::Off,
                monitor: None,
            })
        }
        .await;
        self.give(r)
    }

    async fn load_by_name(&mut self, name: String) -> GuestResult<GraphHandle> {
        let r = match self.ctx.models.get(&name).cloned() {
            None => Err(NnError::new(
                ErrorCode::NotFound,
                format!(
                    "no model named {name:?} in this function version (models: {})",
                    self.ctx.models.names().join(", ")
                ),
            )),
            Some(slot) => {
                let batch = self.ctx.models.batch(&name);
                let monitor = self.ctx.models.monitor(&name).cloned();
                match self.ctx.manager.graph(&slot).await {
                    Ok(graph) => {
                        self.ctx
                            .manager
                            .prepare_batching(&graph, batch)
                            .map(|()| GraphHandle {
                                graph,
                                slot: Some(slot),
                                batch,
                                monitor,
                            })
                    }
                    Err(e) => Err(e),
                }
            }
        };
        self.give(r)
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(&mut self, graph: Resource<GraphHandle>) -> GuestResult<ExecContext> {
        let graph = self.table.get(&graph)?.clone();
        self.give(Ok(ExecContext { graph }))
    }

    fn drop(&mut self, graph: Resource<GraphHandle>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        ctx: Resource<ExecContext>,
        inputs: Vec<inference::NamedTensor>,
    ) -> wasmtime::Result<Result<Vec<inference::NamedTensor>, Resource<NnError>>> {
        let handle = self.table.get(&ctx)?.graph.clone();
        let mut given = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            given.push((name, self.table.delete(t)?));
        }
        let graph = handle.graph;
        let checked = check_inputs(graph.graph.inputs(), given);
        let ran = match checked {
            Err(e) => Err(e),
            Ok(_) if Instant::now() >= self.ctx.deadline => Err(NnError::new(
                ErrorCode::Timeout,
                "the request's time ran out before inference",
            )),
            Ok(inputs) => {
                // Drift monitoring sees every sampled compute, cache hits included: it
                // watches the traffic, not the backend.
                let watch = handle
                    .monitor
                    .as_ref()
                    .filter(|m| m.sample(&graph, self.ctx.manager.blobs()));
                if let Some(m) = watch {
                    m.observe_inputs(&inputs);
                }
                // Only the version's own models are cached: a guest-loaded graph lives for
                // one request.
                let cache = match (&handle.slot, &self.ctx.models.cache) {
                    (Some(slot), Some(c)) if c.cache.enabled() => Some((slot, c)),
                    _ => None,
                };
                let mut fill = None;
                if let Some((slot, c)) = cache {
                    let key = inference_cache::key(
                        c.at.scope,
                        slot.identity(),
                        graph.graph.inputs(),
                        &inputs,
                    );
                    let wait = self.ctx.deadline.saturating_duration_since(Instant::now());
                    match c.cache.lookup(&c.at, key, wait).await {
                        Lookup::Hit(outputs, _) => {
                            slot.count_cache_hit();
                            self.ctx.time.cache_hits.fetch_add(1, Ordering::Relaxed);
                            if let Some(m) = watch {
                                m.observe_outputs(&outputs);
                            }
                            return self.hand_out(&graph, Ok(outputs.as_ref().clone()));
                        }
                        Lookup::Miss(f) => {
                            self.ctx.time.cache_misses.fetch_add(1, Ordering::Relaxed);
                            fill = Some((f, c));
                        }
                    }
                }
                if let Some(slot) = &handle.slot {
                    slot.count_run();
                }
                // A model "auto" times on a real input: this compute's first row, kept
                // until the compute has succeeded.
                let sample = (handle.batch == BatchSpec::Auto
                    && graph.wants_sample()
                    && batch::mergeable(&inputs))
                .then(|| super::cost::tiled(&inputs, 1));
                let served = match graph.limits(handle.batch) {
                    Some(limits) => {
                        self.ctx.time.batched.store(true, Ordering::Relaxed);
                        batch::submit(&graph, inputs, limits, self.ctx.deadline).await
                    }
                    None => {
                        let rows = batch::rows_of(&inputs);
                        let ran = batch::execute(&graph, inputs, rows, true).await;
                        Served {
                            share_ns: ran.took.as_nanos() as u64,
                            outputs: ran.outputs,
                            batch_rows: rows,
                            waited: Duration::ZERO,
                            inline: ran.inline,
                        }
                    }
                };
                if let Some(sample) = sample
                    && served.outputs.is_ok()
                {
                    graph.calibrate_once(Some(&sample));
                }
                let took = Duration::from_nanos(served.share_ns);
                self.ctx.time.add(graph.device, took);
                self.ctx
                    .time
                    .batch_rows
                    .fetch_max(served.batch_rows, Ordering::Relaxed);
                if served.inline {
                    self.ctx
                        .time
                        .inline_ns
                        .fetch_add(served.share_ns, Ordering::Relaxed);
                }
                self.ctx
                    .manager
                    .metrics()
                    .inference(graph.backend, graph.device, took);
                let out = served.outputs;
                if let (Ok(outputs), Some(m)) = (&out, watch) {
                    m.observe_outputs(outputs);
                }
                if let (Ok(outputs), Some((mut f, c))) = (&out, fill) {
                    let size = inference_cache::size(outputs);
                    // Too large for the cache: skip the copy `store` would refuse anyway.
                    if size < c.cache.max_entry() {
                        f.store(&c.at, Arc::new(outputs.clone()), size);
                    }
                }
                out
            }
        };
        self.hand_out(&graph, ran)
    }

    fn drop(&mut self, ctx: Resource<ExecContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        Ok(())
    }
}

impl NnView<'_> {
    /// Gives compute's outputs (named by the graph) or its error to the guest.
    fn hand_out(
        &mut self,
        graph: &LoadedGraph,
        ran: Result<Vec<Tensor>, NnError>,
    ) -> wasmtime::Result<Result<Vec<inference::NamedTensor>, Resource<NnError>>> {
        match ran {
            Ok(outputs) => {
                if let Some(source) = &graph.prediction
                    && self.ctx.time.prediction.get().is_none()
                {
                    source.first_class(&outputs, |c| {
                        let _ = self.ctx.time.prediction.set(c);
                    });
                }
                let mut named = Vec::with_capacity(outputs.len());
                for (info, t) in graph.graph.outputs().iter().zip(outputs) {
                    named.push((info.name.clone(), self.table.push(t)?));
                }
                Ok(Ok(named))
            }
            Err(e) => {
                tracing::debug!(code = ?e.code, "wasi-nn compute error for the guest: {}", e.message);
                Ok(Err(self.table.push(e)?))
            }
        }
    }
}

impl tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: tensor::TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<Tensor>> {
        Ok(self.table.push(Tensor {
            dims: dimensions,
            ty: element_type(ty),
            data,
        })?)
    }

    fn dimensions(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&t)?.dims.clone())
    }

    fn ty(&mut self, t: Resource<Tensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(tensor_type(self.table.get(&t)?.ty))
    }

    fn data(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&t)?.data.clone())
    }

    fn drop(&mut self, t: Resource<Tensor>) -> wasmtime::Result<()> {
        self.table.delete(t)?;
        Ok(())
    }
}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<errors::ErrorCode> {
        use errors::ErrorCode as W;
        Ok(match self.table.get(&e)?.code {
            ErrorCode::InvalidArgument => W::InvalidArgument,
            ErrorCode::InvalidEncoding => W::InvalidEncoding,
            ErrorCode::Timeout => W::Timeout,
            ErrorCode::RuntimeError => W::RuntimeError,
            ErrorCode::UnsupportedOperation => W::UnsupportedOperation,
            ErrorCode::TooLarge => W::TooLarge,
            ErrorCode::NotFound => W::NotFound,
            ErrorCode::Security => W::Security,
            ErrorCode::Unknown => W::Unknown,
        })
    }

    fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.message.clone())
    }

    fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(e)?;
        Ok(())
    }
}

impl tensor::Host for NnView<'_> {}
impl inference::Host for NnView<'_> {}
impl errors::Host for NnView<'_> {}
