//! The ONNX Runtime backend, through `ort` with `load-dynamic`: `libonnxruntime.so` is opened
//! at startup from `nn.onnxruntime_library` (or `ORT_DYLIB_PATH`), so the binary builds and
//! runs without it and a host that has it gets ONNX Runtime's faster kernels.
//!
//! `target = "gpu"` registers the CUDA execution provider with `error_on_failure`, so a host
//! without a working CUDA setup fails the load with ONNX Runtime's reason instead of quietly
//! running on the CPU. `ort` runs a session through `&mut`, so each graph keeps a small pool
//! of sessions (one per core by default) and concurrent requests take one each.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use ort::execution_providers::{CUDAExecutionProvider, ExecutionProvider};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::run_options::RunOptions;
use ort::tensor::TensorElementType;
use ort::value::{DynValue, ValueType};

use super::backend::{Backend, BackendGraph, Cancel, TensorInfo, from_le, to_le, wasi_dims};
use super::{BackendKind, Device, ElementType, ErrorCode, NnError, Tensor};

/// ONNX Runtime, opened once per process.
pub struct OrtBackend {
    library: PathBuf,
    sessions: usize,
    intra_threads: usize,
    gpu: Result<(), String>,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("library", &self.library)
            .field("sessions", &self.sessions)
            .finish()
    }
}

impl OrtBackend {
    /// Opens the ONNX Runtime library at `library`. `sessions` sessions per graph run
    /// concurrently, each with `intra_threads` threads.
    ///
    /// Only one library per process: `ort` keeps it in a global.
    pub fn open(library: &Path, sessions: usize, intra_threads: usize) -> Result<Self, String> {
        if !library.is_file() {
            return Err(format!(
                "ONNX Runtime library {} does not exist (set nn.onnxruntime_library or ORT_DYLIB_PATH to libonnxruntime.so)",
                library.display()
            ));
        }
        let path = library.to_string_lossy().into_owned();
        // `ort` panics (rather than failing) when the library cannot be opened or is too old.
        let committed = std::panic::catch_unwind(AssertUnwindSafe(|| {
            ort::init_from(path).with_name("kiln").commit()
        }));
        match committed {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("initializing ONNX Runtime: {e}")),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown failure".into());
                return Err(format!(
                    "loading ONNX Runtime from {}: {msg}",
                    library.display()
                ));
            }
        }
        let gpu = match CUDAExecutionProvider::default().is_available() {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "the ONNX Runtime at {} has no CUDA execution provider (install the onnxruntime-gpu build and the CUDA libraries)",
                library.display()
            )),
            Err(e) => Err(format!("querying ONNX Runtime's execution providers: {e}")),
        };
        Ok(OrtBackend {
            library: library.to_path_buf(),
            sessions: sessions.max(1),
            intra_threads: intra_threads.max(1),
            gpu,
        })
    }

    fn session(&self, model: &[u8], device: Device) -> Result<Session, NnError> {
        let fail = |what: &str, e: ort::Error| NnError::runtime(what, e);
        let mut builder = Session::builder()
            .map_err(|e| fail("creating an ONNX Runtime session", e))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| fail("setting the optimization level", e))?
            .with_intra_threads(self.intra_threads)
            .map_err(|e| fail("setting intra-op threads", e))?
            .with_inter_threads(1)
            .map_err(|e| fail("setting inter-op threads", e))?;
        if device == Device::Gpu {
            builder = builder
                .with_execution_providers([CUDAExecutionProvider::default()
                    .build()
                    .error_on_failure()])
                .map_err(|e| {
                    NnError::new(
                        ErrorCode::UnsupportedOperation,
                        format!("ONNX Runtime could not use the GPU: {e}"),
                    )
                })?;
        }
        builder.commit_from_memory(model).map_err(|e| {
            NnError::new(
                ErrorCode::InvalidEncoding,
                format!("ONNX Runtime cannot load this model: {e}"),
            )
        })
    }
}

impl Backend for OrtBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Onnxruntime
    }

    fn gpu_unavailable(&self) -> Option<String> {
        self.gpu.clone().err()
    }

    fn load(&self, model: &[u8], device: Device) -> Result<Box<dyn BackendGraph>, NnError> {
        if device == Device::Gpu
            && let Some(why) = self.gpu_unavailable()
        {
            return Err(NnError::new(ErrorCode::UnsupportedOperation, why));
        }
        let first = self.session(model, device)?;
        let inputs = first
            .inputs
            .iter()
            .map(|i| info(&i.name, &i.input_type))
            .collect();
        let outputs = first
            .outputs
            .iter()
            .map(|o| info(&o.name, &o.output_type))
            .collect();
        let mut pool = vec![first];
        for _ in 1..self.sessions {
            pool.push(self.session(model, device)?);
        }
        let memory = model.len() as u64 * 2 * pool.len() as u64;
        Ok(Box::new(OrtGraph {
            intra_threads: self.intra_threads,
            sessions: pool.len(),
            pool: Mutex::new(pool),
            returned: Condvar::new(),
            inputs,
            outputs,
            memory,
        }))
    }
}

struct OrtGraph {
    /// Threads each run computes on (the caller's and ONNX Runtime's pool).
    intra_threads: usize,
    /// Sessions in the pool: runs that proceed at once.
    sessions: usize,
    pool: Mutex<Vec<Session>>,
    returned: Condvar,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    memory: u64,
}

/// A session borrowed from a graph's pool; goes back on drop.
struct Borrowed<'a> {
    graph: &'a OrtGraph,
    session: Option<Session>,
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.graph
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
            self.graph.returned.notify_one();
        }
    }
}

impl OrtGraph {
    fn borrow(&self) -> Borrowed<'_> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = pool.pop() {
                return Borrowed {
                    graph: self,
                    session: Some(s),
                };
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl BackendGraph for OrtGraph {
    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>, cancel: &Cancel) -> Result<Vec<Tensor>, NnError> {
        let values = inputs
            .into_iter()
            .zip(&self.inputs)
            .map(|(t, info)| to_ort(t).map(|v| (info.name.clone(), v)))
            .collect::<Result<Vec<_>, _>>()?;
        let options =
            Arc::new(RunOptions::new().map_err(|e| NnError::runtime("creating run options", e))?);
        let stop = options.clone();
        cancel.on_cancel(Box::new(move || {
            let _ = stop.terminate();
        }));
        let mut borrowed = self.borrow();
        let Some(session) = borrowed.session.as_mut() else {
            return Err(NnError::runtime("ONNX Runtime", "no session"));
        };
        let outputs = session.run_with_options(values, &options).map_err(|e| {
            if cancel.is_cancelled() {
                NnError::new(
                    ErrorCode::Timeout,
                    "inference cancelled: the request ran out of time",
                )
            } else {
                NnError::runtime("ONNX Runtime inference failed", e)
            }
        })?;
        self.outputs
            .iter()
            .map(|o| {
                let v = outputs.get(&o.name).ok_or_else(|| {
                    NnError::runtime("ONNX Runtime", format!("output {:?} missing", o.name))
                })?;
                from_ort(v)
            })
            .collect()
    }

    fn memory_bytes(&self) -> u64 {
        self.memory
    }

    fn concurrency(&self) -> usize {
        self.sessions
    }

    fn computes_on_caller(&self) -> bool {
        self.intra_threads == 1
    }
}

fn element_type(t: TensorElementType) -> Option<ElementType> {
    Some(match t {
        TensorElementType::Float16 => ElementType::F16,
        TensorElementType::Float32 => ElementType::F32,
        TensorElementType::Float64 => ElementType::F64,
        TensorElementType::Bfloat16 => ElementType::Bf16,
        TensorElementType::Uint8 => ElementType::U8,
        TensorElementType::Int32 => ElementType::I32,
        TensorElementType::Int64 => ElementType::I64,
        _ => return None,
    })
}

fn info(name: &str, vt: &ValueType) -> TensorInfo {
    match vt {
        ValueType::Tensor { ty, shape, .. } => TensorInfo {
            name: name.to_string(),
            ty: element_type(*ty),
            dims: shape.iter().map(|d| u64::try_from(*d).ok()).collect(),
        },
        _ => TensorInfo {
            name: name.to_string(),
            ty: None,
            dims: Vec::new(),
        },
    }
}

fn to_ort(t: Tensor) -> Result<DynValue, NnError> {
    let shape: Vec<i64> = t.dims.iter().map(|d| i64::from(*d)).collect();
    let made = match t.ty {
        ElementType::F32 => {
            ort::value::Tensor::from_array((shape, from_le(&t.data, f32::from_le_bytes)))
                .map(|v| v.into_dyn())
        }
        ElementType::F64 => {
            ort::value::Tensor::from_array((shape, from_le(&t.data, f64::from_le_bytes)))
                .map(|v| v.into_dyn())
        }
        ElementType::I32 => {
            ort::value::Tensor::from_array((shape, from_le(&t.data, i32::from_le_bytes)))
                .map(|v| v.into_dyn())
        }
        ElementType::I64 => {
            ort::value::Tensor::from_array((shape, from_le(&t.data, i64::from_le_bytes)))
                .map(|v| v.into_dyn())
        }
        ElementType::U8 => ort::value::Tensor::from_array((shape, t.data)).map(|v| v.into_dyn()),
        other => {
            return Err(NnError::new(
                ErrorCode::UnsupportedOperation,
                format!("the onnxruntime backend does not take {other} tensors"),
            ));
        }
    };
    made.map_err(|e| NnError::invalid(format!("building an ONNX Runtime tensor: {e}")))
}

fn from_ort(v: &DynValue) -> Result<Tensor, NnError> {
    let read = |e: ort::Error| NnError::runtime("reading an ONNX Runtime output", e);
    let (ty, shape, data) = match v.dtype() {
        ValueType::Tensor { ty, .. } => match ty {
            TensorElementType::Float32 => {
                let (s, d) = v.try_extract_tensor::<f32>().map_err(read)?;
                (ElementType::F32, s.to_vec(), to_le(d, f32::to_le_bytes))
            }
            TensorElementType::Float64 => {
                let (s, d) = v.try_extract_tensor::<f64>().map_err(read)?;
                (ElementType::F64, s.to_vec(), to_le(d, f64::to_le_bytes))
            }
            TensorElementType::Int32 => {
                let (s, d) = v.try_extract_tensor::<i32>().map_err(read)?;
                (ElementType::I32, s.to_vec(), to_le(d, i32::to_le_bytes))
            }
            TensorElementType::Int64 => {
                let (s, d) = v.try_extract_tensor::<i64>().map_err(read)?;
                (ElementType::I64, s.to_vec(), to_le(d, i64::to_le_bytes))
            }
            TensorElementType::Uint8 => {
                let (s, d) = v.try_extract_tensor::<u8>().map_err(read)?;
                (ElementType::U8, s.to_vec(), d.to_vec())
            }
            other => {
                return Err(NnError::new(
                    ErrorCode::UnsupportedOperation,
                    format!("the model produced a {other:?} tensor, which wasi-nn cannot carry"),
                ));
            }
        },
        other => {
            return Err(NnError::new(
                ErrorCode::UnsupportedOperation,
                format!(
                    "the model produced a {other:?} value, which wasi-nn cannot carry (export without ZipMap)"
                ),
            ));
        }
    };
    let dims = wasi_dims(shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)))?;
    Ok(Tensor { dims, ty, data })
}
