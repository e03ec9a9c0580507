//! Native inference latency through Kiln's own backends, without wasm or HTTP: the baseline
//! that `benches/nn_load.py` compares wasi-nn and HTTP against.
//!
//! `nn-native MODEL.onnx BACKEND INPUT DIMS ITERS` loads the model with `tract` or
//! `onnxruntime` (library from `ORT_DYLIB_PATH`, one session, one thread), runs it once to
//! warm up, then ITERS times on an all-zero f32 input of DIMS (comma-separated), and prints
//! `{"backend": ..., "mean_us": ...}`.

use std::time::Instant;

use anyhow::{Context, bail};
use kiln_host::config::{DefaultBackend, NnConfig};
use kiln_host::nn::backend::Cancel;
use kiln_host::nn::{BackendKind, Device, ElementType, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, backend, input, dims, iters] = args.as_slice() else {
        bail!("usage: nn-native MODEL.onnx tract|onnxruntime INPUT DIMS ITERS");
    };
    let kind = match backend.as_str() {
        "tract" => BackendKind::Tract,
        "onnxruntime" => BackendKind::Onnxruntime,
        other => bail!("unknown backend {other}"),
    };
    let dims: Vec<u32> = dims.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let iters: u32 = iters.parse()?;
    // The model is loaded straight from MODEL below; the blob store is only the manager's.
    let blobs = kiln_host::store::BlobStore::open(
        &std::env::temp_dir().join("kiln-nn-native"),
        &kiln_host::store::BlobsUrl::Folder,
        0,
    )?;
    let manager = kiln_host::nn::open(
        &NnConfig {
            onnxruntime_library: std::env::var_os("ORT_DYLIB_PATH").map(Into::into),
            onnxruntime_sessions: 1,
            default_backend: DefaultBackend::Tract,
            ..NnConfig::default()
        },
        Default::default(),
        std::sync::Arc::new(blobs),
    )?;
    let bytes = std::fs::read(model).with_context(|| format!("reading {model}"))?;
    let graph = manager
        .backend(kind)?
        .load(&bytes, Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let n: usize = dims.iter().map(|d| *d as usize).product();
    let tensor = Tensor {
        dims: dims.clone(),
        ty: ElementType::F32,
        data: vec![0; n * 4],
    };
    let inputs = || {
        kiln_host::nn::backend::check_inputs(graph.inputs(), vec![(input.clone(), tensor.clone())])
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let cancel = Cancel::default();
    graph
        .run(inputs()?, &cancel)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut total = std::time::Duration::ZERO;
    for _ in 0..iters {
        let inputs = inputs()?;
        let started = Instant::now();
        let out = graph
            .run(inputs, &cancel)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        total += started.elapsed();
        std::hint::black_box(out);
    }
    println!(
        "{{\"backend\":\"{backend}\",\"mean_us\":{:.2}}}",
        total.as_secs_f64() * 1e6 / f64::from(iters)
    );
    Ok(())
}
