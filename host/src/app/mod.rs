//! [`App`]: the composition root that owns the stores, the runtime (with its model cache),
//! the registry, the prediction caches and the usage ledger, and the few operations that
//! touch several of them (delete a function, clear its caches; deploying is in [`deploy`],
//! traffic changes and rollouts in [`traffic`]).

mod budgets;
mod cluster;
mod deploy;
mod drift;
mod monitor;
mod ready;
mod rollout;
mod sync;
mod traffic;
mod validate;
mod variables;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::auth::{AuditLog, Auth, Bootstrap, KeyStore};
use crate::cache::Placement;
use crate::cache::inference::{InferenceCache, InferenceScope};
use crate::cache::responses::ResponseCache;
use crate::config::ServerConfig;
use crate::deploy::{Registry, VersionEntry};
use crate::meter::{Ledger, LedgerStore, Metrics};
use crate::nn::VersionModels;
use crate::runtime::{Outbound, Runtime};
use crate::store::{
    BlobStore, DatabaseUrl, FunctionInfo, MetaStore, PgMeta, SqliteMeta, VersionRecord,
};
pub use cluster::{HEARTBEAT_EVERY, LEASE, LIVE_WITHIN};
pub use deploy::{DeployError, Deployed, Deployer};
pub use drift::{MergedWindow, ReferenceError};
pub use ready::node_id;
pub use rollout::Control;
pub use traffic::{Actor, TrafficError};
pub use variables::{SetValue, VariablesError, is_secret};

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
    /// What guests printed, per function (`GET /v1/functions/{name}/logs`).
    pub logs: Arc<crate::runtime::logs::LogBook>,
    /// What secret variables are sealed with (`KILN_SECRETS_KEY`, or the data dir's key
    /// file on a node of its own); `None`: secrets can be neither set nor read.
    pub secrets_key: Option<crate::deploy::variables::SecretsKey>,
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
        let secrets_key = crate::deploy::variables::SecretsKey::load(
            std::env::var(crate::deploy::variables::SECRETS_KEY_ENV)
                .ok()
                .filter(|k| !k.is_empty())
                .as_deref(),
            &config.data_dir,
            shared_db.is_none(),
        )?;
        if secrets_key.is_none() {
            tracing::warn!(
                "{} is not set: secret variables can be neither set nor read on this node",
                crate::deploy::variables::SECRETS_KEY_ENV
            );
        }
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
            logs: Default::default(),
            secrets_key,
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
                log_key: crate::runtime::logs::LogKey::new(
                    &info.name,
                    &info.tenant,
                    info.created_at,
                ),
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
