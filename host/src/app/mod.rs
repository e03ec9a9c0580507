//! [`App`]: the composition root that owns the stores, the runtime (with its model cache),
//! the registry, the prediction caches and the usage ledger, and the few operations that
//! touch several of them (deploy a version, delete a function, clear its caches; traffic
//! changes and rollouts are in [`traffic`]).

mod budgets;
mod cluster;
mod drift;
mod monitor;
mod ready;
mod rollout;
mod sync;
mod traffic;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::auth::{AuditLog, Auth, Bootstrap, KeyStore};
use crate::cache::inference::{InferenceCache, InferenceScope};
use crate::cache::responses::ResponseCache;
use crate::cache::{CacheSpec, Placement};
use crate::common::{Digest, Limits};
use crate::config::ServerConfig;
use crate::deploy::{Registry, VersionEntry};
use crate::meter::{Ledger, LedgerStore, Metrics};
use crate::nn::embed::{self, EmbedError};
use crate::nn::{ModelRef, NnError, NnSpec, VersionModels};
use crate::runtime::{CompileError, Outbound, Runtime};
use crate::store::{
    BlobError, BlobStore, DatabaseUrl, FunctionInfo, MetaStore, NewVersion, PgMeta, SqliteMeta,
    VersionRecord,
};
pub use cluster::{HEARTBEAT_EVERY, LEASE, LIVE_WITHIN};
pub use drift::{MergedWindow, ReferenceError};
pub use ready::node_id;
pub use rollout::Control;
pub use traffic::{Actor, TrafficError};

/// Everything a running server shares between requests.
pub struct App {
    pub config: ServerConfig,
    /// This node's id (`--node-id`, or made once and kept in the data dir).
    pub node_id: String,
    /// When this process started, unix ms.
    pub started_at_ms: i64,
    /// This process among every node's processes past and present (`node#start`): whose
    /// published rollout numbers are whose.
    process: String,
    pub meta: MetaStore,
    /// Components and models (the local folder, or the cluster's bucket).
    pub blobs: Arc<BlobStore>,
    pub runtime: Runtime,
    pub registry: Registry,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: Arc<Metrics>,
    /// Whole responses of functions that opt in.
    pub responses: Arc<ResponseCache>,
    /// `wasi:nn` compute results.
    pub inference: Arc<InferenceCache>,
    /// Usage records; `None` when metering is off.
    pub ledger: Option<Ledger>,
    /// API keys and the audit log.
    pub auth: Auth,
    /// Held while a version is published (database, then registry) or a function deleted,
    /// so the registry never brings back a function deleted in between.
    publishing: tokio::sync::Mutex<()>,
    /// Held while the monitors' buckets are published (see `drift::publish_monitors`).
    monitor_publishing: tokio::sync::Mutex<()>,
    /// Rollouts running or paused, by function (stored in the database too).
    rollouts: rollout::ActiveRollouts,
    /// The rollouts this node drives.
    leases: cluster::Leases,
    /// Set when the node shuts down: it takes no more rollout leases.
    stopping: std::sync::atomic::AtomicBool,
    /// The nodes alive at the last heartbeat (rate limits are split between them).
    live_nodes: crate::auth::Nodes,
    /// The last probe of a shared blob store.
    blob_health: ready::BlobHealth,
    /// Request body bytes held whole in memory, over all requests (`[server] body_buffer_mb`).
    pub body_budget: crate::common::ByteBudget,
    /// What sticky keys are hashed under: the database's `sticky` secret, the same on
    /// every node (read again when other nodes' changes are applied: `kiln store copy`
    /// may replace it).
    sticky: std::sync::RwLock<crate::deploy::StickySecret>,
    /// Circuit breakers of guests' outbound calls, per (function, destination).
    pub breakers: Arc<crate::runtime::Breakers>,
    /// Wakes the model gauges' task to refresh the accuracy gauges now (feedback came).
    accuracy_stale: Arc<tokio::sync::Notify>,
    /// Alert events to the `[alerts]` webhook.
    pub alerts: crate::monitor::alerts::Alerts,
    /// Tenants whose hard budget is spent this month: their requests are refused.
    pub budgets_exhausted: crate::meter::budgets::Exhausted,
}

/// Breaker changes into `/metrics`.
struct BreakerMetrics(Arc<Metrics>);

impl crate::runtime::BreakerEvents for BreakerMetrics {
    fn changed(
        &self,
        function: &str,
        destination: &str,
        state: crate::runtime::BreakerState,
        opened: bool,
    ) {
        self.0.breaker(function, destination, state as i64, opened);
    }

    fn removed(&self, function: &str, destination: &str) {
        self.0.forget_breakers(function, &[destination.to_string()]);
    }
}

/// Who deploys a version, as far as [`App::deploy`] is concerned.
#[derive(Debug, Clone)]
pub struct Deployer {
    /// The tenant that owns a function it creates; blobs must be this tenant's.
    pub tenant: String,
    /// May deploy onto any tenant's function and name any blob.
    pub admin: bool,
    /// Make the function public (or private); `None` leaves it as it is.
    pub public: Option<bool>,
    /// The publisher key that signed the bundle.
    pub signer: Option<String>,
    /// When it was signed (unix ms): must be newer than the function's last signed deploy.
    pub signed_at: Option<i64>,
    /// `allowed_outbound_hosts` of the version (checked by the caller).
    pub outbound: Vec<String>,
    /// Cases the version must pass before it is published (`[validate]`).
    pub validate: Option<crate::monitor::validate::ValidateSpec>,
    /// Validate only: compile, load the models and run the cases, then make nothing.
    pub dry_run: bool,
}

/// What a deploy made.
#[derive(Debug)]
pub enum Deployed {
    /// The new version, published.
    Version(Box<VersionRecord>),
    /// A dry run: the version would be published, and its validation (if it has one).
    DryRun(Option<Box<crate::monitor::validate::ValidationResult>>),
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("blob {0} is not on this server; upload it first with PUT /v1/blobs/{0}")]
    MissingBlob(Digest),
    #[error(transparent)]
    Limits(#[from] crate::common::LimitError),
    #[error(transparent)]
    NotOwner(#[from] crate::store::NotOwner),
    #[error(transparent)]
    Replayed(#[from] crate::store::Replayed),
    /// A signed bundle's blob is not what its digest says.
    #[error("blob {0} does not match its digest: the stored bytes changed")]
    Tampered(Digest),
    /// A model failed to load (bad ONNX, GPU asked for on a CPU host, backend missing...).
    #[error("model {name:?}: {error}")]
    Model { name: String, error: NnError },
    /// The manifest's models are inconsistent (bad name, two different models under one name).
    #[error("{0}")]
    Models(String),
    /// The blob store failed (the bucket unreachable, a corrupt blob, disk trouble).
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The component's embedded models could not be read.
    #[error("embedded models: {0}")]
    Embedded(#[from] EmbedError),
    /// `[validate]` could not run: its cases file or settings are wrong.
    #[error("validate: {0}")]
    Validation(String),
    /// The version missed its `[validate]` cases; the result says how.
    #[error("the version failed validation: {}", .0.reasons.join("; "))]
    ValidationFailed(Box<crate::monitor::validate::ValidationResult>),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl App {
    /// Opens the data dir, builds the runtime and reloads every function from the database.
    /// Versions are loaded lazily: the first request maps the compiled artifact. Also
    /// returns the admin key made at first start, to be shown once.
    pub async fn open(config: ServerConfig) -> anyhow::Result<(Arc<App>, Option<String>)> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let (meta, keys, audit, shared_db) = match &config.store.database {
            DatabaseUrl::Sqlite => {
                let db = config.data_dir.join("kiln.db");
                (
                    MetaStore::Sqlite(SqliteMeta::open(&db)?),
                    KeyStore::sqlite(&db)?,
                    AuditLog::sqlite(&config.data_dir.join("audit.db"))?,
                    None,
                )
            }
            DatabaseUrl::Postgres(url) => {
                let pool = crate::store::pg::connect(url).await?;
                (
                    MetaStore::Postgres(PgMeta::new(pool.clone())),
                    KeyStore::Postgres(pool.clone()),
                    AuditLog::Postgres(pool.clone()),
                    Some((url.clone(), pool)),
                )
            }
        };
        let nodes = crate::auth::Nodes::default();
        let (auth, admin_secret) = Auth::open(
            keys,
            audit,
            &Bootstrap {
                admin_key: config.auth.admin_key.clone(),
                listen: config.listen,
                insecure: config.auth.insecure,
            },
            config.auth.default_key_rate,
            nodes.clone(),
        )
        .await?;
        let blobs = Arc::new(
            BlobStore::open(&config.data_dir, &config.store.blobs, config.store.cache_mb)
                .context("opening the blob store")?,
        );
        let metrics = Arc::new(Metrics::new());
        let breakers = Arc::new(crate::runtime::Breakers::new(
            config.runtime.breaker_failures,
            std::time::Duration::from_millis(config.runtime.breaker_cooldown_ms),
            Box::new(BreakerMetrics(metrics.clone())),
        ));
        let models = crate::nn::open(&config.nn, metrics.clone(), blobs.clone())?;
        if tokio::runtime::Handle::try_current().is_ok() {
            models.spawn_sweeper();
        }
        let runtime = Runtime::new(
            config.runtime.clone(),
            &config.data_dir,
            models,
            blobs.clone(),
        )?;
        let registry = Registry::new(config.runtime.queue_depth, nodes.clone());
        let responses = Arc::new(ResponseCache::new(
            config.cache.responses_memory_mb << 20,
            metrics.cache("response"),
        ));
        let inference = Arc::new(InferenceCache::new(
            config.cache.inference_memory_mb << 20,
            metrics.cache("inference"),
        ));
        let ledger = if config.metering.enabled {
            let usage_db = config.data_dir.join("usage.db");
            let store = match shared_db {
                None => LedgerStore::Sqlite(&usage_db),
                Some((ref url, ref pool)) => LedgerStore::Postgres {
                    url,
                    pool: pool.clone(),
                    spool: &config.data_dir.join("usage-spool"),
                    spool_bytes: config.metering.spool_mb << 20,
                },
            };
            Some(Ledger::open(
                store,
                config.metering.durability,
                std::time::Duration::from_millis(config.metering.commit_interval_ms),
                metrics.clone(),
            )?)
        } else {
            None
        };
        let node_id = ready::node_id(&config.data_dir, config.node_id.as_deref())?;
        let started_at_ms = crate::unix_ms();
        let body_budget = crate::common::ByteBudget::new(
            config.server.body_buffer_bytes(),
            config.server.body_buffer_tenant_bytes(),
        );
        let sticky = crate::deploy::StickySecret::new(
            meta.secret("sticky")
                .await
                .context("reading the sticky-hash secret")?,
        );
        let alerts = crate::monitor::alerts::Alerts::start(&config.alerts, &node_id);
        let app = App {
            config,
            process: format!("{node_id}#{started_at_ms}"),
            node_id,
            started_at_ms,
            meta,
            blobs,
            runtime,
            registry,
            metrics,
            breakers,
            responses,
            inference,
            ledger,
            auth,
            publishing: tokio::sync::Mutex::new(()),
            monitor_publishing: tokio::sync::Mutex::new(()),
            rollouts: Default::default(),
            leases: Default::default(),
            stopping: Default::default(),
            live_nodes: nodes,
            blob_health: Default::default(),
            body_budget,
            sticky: std::sync::RwLock::new(sticky),
            accuracy_stale: Default::default(),
            alerts,
            budgets_exhausted: Default::default(),
        };
        // The registry is built from the database as changes from other nodes are applied.
        app.apply_stored(false).await?;
        let app = Arc::new(app);
        if tokio::runtime::Handle::try_current().is_ok() {
            // The first heartbeat now: the rollouts in progress get their driver at once.
            if let Err(e) = app.heartbeat().await {
                tracing::warn!("heartbeat: {e:#}");
            }
            cluster::spawn_heartbeat(&app);
            rollout::spawn_rollout_driver(&app);
            monitor::spawn_drift_gauges(&app);
            drift::spawn_monitor_publisher(&app);
            budgets::spawn_budgets(&app);
            ready::start_blob_prober(&app).await;
            if let DatabaseUrl::Postgres(url) = &app.config.store.database {
                sync::spawn_store_sync(&app, url)?;
            }
        }
        Ok((app, admin_secret))
    }

    /// Where guests allowed `patterns` may send HTTP requests, each exchange within the
    /// server's outbound timeout and the version's own `timeout_ms`.
    fn outbound(&self, patterns: &[String], timeout_ms: u64) -> Result<Outbound, String> {
        let allow = crate::runtime::parse_patterns(patterns)?;
        Ok(Outbound::new(
            allow,
            Duration::from_millis(self.config.runtime.outbound_timeout_ms.min(timeout_ms)),
            self.config.runtime.allow_private_outbound,
        ))
    }

    /// Makes a stored version servable: its models tied to the inference cache (unless it
    /// opted out), its response cache placement and its metric series, all made once here
    /// rather than per request.
    fn register(&self, rec: VersionRecord, info: &FunctionInfo, mut models: VersionModels) {
        let owner: Arc<str> = Arc::from(rec.function.as_str());
        if rec.cache.inference && self.inference.enabled() {
            models.cache = Some(InferenceScope {
                cache: self.inference.clone(),
                at: Placement {
                    owner: owner.clone(),
                    scope: rec.id as u64,
                    ttl: std::time::Duration::from_millis(self.config.cache.inference_ttl_ms),
                    max_entries: None,
                },
            });
        }
        let responses = rec
            .cache
            .responses
            .as_ref()
            .filter(|_| self.responses.enabled())
            .map(|p| Placement {
                owner: owner.clone(),
                scope: rec.id as u64,
                ttl: p.ttl.0,
                max_entries: p
                    .max_entries
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            });
        let metrics = self.metrics.version(&rec.function, rec.version);
        // Checked at deploy; a stored entry that no longer parses allows nothing.
        let outbound = match self.outbound(&rec.outbound, rec.limits.timeout_ms) {
            Ok(o) => o.with_breakers(owner.clone(), self.breakers.clone()),
            Err(e) => {
                tracing::error!(function = %rec.function, version = rec.version, "{e}");
                Outbound::deny_all()
            }
        };
        self.registry.add(
            VersionEntry {
                admission: self.registry.admission(rec.limits.max_concurrency),
                shadow_slots: Registry::shadow_slots(rec.limits.max_concurrency),
                function: owner,
                record: rec,
                models: Arc::new(models),
                metrics,
                responses,
                outbound,
                routed: crate::meter::Window::default(),
                other: crate::meter::Window::default(),
                shadow: crate::meter::ShadowWindow::default(),
            },
            info,
        );
    }

    /// Loads `versions` of function `name` (those not loaded yet pay their cold start
    /// now, not on a request): what a promote does for both sides of the swap.
    pub async fn warm(&self, name: &str, versions: impl Iterator<Item = u32>) {
        let Some(f) = self.registry.function(name) else {
            return;
        };
        let mut seen = std::collections::BTreeSet::new();
        for v in versions.filter(|v| seen.insert(*v)) {
            let Some(entry) = f.versions.get(&v) else {
                continue;
            };
            let r = &entry.record;
            if let Err(e) = self
                .runtime
                .load(r.id, &r.function, &r.digest, r.limits)
                .await
            {
                tracing::warn!(function = name, version = v, "warming: {e}");
            }
        }
    }

    /// Drops every cached response and inference result of function `name`.
    pub fn clear_caches(&self, name: &str) -> (usize, usize) {
        (self.responses.clear(name), self.inference.clear(name))
    }

    /// Flushes what must survive the process (the usage ledger); called after the drain.
    pub fn close(&self) {
        if let Some(l) = &self.ledger {
            l.close();
        }
    }

    /// Held while the database and the registry change together (see `publishing`).
    async fn publishing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.publishing.lock().await
    }

    /// Copies the models embedded in `component` out into blobs (held by `tenant`, who
    /// has their bytes).
    async fn store_embedded(
        &self,
        component: &[u8],
        tenant: &str,
    ) -> Result<Vec<ModelRef>, DeployError> {
        let mut out = Vec::new();
        for (meta, range) in embed::extract(component)? {
            let bytes = &component[range];
            let digest = self.blobs.put(bytes).await?;
            self.meta.add_blob_owner(&digest, tenant).await?;
            out.push(ModelRef {
                name: meta.name,
                digest,
                size: bytes.len() as u64,
                encoding: meta.encoding,
                target: meta.target,
                backend: meta.backend,
                batch: meta.batch,
                monitor: None,
            });
        }
        Ok(out)
    }

    /// Whether `by` may name blob `digest` in a manifest: it is on this server and (unless
    /// `by` is an admin) its tenant uploaded it. Another tenant's blob is answered as
    /// missing, so digests cannot be probed across tenants.
    async fn check_blob(&self, digest: &Digest, by: &Deployer) -> Result<(), DeployError> {
        if !by.admin && !self.meta.owns_blob(digest, &by.tenant).await? {
            return Err(DeployError::MissingBlob(*digest));
        }
        Ok(())
    }

    /// Adds the embedded models to `nn`, then checks every model: a valid name, its blob
    /// present (and the deployer's), one digest per name.
    async fn resolve_models(
        &self,
        embedded: Vec<ModelRef>,
        mut nn: NnSpec,
        by: &Deployer,
    ) -> Result<NnSpec, DeployError> {
        for e in embedded {
            match nn.models.iter().find(|m| m.name == e.name) {
                Some(m) if m.digest == e.digest => {}
                Some(m) => {
                    return Err(DeployError::Models(format!(
                        "model {:?} is embedded in the component as {} and also named in the manifest as {}",
                        e.name, e.digest, m.digest
                    )));
                }
                None => nn.models.push(e),
            }
        }
        let mut seen = std::collections::HashSet::new();
        for m in &mut nn.models {
            crate::deploy::validate_name(&m.name)
                .map_err(|e| DeployError::Models(format!("model name: {e}")))?;
            if !seen.insert(m.name.clone()) {
                return Err(DeployError::Models(format!(
                    "model {:?} is named twice",
                    m.name
                )));
            }
            m.size = self
                .blobs
                .size(&m.digest)
                .await?
                .ok_or(DeployError::MissingBlob(m.digest))?;
            self.check_blob(&m.digest, by).await?;
            if by.signer.is_some() {
                self.verify_blob(&m.digest).await?;
            }
            if let Some(monitor) = &m.monitor {
                monitor
                    .check()
                    .map_err(|e| DeployError::Models(format!("model {:?}: {e}", m.name)))?;
                if let Some(reference) = monitor.reference {
                    if self.blobs.size(&reference).await?.is_none() {
                        return Err(DeployError::MissingBlob(reference));
                    }
                    self.check_blob(&reference, by).await?;
                    if by.signer.is_some() {
                        self.verify_blob(&reference).await?;
                    }
                }
            }
        }
        Ok(nn)
    }

    /// The local path of a blob a manifest names (fetched from the bucket if need be).
    async fn local_blob(&self, digest: &Digest) -> Result<std::path::PathBuf, DeployError> {
        match self.blobs.local_path(digest).await {
            Ok(p) => Ok(p),
            Err(BlobError::NotFound(d)) => Err(DeployError::MissingBlob(d)),
            Err(e) => Err(e.into()),
        }
    }

    /// Hashes a stored blob again (signed bundles: what runs must be what was signed).
    async fn verify_blob(&self, digest: &Digest) -> Result<(), DeployError> {
        let path = self.local_blob(digest).await?;
        let expected = *digest;
        let actual = tokio::task::spawn_blocking(move || Digest::of_file(&path))
            .await
            .map_err(|e| anyhow::anyhow!("hashing a blob: {e}"))?
            .context("hashing a blob")?;
        if actual != expected {
            return Err(DeployError::Tampered(expected));
        }
        Ok(())
    }

    /// Creates a version of `function` from a stored component blob: compile, load its
    /// models, run its `[validate]` cases, persist, record. Returns only once the version
    /// can serve (or, for a dry run, once it is known that it would).
    pub async fn deploy(
        &self,
        function: &str,
        component: Digest,
        limits: Limits,
        nn: NnSpec,
        cache: CacheSpec,
        by: &Deployer,
    ) -> Result<Deployed, DeployError> {
        limits.check(&self.config.runtime)?;
        if let Some(f) = self.registry.function(function)
            && !by.admin
            && *f.owner != *by.tenant
        {
            return Err(crate::store::NotOwner {
                function: function.to_string(),
            }
            .into());
        }
        self.check_blob(&component, by).await?;
        let path = self.local_blob(&component).await?;
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DeployError::MissingBlob(component));
            }
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context("reading component blob")
                    .into());
            }
        };
        let size = bytes.len() as u64;
        if by.signer.is_some() && Digest::of(&bytes) != component {
            return Err(DeployError::Tampered(component));
        }
        // Bytes that are not a component get the compiler's error, not the extractor's.
        let embedded = self.store_embedded(&bytes, &by.tenant).await;
        let started = std::time::Instant::now();
        let loaded = self
            .runtime
            .compile(function, bytes, component, limits)
            .await?;
        self.metrics.compiled(started.elapsed());
        let nn = self.resolve_models(embedded?, nn, by).await?;
        let models = self.runtime.models().version_models(&nn);
        // Load every model now: a model that cannot run fails the deploy, not a request.
        self.runtime
            .models()
            .load_all(&models)
            .await
            .map_err(|(name, error)| DeployError::Model { name, error })?;
        let validation = match &by.validate {
            Some(spec) => {
                let result = self
                    .validate_version(&loaded, &nn, limits.timeout_ms, spec, by)
                    .await?;
                if !result.passed {
                    tracing::info!(function, reasons = ?result.reasons, "version refused by its validation");
                    // A dry run is someone trying: only a refused deploy is an event.
                    if !by.dry_run {
                        self.alerts.send(
                            "validation.failed",
                            serde_json::json!({
                                "function": function,
                                "tenant": by.tenant,
                                "reasons": result.reasons,
                                "cases": result.cases,
                                "failed": result.failed,
                                "accuracy": result.accuracy,
                                "p99_ms": result.p99_ms,
                            }),
                        );
                    }
                    return Err(DeployError::ValidationFailed(Box::new(result)));
                }
                Some(crate::monitor::validate::Validation {
                    spec: spec.clone(),
                    result,
                })
            }
            None => None,
        };
        if by.dry_run {
            return Ok(Deployed::DryRun(validation.map(|v| Box::new(v.result))));
        }
        let validation = validation.map(|v| crate::monitor::validate::Validation {
            result: v.result.kept(),
            spec: v.spec,
        });
        let publishing = self.publishing().await;
        let (record, info) = self
            .meta
            .create_version(&NewVersion {
                function: function.to_string(),
                digest: component,
                size,
                limits,
                nn,
                cache,
                signer: by.signer.clone(),
                signed_at: by.signed_at,
                outbound: by.outbound.clone(),
                tenant: by.tenant.clone(),
                enforce_owner: !by.admin,
                public: by.public,
                validation,
            })
            .await
            .map_err(|e| match e.downcast::<crate::store::NotOwner>() {
                Ok(not_owner) => DeployError::NotOwner(not_owner),
                Err(e) => match e.downcast::<crate::store::Replayed>() {
                    Ok(replayed) => DeployError::Replayed(replayed),
                    Err(e) => DeployError::Internal(e),
                },
            })?;
        self.runtime.insert_loaded(record.id, loaded);
        self.register(record.clone(), &info, models);
        drop(publishing);
        tracing::info!(function, version = record.version, %component, models = record.nn.models.len(), "deployed");
        Ok(Deployed::Version(Box::new(record)))
    }

    /// The secret sticky keys are hashed under.
    pub fn sticky(&self) -> crate::deploy::StickySecret {
        self.sticky
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Deletes a function and every version; false when there was none (or, with
    /// `owner`, when it is not that tenant's).
    pub async fn delete_function(&self, name: &str, owner: Option<&str>) -> anyhow::Result<bool> {
        let _publishing = self.publishing().await;
        if let (Some(owner), Some(f)) = (owner, self.registry.function(name))
            && *f.owner != *owner
        {
            return Ok(false);
        }
        let existed = self.meta.delete_function(name).await?;
        self.forget_function(name);
        Ok(existed)
    }
}
