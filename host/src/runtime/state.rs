//! `HostState`: the data of one request's `Store` — WASI, wasi-http, wasi-nn and
//! wasi-config contexts, the resource table they share, and the store limits. Built fresh
//! for every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::outbound::{Outbound, OutboundHooks};

use super::guest_log::GuestLog;
use super::logs::RequestLog;
use crate::common::Limits;
use crate::nn::{NnCtx, host::NnView};

/// Table entries (resources) one instance may hold: bounds handle leaks.
pub const MAX_RESOURCES: usize = 10_000;
/// Largest table a guest may grow, in elements.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Largest `wasi:random` request, in bytes (bounds a random-bytes bomb).
pub const MAX_RANDOM_BYTES: u64 = 1 << 20;
/// Largest header map a guest may build, in bytes of in-memory representation.
pub const MAX_FIELDS_BYTES: usize = 64 * 1024;

/// Per-request store data.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundHooks,
    nn: NnCtx,
    /// The version's variables as this request resolved them (`wasi:config/store`).
    config: WasiConfigVariables,
    pub(crate) limits: MeteredLimits,
}

/// What a guest used, read by metering once the request is over.
#[derive(Debug, Default)]
pub struct GuestUsage {
    /// Nanoseconds the guest was running on a thread (its code and its synchronous host
    /// calls; never time spent waiting).
    cpu_ns: AtomicU64,
    /// Largest total linear memory the instance had, in bytes.
    memory_peak: AtomicU64,
}

impl GuestUsage {
    /// CPU time spent running the guest so far.
    pub fn cpu(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
    }

    pub(super) fn add_cpu(&self, ns: u64) {
        self.cpu_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Peak linear memory so far, in bytes.
    pub fn memory_peak(&self) -> u64 {
        self.memory_peak.load(Ordering::Relaxed)
    }
}

/// The store's limits, recording the instance's peak memory as it grows.
pub struct MeteredLimits {
    inner: StoreLimits,
    /// Bytes of all linear memories now.
    memory: usize,
    usage: Arc<GuestUsage>,
}

impl ResourceLimiter for MeteredLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.inner.memory_growing(current, desired, maximum)?;
        if ok {
            self.memory = self.memory.saturating_sub(current).saturating_add(desired);
            self.usage
                .memory_peak
                .fetch_max(self.memory as u64, Ordering::Relaxed);
        }
        Ok(ok)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

impl HostState {
    /// A sandbox with no filesystem, no sockets, and outbound HTTP only where `outbound`
    /// allows it. `nn` gives the guest its version's models; `vars` its variables, through
    /// `wasi:config/store` and as environment variables (`api_key` as `API_KEY`), the only
    /// environment it sees; `usage` receives what it used; `log` keeps what it prints for
    /// the function's authors.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        function: &Arc<str>,
        limits: &Limits,
        nn: NnCtx,
        usage: Arc<GuestUsage>,
        outbound: Outbound,
        log: Option<RequestLog>,
        vars: &[(String, String)],
    ) -> Self {
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestLog::new(function.clone(), "stdout", log.clone()))
            .stderr(GuestLog::new(function.clone(), "stderr", log))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES);
        for (key, value) in vars {
            wasi.env(crate::deploy::variables::env_name(key), value);
        }
        let wasi = wasi.build();
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_FIELDS_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        HostState {
            wasi,
            http,
            table,
            hooks: OutboundHooks(outbound),
            nn,
            config: WasiConfigVariables::from_iter(vars.iter().cloned()),
            limits: MeteredLimits {
                inner: StoreLimitsBuilder::new()
                    .memory_size((limits.memory_mb as usize) << 20)
                    .table_elements(MAX_TABLE_ELEMENTS)
                    .trap_on_grow_failure(true)
                    .build(),
                memory: 0,
                usage,
            },
        }
    }
}

/// The `wasi:config` view of a request's state (the linker's accessor).
pub(super) fn config_view(s: &mut HostState) -> WasiConfig<'_> {
    WasiConfig::from(&s.config)
}

/// The `wasi:nn` view of a request's state (the linker's accessor).
pub(super) fn nn_view(s: &mut HostState) -> NnView<'_> {
    NnView {
        ctx: &mut s.nn,
        table: &mut s.table,
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}
