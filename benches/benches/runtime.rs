//! In-process costs of the runtime, without HTTP: one whole fresh-instance request, and the
//! cold start of an evicted version (map the `.cwasm`, link, pre-instantiate).
//!
//! Needs the example components: `(cd examples && cargo build --release --target wasm32-wasip2)`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use kiln_host::common::{Digest, Limits};
use kiln_host::config::{NnConfig, RuntimeConfig};
use kiln_host::runtime::{Runtime, Timings};
use kiln_host::store::{BlobStore, BlobsUrl};

fn hello_wasm() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/target/wasm32-wasip2/release/hello.wasm");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the examples first (scripts/test does)",
            path.display()
        )
    })
}

fn runtime_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let blobs = Arc::new(BlobStore::open(&dir, &BlobsUrl::Folder, 0).unwrap());
    let models =
        kiln_host::nn::open(&NnConfig::default(), Default::default(), blobs.clone()).unwrap();
    let runtime =
        Arc::new(Runtime::new(RuntimeConfig::default(), &dir, models, blobs.clone()).unwrap());
    let bytes = hello_wasm();
    let digest: Digest = rt.block_on(blobs.put(&bytes)).unwrap();
    let limits = Limits::default();
    let loaded = rt
        .block_on(runtime.compile("hello", bytes, digest, limits))
        .unwrap();

    c.bench_function("request/hello (fresh instance, in-process)", |b| {
        b.to_async(&rt).iter(|| {
            let runtime = runtime.clone();
            let loaded = loaded.clone();
            async move {
                let req = http::Request::builder()
                    .uri("/")
                    .header("host", "bench")
                    .body(
                        Empty::new()
                            .map_err(|never| -> wasmtime_wasi_http::Error { match never {} }),
                    )
                    .unwrap();
                let mut timings = Timings::default();
                let resp = runtime
                    .invoke(
                        loaded,
                        Arc::default(),
                        &kiln_host::runtime::Outbound::deny_all(),
                        &[],
                        req,
                        &mut timings,
                    )
                    .await
                    .unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"hello\n");
            }
        })
    });

    let mut id = 1_000_000;
    c.bench_function(
        "cold_start/hello (evicted version: map .cwasm + link)",
        |b| {
            b.to_async(&rt).iter(|| {
                id += 1;
                let runtime = runtime.clone();
                let this = id;
                async move {
                    let (_, cold) = runtime.load(this, "hello", &digest, limits).await.unwrap();
                    assert!(cold.is_some());
                    runtime.unload(this);
                }
            })
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = runtime_benches
}
criterion_main!(benches);
