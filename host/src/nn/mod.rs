//! `wasi:nn` for guests: models packaged with a function version, run natively.
//!
//! - [`backend`]: the one interface every inference engine implements, and the tensor
//!   checks they share; [`tract`] (pure Rust, default) and [`onnxruntime`] (ONNX Runtime
//!   loaded at run time, CPU or CUDA) implement it, each behind its own cargo feature.
//! - [`models`]: the graph cache. A graph is loaded once per (model digest, backend, target),
//!   at deploy or first use, and shared by every instance and request; idle graphs unload
//!   and the total is bounded.
//! - [`graph`]: a loaded graph: what its runs cost ([`cost`]: fitted per model, deciding
//!   where a run goes and whether batching pays) and its batching queue ([`batch`]: computes
//!   from many instances merged into one run, outputs split back, time shared by rows).
//! - [`host`]: the `wasi:nn@0.2.0-rc-2024-10-28` imports (WIT in `wit/wasi-nn.wit`). Names
//!   resolve only within the calling version; compute runs under the request's deadline and
//!   its time is counted per device for metering.
//!
//! Kiln owns these bindings instead of using `wasmtime-wasi-nn`'s: that crate's compute is
//! synchronous (a long inference would block a server thread and ignore the timeout), every
//! failure reaches the guest as `runtime-error` "Failed while accessing backend" with the
//! cause lost, and its ONNX backend handles f32 only.

pub mod backend;
pub mod batch;
pub mod cost;
pub mod embed;
pub mod graph;
pub mod host;
pub mod models;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
#[cfg(feature = "tract")]
pub mod tract;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::common::BlobSource;
use crate::config::{DefaultBackend, NnConfig};
use crate::meter::Metrics;

pub use backend::{Backend, BackendGraph, TensorInfo};
pub use batch::BatchSpec;
pub use host::{InferenceTime, NnCtx};
pub use models::{ModelInfo, ModelManager, ModelRef, ModelsConfig, NnSpec, VersionModels};

/// Opens the backends `config` asks for and builds the model cache. ONNX Runtime is used
/// when its library opens; if it was asked for explicitly (`default_backend =
/// "onnxruntime"`) and cannot open, startup fails with the reason.
/// Every inference is recorded in `metrics`; model bytes come from `blobs`.
pub fn open(
    config: &NnConfig,
    metrics: Arc<Metrics>,
    blobs: Arc<dyn BlobSource>,
) -> anyhow::Result<Arc<ModelManager>> {
    #[cfg_attr(
        not(any(feature = "tract", feature = "onnxruntime")),
        allow(unused_mut)
    )]
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    let mut missing = HashMap::new();
    #[cfg(feature = "tract")]
    backends.push(Arc::new(tract::TractBackend));
    #[cfg(not(feature = "tract"))]
    missing.insert(
        BackendKind::Tract,
        "built without the tract feature".to_string(),
    );

    #[cfg(feature = "onnxruntime")]
    match &config.onnxruntime_library {
        Some(path) => match onnxruntime::OrtBackend::open(
            path,
            config.onnxruntime_sessions,
            config.onnxruntime_threads,
        ) {
            Ok(b) => {
                tracing::info!(library = %path.display(), gpu = b.gpu_unavailable().is_none(), "ONNX Runtime loaded");
                backends.push(Arc::new(b));
            }
            Err(why) => {
                tracing::warn!("onnxruntime backend off: {why}");
                missing.insert(BackendKind::Onnxruntime, why);
            }
        },
        None => {
            missing.insert(
                BackendKind::Onnxruntime,
                "no ONNX Runtime library configured (set nn.onnxruntime_library or ORT_DYLIB_PATH)"
                    .to_string(),
            );
        }
    }
    #[cfg(not(feature = "onnxruntime"))]
    missing.insert(
        BackendKind::Onnxruntime,
        "built without the onnxruntime feature".to_string(),
    );

    let has = |k: BackendKind| backends.iter().any(|b| b.kind() == k);
    let default_backend = match config.default_backend {
        DefaultBackend::Auto if has(BackendKind::Onnxruntime) => BackendKind::Onnxruntime,
        DefaultBackend::Auto => BackendKind::Tract,
        DefaultBackend::Tract => BackendKind::Tract,
        DefaultBackend::Onnxruntime => BackendKind::Onnxruntime,
    };
    if !has(default_backend) {
        anyhow::bail!(
            "nn.default_backend is {default_backend}, which is not available: {}",
            missing
                .get(&default_backend)
                .map(String::as_str)
                .unwrap_or("unknown reason")
        );
    }
    Ok(ModelManager::new(
        backends,
        missing,
        ModelsConfig {
            default_backend,
            idle_unload: Duration::from_millis(config.model_idle_unload_ms),
            memory_budget: config.model_memory_mb.saturating_mul(1 << 20),
        },
        metrics,
        blobs,
    ))
}

/// The WIT package this host serves; a guest built against another date does not link.
pub const WASI_NN_PACKAGE: &str = "wasi:nn@0.2.0-rc-2024-10-28";

/// Where a model asks to run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Always the CPU.
    #[default]
    Cpu,
    /// A GPU, or the deploy fails.
    Gpu,
    /// A GPU when the host has one, else the CPU (the version's info says which).
    Auto,
}

/// Where a loaded graph actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Gpu,
}

/// An inference engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract: pure Rust, CPU.
    Tract,
    /// ONNX Runtime: CPU, or CUDA when its provider libraries are present.
    Onnxruntime,
}

impl BackendKind {
    /// The name used in manifests, version info and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Tract => "tract",
            BackendKind::Onnxruntime => "onnxruntime",
        }
    }
}

impl Device {
    /// The name used in version info, `server-timing` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Cpu => "cpu",
            Target::Gpu => "gpu",
            Target::Auto => "auto",
        })
    }
}

/// Model file formats. Only ONNX today; the field exists so manifests say what they carry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Onnx,
}

/// Element types of `wasi:nn` tensors (`tensor-type` in the WIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    F16,
    F32,
    F64,
    Bf16,
    U8,
    I32,
    I64,
}

impl ElementType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElementType::U8 => 1,
            ElementType::F16 | ElementType::Bf16 => 2,
            ElementType::F32 | ElementType::I32 => 4,
            ElementType::F64 | ElementType::I64 => 8,
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElementType::F16 => "f16",
            ElementType::F32 => "f32",
            ElementType::F64 => "f64",
            ElementType::Bf16 => "bf16",
            ElementType::U8 => "u8",
            ElementType::I32 => "i32",
            ElementType::I64 => "i64",
        })
    }
}

/// A host-side tensor: what a guest builds with `tensor.new` and what compute returns.
/// Data is little-endian, row-major, exactly `product(dims) * ty.size()` bytes once checked.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<u32>,
    pub ty: ElementType,
    pub data: Vec<u8>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dims", &self.dims)
            .field("ty", &self.ty)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// `wasi:nn` error codes (`error-code` in the WIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    InvalidArgument,
    InvalidEncoding,
    Timeout,
    RuntimeError,
    UnsupportedOperation,
    TooLarge,
    NotFound,
    Security,
    Unknown,
}

/// A `wasi:nn` failure: the code a guest matches on and a message that says the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

impl NnError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        NnError {
            code,
            message: message.into(),
        }
    }
    /// The guest passed something the model cannot take.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    /// The backend failed; `{:#}` keeps the cause chain without a backtrace.
    pub fn runtime(context: &str, e: impl fmt::Display) -> Self {
        Self::new(ErrorCode::RuntimeError, format!("{context}: {e:#}"))
    }
}
