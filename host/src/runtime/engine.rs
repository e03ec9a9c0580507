//! [`Runtime`]: the one wasmtime `Engine` (pooling allocator, copy-on-write memory images,
//! epoch interruption), the linker every component is checked against, and the epoch
//! ticker thread that turns a function's `timeout_ms` into a trap inside guest code.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::loaded::LoadedCache;
use super::state::HostState;
use crate::common::{BlobSource, Digest};
use crate::config::RuntimeConfig;
use crate::nn::ModelManager;

/// Period of the epoch ticker; timeouts are enforced with this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Wasm stack a guest may use before it traps with a stack overflow.
pub const MAX_WASM_STACK: usize = 1 << 20;
/// Host stack each async guest call runs on (must exceed [`MAX_WASM_STACK`]).
pub const ASYNC_STACK: usize = 2 << 20;

/// The engine and everything shared by all versions and requests.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Linker<HostState>,
    pub(super) config: RuntimeConfig,
    pub(super) compiled_dir: PathBuf,
    pub(super) fingerprint: String,
    pub(super) compile_permits: tokio::sync::Semaphore,
    pub(super) loaded: LoadedCache,
    pub(super) models: Arc<ModelManager>,
    /// Component bytes, and compiled artifacts shared with other nodes.
    pub(super) blobs: Arc<dyn BlobSource>,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine and linker and starts the epoch ticker. Called once at startup.
    /// Guests reach `models` through `wasi:nn`; components and shared compiled artifacts
    /// come from `blobs`.
    pub fn new(
        config: RuntimeConfig,
        data_dir: &Path,
        models: Arc<ModelManager>,
        blobs: Arc<dyn BlobSource>,
    ) -> anyhow::Result<Runtime> {
        let engine = Engine::new(&engine_config(&config))
            .map_err(anyhow::Error::from)
            .context("creating wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        // The full WASI 0.2 CLI world links, so that ordinary Rust `std` guests (which import
        // `wasi:cli/environment` and `wasi:cli/exit`) run unchanged; the context built for each
        // request grants no filesystem, environment or sockets.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking wasi:http")?;
        crate::nn::host::add_to_linker(&mut linker, super::state::nn_view)
            .map_err(anyhow::Error::from)
            .context("linking wasi:nn")?;
        wasmtime_wasi_config::add_to_linker(&mut linker, super::state::config_view)
            .map_err(anyhow::Error::from)
            .context("linking wasi:config")?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let fingerprint = format!("{:016x}", hasher.finish());
        let compiled_dir = data_dir.join("compiled");
        std::fs::create_dir_all(&compiled_dir)
            .with_context(|| format!("creating {}", compiled_dir.display()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone())?;

        Ok(Runtime {
            engine,
            linker,
            compile_permits: tokio::sync::Semaphore::new(config.compile_concurrency),
            loaded: LoadedCache::new(config.loaded_versions),
            models,
            blobs,
            config,
            compiled_dir,
            fingerprint,
            ticker_stop,
        })
    }

    /// The engine (for tools and benches that compile or inspect components).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The model cache guests' `wasi:nn` calls use.
    pub fn models(&self) -> &Arc<ModelManager> {
        &self.models
    }

    /// Name of the compiled artifact of a component for this engine: the same on every
    /// node with the same engine, so nodes share it.
    pub(super) fn artifact_name(&self, digest: &Digest) -> String {
        format!("{}-{}.cwasm", digest.hex(), self.fingerprint)
    }

    /// Local path of the compiled artifact of a component for this engine.
    pub(super) fn artifact_path(&self, digest: &Digest) -> PathBuf {
        self.compiled_dir.join(self.artifact_name(digest))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(rt: &RuntimeConfig) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    let n = rt.max_instances;
    // A Rust wasip2 component holds a handful of core instances (the program, the WASI
    // adapter and shims), each with at most one memory and a table or two.
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(8))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .total_stacks(n)
        .max_memory_size((rt.max_memory_mb as usize) << 20)
        .table_elements(super::state::MAX_TABLE_ELEMENTS)
        .table_keep_resident(64 * 1024);
    let in_place = reset_in_place();
    pool.linear_memory_keep_resident(keep_resident(rt, in_place))
        .pagemap_scan(match in_place {
            true => wasmtime::Enabled::Yes,
            false => wasmtime::Enabled::No,
        });

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// Bytes of each memory slot kept resident when slots are reset in place: a Rust guest's
/// 1 MiB shadow stack and its heap; 16 MiB measured no better (BENCHMARKS.md). Up to this
/// much stays resident per memory slot ever used (`2 * max_instances` slots).
const IN_PLACE_KEEP_RESIDENT: usize = 2 << 20;

/// Whether slots can be reset in place here: the pages the last instance touched are found
/// with `PAGEMAP_SCAN` (Linux 6.7+) and copied back from the image, instead of `madvise` and
/// a page fault per page on the next request. Only without swap: the scan sees written
/// pages only while they are present, so one swapped out during a request would survive
/// into the next instance in the slot (wasmtime issue #14357). Unknown swap counts as swap.
fn reset_in_place() -> bool {
    let no_swap = std::fs::read_to_string("/proc/swaps")
        .is_ok_and(|swaps| swaps.lines().skip(1).all(|l| l.trim().is_empty()));
    no_swap && PoolingAllocationConfig::is_pagemap_scan_available()
}

/// Bytes of each memory slot kept resident: the configured value, else
/// [`IN_PLACE_KEEP_RESIDENT`] (within the memory ceiling) where slots are reset in place.
fn keep_resident(rt: &RuntimeConfig, in_place: bool) -> usize {
    match (rt.memory_keep_resident_bytes, in_place) {
        (Some(bytes), _) => bytes as usize,
        (None, true) => IN_PLACE_KEEP_RESIDENT.min((rt.max_memory_mb as usize) << 20),
        // Without the scan, keeping memory resident means a memset of the whole prefix
        // on every reset, which cost more than the page faults it saved (BENCHMARKS.md).
        (None, false) => 0,
    }
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("kiln-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .context("starting the epoch ticker thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_kept_resident_only_where_slots_reset_in_place_unless_configured() {
        let mut rt = RuntimeConfig::default();
        assert_eq!(keep_resident(&rt, true), 2 << 20);
        assert_eq!(keep_resident(&rt, false), 0);
        rt.max_memory_mb = 1;
        assert_eq!(keep_resident(&rt, true), 1 << 20);
        rt.memory_keep_resident_bytes = Some(64 << 10);
        assert_eq!(keep_resident(&rt, true), 64 << 10);
        assert_eq!(keep_resident(&rt, false), 64 << 10);
    }
}
