//! Server configuration: defaults, an optional TOML file, `KILN_*` environment variables and
//! command-line flags, merged in that order (later wins) into one [`ServerConfig`].
//!
//! The file uses human units (`"16MiB"`, `"30s"` are not needed: every field says its unit in
//! its name) and rejects unknown keys, naming them with their line. [`ServerConfig::validate`]
//! is the one place that checks the values; each subsystem then reads only its own part.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::common::Limits;
use crate::meter::{Durability, Pricing};
use crate::store::{BlobsUrl, DEFAULT_CACHE_MB, DatabaseUrl};

mod server;
pub use server::{ServerLimits, TlsFiles};

/// Default address the server listens on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default data directory (SQLite metadata, blobs, compiled artifacts).
pub const DEFAULT_DATA_DIR: &str = ".kiln";
/// Default cap on a request body sent to a function, in bytes (16 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 << 20;
/// Default cap on an uploaded blob or bare component, in bytes (256 MiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 256 << 20;
/// Default cap on a component that will be compiled, in bytes (64 MiB).
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 64 << 20;
/// Default number of loaded (pre-instantiated) versions kept in memory.
pub const DEFAULT_LOADED_VERSIONS: usize = 256;
/// Default number of instances alive at once across all functions.
pub const DEFAULT_MAX_INSTANCES: u32 = 1000;
/// Default ceiling on any function's `memory_mb`, in MiB.
pub const DEFAULT_MAX_MEMORY_MB: u64 = 1024;
/// Default ceiling on any function's `timeout_ms`, in milliseconds (5 minutes).
pub const DEFAULT_MAX_TIMEOUT_MS: u64 = 300_000;
/// Default number of requests that may wait for a busy function's concurrency slot.
pub const DEFAULT_QUEUE_DEPTH: u32 = 64;
/// Default time a client may take to send its request headers, in milliseconds.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Default time in-flight requests get to finish on shutdown, in milliseconds.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Default time an unused model stays loaded, in milliseconds (10 minutes).
pub const DEFAULT_MODEL_IDLE_UNLOAD_MS: u64 = 600_000;
/// Default bound on the estimated memory of all loaded models, in MiB.
pub const DEFAULT_MODEL_MEMORY_MB: u64 = 4096;
/// Default threads one ONNX Runtime inference uses (concurrency comes from the session pool).
pub const DEFAULT_ONNXRUNTIME_THREADS: usize = 1;

/// Default byte budget of the inference cache, in MiB.
pub const DEFAULT_INFERENCE_CACHE_MB: u64 = 256;
/// Default byte budget of the response cache, in MiB.
pub const DEFAULT_RESPONSE_CACHE_MB: u64 = 256;
/// Default lifetime of an inference cache entry, in milliseconds (1 hour).
pub const DEFAULT_INFERENCE_TTL_MS: u64 = 3_600_000;
/// Default commit window of the usage ledger in `batched` mode, in milliseconds.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 100;
/// Default bound on the usage records a node keeps on disk while PostgreSQL is away, in MiB.
pub const DEFAULT_SPOOL_MB: u64 = 1024;
/// Default bound on one outbound HTTP exchange of a guest.
pub const DEFAULT_OUTBOUND_TIMEOUT_MS: u64 = 10_000;
/// Default consecutive failed outbound calls that open a function's breaker for a host.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// Default time an open breaker fails calls at once before it lets a trial through.
pub const DEFAULT_BREAKER_COOLDOWN_MS: u64 = 30_000;

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory for all persistent state.
    pub data_dir: PathBuf,
    /// Largest request body a function receives, in bytes (413 beyond).
    pub max_body_bytes: u64,
    /// Largest blob or bare component upload, in bytes (413 beyond).
    pub max_upload_bytes: u64,
    /// How long a client may take to send request headers, in milliseconds.
    pub header_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests, in milliseconds.
    pub drain_timeout_ms: u64,
    /// Connection, stream and buffered-body limits (`[server]`).
    pub server: ServerLimits,
    /// The listener's TLS pair; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Runtime (engine, pool, compile) settings.
    pub runtime: RuntimeConfig,
    /// Inference (`wasi:nn`) settings.
    pub nn: NnConfig,
    /// Prediction cache budgets.
    pub cache: CacheConfig,
    /// Usage records and the ledger.
    pub metering: MeteringConfig,
    /// The price plan usage records are costed with.
    pub pricing: Pricing,
    /// API keys, bundle signatures.
    pub auth: AuthConfig,
    /// Default health gates of progressive rollouts (`[rollout]`).
    pub rollout: crate::deploy::Gates,
    /// Where durable state lives (`[store]`).
    pub store: StoreConfig,
    /// This node's id; `None`: the one kept in the data dir.
    pub node_id: Option<String>,
    /// Where alert events go (`[alerts]`).
    pub alerts: crate::monitor::alerts::AlertsConfig,
}

/// Storage settings (`[store]`, `--blobs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Where blobs live: unset for `<data>/blobs`, or
    /// `s3://bucket[/prefix]?endpoint=http://host:port&region=R`.
    #[serde(default, deserialize_with = "parse_blobs_url")]
    pub blobs: BlobsUrl,
    /// The database: `sqlite` (the data dir's files) or `postgres://...`.
    #[serde(default, deserialize_with = "parse_database_url")]
    pub database: DatabaseUrl,
    /// Bound on this node's local copies of a bucket's blobs and compiled artifacts, in MiB.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            blobs: BlobsUrl::Folder,
            database: DatabaseUrl::Sqlite,
            cache_mb: DEFAULT_CACHE_MB,
        }
    }
}

fn default_cache_mb() -> u64 {
    DEFAULT_CACHE_MB
}

fn parse_database_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DatabaseUrl, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn parse_blobs_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BlobsUrl, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

/// What `kiln serve`'s flags and `KILN_*` variables set; each overrides the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `--blobs` / `KILN_BLOBS_URL`.
    pub blobs: Option<String>,
    /// `--database` / `KILN_DATABASE_URL`.
    pub database: Option<String>,
    /// `--node-id` / `KILN_NODE_ID`.
    pub node_id: Option<String>,
    /// `--tls-cert` / `KILN_TLS_CERT`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` / `KILN_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
}

/// Authentication settings (`[auth]`, plus the bootstrap from flags and the environment).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Rate limit of keys created without `--rate` (unset: none).
    #[serde(default)]
    pub default_key_rate: Option<crate::common::Rate>,
    /// Publisher keys trusted for every tenant: once any applies to a tenant, its deploys
    /// must be signed by one of them.
    #[serde(default)]
    pub trusted_publishers: Vec<crate::auth::signing::PublicKey>,
    /// Publisher keys trusted for one tenant each (`[auth.tenant_publishers]`).
    #[serde(default)]
    pub tenant_publishers: std::collections::HashMap<String, Vec<crate::auth::signing::PublicKey>>,
    /// `KILN_ADMIN_KEY` (never from the file).
    #[serde(skip)]
    pub admin_key: Option<String>,
    /// `--insecure`: with no keys at all, serve without authentication.
    #[serde(skip)]
    pub insecure: bool,
}

/// Budgets of the prediction caches (`[cache]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Byte budget of the inference cache, in MiB (0: off server-wide).
    pub inference_memory_mb: u64,
    /// Byte budget of the response cache, in MiB (0: off server-wide).
    pub responses_memory_mb: u64,
    /// How long an inference result is kept, in milliseconds.
    pub inference_ttl_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            inference_memory_mb: DEFAULT_INFERENCE_CACHE_MB,
            responses_memory_mb: DEFAULT_RESPONSE_CACHE_MB,
            inference_ttl_ms: DEFAULT_INFERENCE_TTL_MS,
        }
    }
}

/// Usage metering (`[metering]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Write a usage record per request (off only to measure its cost).
    pub enabled: bool,
    pub durability: Durability,
    /// `batched`: records are committed at most this often, in milliseconds.
    pub commit_interval_ms: u64,
    /// On PostgreSQL: how much usage may wait on local disk while the database is away,
    /// in MiB.
    pub spool_mb: u64,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            enabled: true,
            durability: Durability::Batched,
            commit_interval_ms: DEFAULT_COMMIT_INTERVAL_MS,
            spool_mb: DEFAULT_SPOOL_MB,
        }
    }
}

/// Which backend runs a model whose manifest names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DefaultBackend {
    /// ONNX Runtime when its library is available, else tract.
    #[default]
    Auto,
    Tract,
    Onnxruntime,
}

/// Settings of the inference backends and the model cache.
#[derive(Debug, Clone)]
pub struct NnConfig {
    /// `libonnxruntime.so` to load; `None`: the onnxruntime backend is off.
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime sessions per loaded model (concurrent inferences on it).
    pub onnxruntime_sessions: usize,
    /// Threads each ONNX Runtime inference uses.
    pub onnxruntime_threads: usize,
    pub default_backend: DefaultBackend,
    /// An unused model is unloaded after this long, in milliseconds.
    pub model_idle_unload_ms: u64,
    /// Bound on the estimated memory of all loaded models, in MiB.
    pub model_memory_mb: u64,
}

impl Default for NnConfig {
    /// tract only, default cache settings (what a server without `[nn]` and without
    /// `ORT_DYLIB_PATH` gets).
    fn default() -> Self {
        NnConfig {
            onnxruntime_library: None,
            onnxruntime_sessions: 1,
            onnxruntime_threads: DEFAULT_ONNXRUNTIME_THREADS,
            default_backend: DefaultBackend::Auto,
            model_idle_unload_ms: DEFAULT_MODEL_IDLE_UNLOAD_MS,
            model_memory_mb: DEFAULT_MODEL_MEMORY_MB,
        }
    }
}

/// The `[nn]` table of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NnFile {
    pub onnxruntime_library: Option<PathBuf>,
    pub onnxruntime_sessions: Option<usize>,
    pub onnxruntime_threads: Option<usize>,
    pub default_backend: Option<DefaultBackend>,
    pub model_idle_unload_ms: Option<u64>,
    pub model_memory_mb: Option<u64>,
}

/// Settings of the wasmtime runtime: the engine, the instance pool and compilation.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Loaded versions kept pre-instantiated in memory (LRU beyond).
    pub loaded_versions: usize,
    /// Versions that traffic policies need (their targets and each one's previous
    /// targets), kept loaded beyond the LRU, at most.
    pub kept_versions: usize,
    /// Instances alive at once across all functions (pool size).
    pub max_instances: u32,
    /// Ceiling on a function's `memory_mb` and size of a pool memory slot, in MiB.
    pub max_memory_mb: u64,
    /// Ceiling on a function's `timeout_ms`.
    pub max_timeout_ms: u64,
    /// Largest component accepted for compilation, in bytes.
    pub max_component_bytes: u64,
    /// Compilations allowed at once (the rest wait; the API stays responsive).
    pub compile_concurrency: usize,
    /// Requests that may queue for a busy function before it answers 503.
    pub queue_depth: u32,
    /// Bytes of each memory slot kept resident on reuse rather than decommitted; `None`:
    /// the runtime decides, from whether a slot can be reset in place on this host
    /// (`runtime::engine`).
    pub memory_keep_resident_bytes: Option<u64>,
    /// Limits a version gets when its manifest names none.
    pub default_limits: Limits,
    /// Longest a guest's outbound HTTP exchange may take (connect to last byte), in
    /// milliseconds; never longer than the request's own timeout.
    pub outbound_timeout_ms: u64,
    /// Let guests reach loopback, private and link-local addresses their manifest allows
    /// (off: only public addresses, whatever a manifest says).
    pub allow_private_outbound: bool,
    /// Consecutive failed outbound calls (no connection, timeout, 5xx) of a function to
    /// one destination that open its circuit breaker; 0 turns breakers off.
    pub breaker_failures: u32,
    /// How long an open breaker fails calls at once before it lets one trial through, in
    /// milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Measure the CPU time each guest uses (thread CPU clock around its polls); on with
    /// metering.
    pub meter_guest_time: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            loaded_versions: DEFAULT_LOADED_VERSIONS,
            kept_versions: DEFAULT_LOADED_VERSIONS,
            max_instances: DEFAULT_MAX_INSTANCES,
            max_memory_mb: DEFAULT_MAX_MEMORY_MB,
            max_timeout_ms: DEFAULT_MAX_TIMEOUT_MS,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            compile_concurrency: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            queue_depth: DEFAULT_QUEUE_DEPTH,
            memory_keep_resident_bytes: None,
            default_limits: Limits::default(),
            outbound_timeout_ms: DEFAULT_OUTBOUND_TIMEOUT_MS,
            allow_private_outbound: false,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown_ms: DEFAULT_BREAKER_COOLDOWN_MS,
            meter_guest_time: true,
        }
    }
}

impl AuthConfig {
    /// The publisher keys trusted for `tenant`'s bundles.
    pub fn trust(&self, tenant: &str) -> crate::auth::signing::Trust<'_> {
        crate::auth::signing::Trust {
            global: &self.trusted_publishers,
            tenant: self
                .tenant_publishers
                .get(tenant)
                .map_or(&[][..], Vec::as_slice),
            tenant_name: tenant.to_string(),
        }
    }
}

/// The raw configuration file (`--config FILE`): every field optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub max_body_bytes: Option<u64>,
    pub max_upload_bytes: Option<u64>,
    pub header_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    #[serde(default)]
    pub server: ServerLimits,
    #[serde(default)]
    pub runtime: RuntimeFile,
    #[serde(default)]
    pub nn: NnFile,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub metering: MeteringConfig,
    #[serde(default)]
    pub pricing: Pricing,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub rollout: crate::deploy::Gates,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub alerts: crate::monitor::alerts::AlertsConfig,
}

/// The `[runtime]` table of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    pub loaded_versions: Option<usize>,
    pub kept_versions: Option<usize>,
    pub max_instances: Option<u32>,
    pub max_memory_mb: Option<u64>,
    pub max_timeout_ms: Option<u64>,
    pub max_component_bytes: Option<u64>,
    pub compile_concurrency: Option<usize>,
    pub queue_depth: Option<u32>,
    pub outbound_timeout_ms: Option<u64>,
    pub allow_private_outbound: Option<bool>,
    pub breaker_failures: Option<u32>,
    pub breaker_cooldown_ms: Option<u64>,
    pub memory_keep_resident_bytes: Option<u64>,
    pub default_timeout_ms: Option<u64>,
    pub default_memory_mb: Option<u64>,
    pub default_max_concurrency: Option<u32>,
}

impl ConfigFile {
    /// Reads and parses a configuration file; errors name the file, the line and the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in config file {}", path.display()))
    }
}

impl ServerConfig {
    /// Merges the file (if any) with the already-resolved flag/env values and validates.
    /// `onnxruntime_library` comes from `ORT_DYLIB_PATH` when the file names none.
    pub fn resolve(file: ConfigFile, flags: Overrides) -> anyhow::Result<Self> {
        let Overrides {
            listen,
            data_dir,
            blobs,
            database,
            node_id,
            tls_cert,
            tls_key,
        } = flags;
        let tls = file.server.tls(tls_cert, tls_key)?;
        let mut store = file.store;
        if let Some(url) = blobs.filter(|b| !b.is_empty()) {
            store.blobs = url
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--blobs: {e}"))?;
        }
        if let Some(url) = database.filter(|d| !d.is_empty()) {
            store.database = url
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--database: {e}"))?;
        }
        let n = file.nn;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let nn = NnConfig {
            onnxruntime_library: n.onnxruntime_library.or_else(|| {
                std::env::var_os("ORT_DYLIB_PATH")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            }),
            onnxruntime_sessions: n.onnxruntime_sessions.unwrap_or(cores),
            onnxruntime_threads: n.onnxruntime_threads.unwrap_or(DEFAULT_ONNXRUNTIME_THREADS),
            default_backend: n.default_backend.unwrap_or_default(),
            model_idle_unload_ms: n
                .model_idle_unload_ms
                .unwrap_or(DEFAULT_MODEL_IDLE_UNLOAD_MS),
            model_memory_mb: n.model_memory_mb.unwrap_or(DEFAULT_MODEL_MEMORY_MB),
        };
        let listen = listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("invalid listen address {listen:?} (want IP:PORT)"))?;
        let r = file.runtime;
        let base = RuntimeConfig::default();
        let default_limits = Limits {
            timeout_ms: r
                .default_timeout_ms
                .unwrap_or(base.default_limits.timeout_ms),
            memory_mb: r.default_memory_mb.unwrap_or(base.default_limits.memory_mb),
            max_concurrency: r
                .default_max_concurrency
                .unwrap_or(base.default_limits.max_concurrency),
            rate: None,
        };
        let config = ServerConfig {
            listen,
            data_dir: data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max_body_bytes: file.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            max_upload_bytes: file.max_upload_bytes.unwrap_or(DEFAULT_MAX_UPLOAD_BYTES),
            header_timeout_ms: file.header_timeout_ms.unwrap_or(DEFAULT_HEADER_TIMEOUT_MS),
            drain_timeout_ms: file.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS),
            server: file.server,
            tls,
            runtime: RuntimeConfig {
                loaded_versions: r.loaded_versions.unwrap_or(base.loaded_versions),
                kept_versions: r.kept_versions.unwrap_or(base.kept_versions),
                max_instances: r.max_instances.unwrap_or(base.max_instances),
                max_memory_mb: r.max_memory_mb.unwrap_or(base.max_memory_mb),
                max_timeout_ms: r.max_timeout_ms.unwrap_or(base.max_timeout_ms),
                max_component_bytes: r.max_component_bytes.unwrap_or(base.max_component_bytes),
                compile_concurrency: r.compile_concurrency.unwrap_or(base.compile_concurrency),
                queue_depth: r.queue_depth.unwrap_or(base.queue_depth),
                memory_keep_resident_bytes: r
                    .memory_keep_resident_bytes
                    .or(base.memory_keep_resident_bytes),
                default_limits,
                outbound_timeout_ms: r.outbound_timeout_ms.unwrap_or(base.outbound_timeout_ms),
                allow_private_outbound: r
                    .allow_private_outbound
                    .unwrap_or(base.allow_private_outbound),
                breaker_failures: r.breaker_failures.unwrap_or(base.breaker_failures),
                breaker_cooldown_ms: r.breaker_cooldown_ms.unwrap_or(base.breaker_cooldown_ms),
                meter_guest_time: file.metering.enabled,
            },
            nn,
            cache: file.cache,
            metering: file.metering,
            pricing: file.pricing,
            auth: file.auth,
            rollout: file.rollout,
            store,
            node_id,
            alerts: file.alerts,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every value once, so that subsystems can trust their part.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.alerts.validate().map_err(anyhow::Error::msg)?;
        let r = &self.runtime;
        if r.loaded_versions == 0 {
            bail!("runtime.loaded_versions must be at least 1");
        }
        if r.max_instances == 0 {
            bail!("runtime.max_instances must be at least 1");
        }
        if r.max_memory_mb == 0 || r.max_memory_mb > 4096 {
            bail!("runtime.max_memory_mb must be between 1 and 4096");
        }
        if r.outbound_timeout_ms == 0 {
            bail!("runtime.outbound_timeout_ms must be at least 1");
        }
        if r.breaker_failures > 0 && r.breaker_cooldown_ms == 0 {
            bail!("runtime.breaker_cooldown_ms must be at least 1 while breakers are on");
        }
        if r.compile_concurrency == 0 {
            bail!("runtime.compile_concurrency must be at least 1");
        }
        if self.max_body_bytes == 0 || self.max_upload_bytes == 0 {
            bail!("max_body_bytes and max_upload_bytes must be at least 1");
        }
        self.server.validate(self.max_body_bytes)?;
        if r.memory_keep_resident_bytes
            .is_some_and(|k| k > r.max_memory_mb << 20)
        {
            bail!("runtime.memory_keep_resident_bytes exceeds runtime.max_memory_mb");
        }
        let n = &self.nn;
        if n.onnxruntime_sessions == 0 || n.onnxruntime_threads == 0 {
            bail!("nn.onnxruntime_sessions and nn.onnxruntime_threads must be at least 1");
        }
        if n.model_idle_unload_ms == 0 || n.model_memory_mb == 0 {
            bail!("nn.model_idle_unload_ms and nn.model_memory_mb must be at least 1");
        }
        if self.metering.commit_interval_ms > 60_000 {
            bail!("metering.commit_interval_ms must be at most 60000");
        }
        if self.cache.inference_ttl_ms == 0 {
            bail!("cache.inference_ttl_ms must be at least 1");
        }
        self.pricing.validate().map_err(anyhow::Error::msg)?;
        self.rollout
            .validate()
            .map_err(|e| anyhow::anyhow!("rollout: {e}"))?;
        r.default_limits
            .check(r)
            .context("in the runtime.default_* limits")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_unknown_key_is_rejected_with_line() {
        let err = toml::from_str::<ConfigFile>("listen = \"127.0.0.1:1\"\n[runtime]\nbogus = 1\n")
            .map(|_| ())
            .expect_err("unknown key must fail");
        let msg = err.to_string();
        assert!(msg.contains("bogus"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn config_flags_override_file() {
        let file: ConfigFile = toml::from_str("listen = \"127.0.0.1:1\"\n").expect("parse");
        let c = ServerConfig::resolve(
            file,
            Overrides {
                listen: Some("127.0.0.1:2".into()),
                ..Overrides::default()
            },
        )
        .expect("valid");
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn config_bad_listen_is_rejected() {
        let err = ServerConfig::resolve(
            ConfigFile::default(),
            Overrides {
                listen: Some("nope".into()),
                ..Overrides::default()
            },
        )
        .expect_err("must fail");
        assert!(format!("{err:#}").contains("nope"));
    }

    #[test]
    fn keep_resident_is_unset_by_default_and_an_explicit_one_must_fit_the_memory_ceiling() {
        let resolve = |toml: &str| {
            let file: ConfigFile = toml::from_str(toml).expect("parse");
            ServerConfig::resolve(file, Overrides::default())
        };
        let small =
            resolve("[runtime]\nmax_memory_mb = 1\ndefault_memory_mb = 1\n").expect("valid");
        assert_eq!(small.runtime.memory_keep_resident_bytes, None);
        let err = resolve(
            "[runtime]\nmax_memory_mb = 1\ndefault_memory_mb = 1\nmemory_keep_resident_bytes = 2097152\n",
        )
            .expect_err("larger than the ceiling");
        assert!(format!("{err:#}").contains("memory_keep_resident_bytes"));
        let fits = resolve("[runtime]\nmemory_keep_resident_bytes = 0\n").expect("valid");
        assert_eq!(fits.runtime.memory_keep_resident_bytes, Some(0));
    }
}
