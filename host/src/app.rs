//! [`App`]: the composition root that owns the stores, the runtime (with its model cache),
//! the registry, the prediction caches and the usage ledger, and the few operations that
//! touch several of them (deploy a version, delete a function, clear its caches).

use std::sync::Arc;

use anyhow::Context;

use crate::cache::inference::{InferenceCache, InferenceScope};
use crate::cache::responses::ResponseCache;
use crate::cache::{CacheSpec, Placement};
use crate::config::ServerConfig;
use crate::deploy::{Registry, VersionEntry};
use crate::meter::{Ledger, Metrics};
use crate::nn::embed::{self, EmbedError};
use crate::nn::{ModelRef, NnError, NnSpec, VersionModels};
use crate::runtime::{CompileError, Limits, Runtime};
use crate::store::{BlobStore, Digest, MetaStore, NewVersion, VersionRecord};

/// Everything a running server shares between requests.
pub struct App {
    pub config: ServerConfig,
    pub meta: MetaStore,
    pub blobs: BlobStore,
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
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("blob {0} is not on this server; upload it first with PUT /v1/blobs/{0}")]
    MissingBlob(Digest),
    #[error(transparent)]
    Limits(#[from] crate::runtime::LimitError),
    /// A model failed to load (bad ONNX, GPU asked for on a CPU host, backend missing...).
    #[error("model {name:?}: {error}")]
    Model { name: String, error: NnError },
    /// The manifest's models are inconsistent (bad name, two different models under one name).
    #[error("{0}")]
    Models(String),
    /// The component's embedded models could not be read.
    #[error("embedded models: {0}")]
    Embedded(#[from] EmbedError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl App {
    /// Opens the data dir, builds the runtime and reloads every function from the database.
    /// Versions are loaded lazily: the first request maps the compiled artifact.
    pub fn open(config: ServerConfig) -> anyhow::Result<Arc<App>> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let meta = MetaStore::open(&config.data_dir.join("kiln.db"))?;
        let blobs = BlobStore::open(&config.data_dir).context("opening blob store")?;
        let metrics = Arc::new(Metrics::new());
        let models = crate::nn::open(&config.nn, metrics.clone())?;
        if tokio::runtime::Handle::try_current().is_ok() {
            models.spawn_sweeper();
        }
        let runtime = Runtime::new(config.runtime.clone(), &config.data_dir, models)?;
        let registry = Registry::new(config.runtime.queue_depth);
        let responses = Arc::new(ResponseCache::new(
            config.cache.responses_memory_mb << 20,
            metrics.cache("response"),
        ));
        let inference = Arc::new(InferenceCache::new(
            config.cache.inference_memory_mb << 20,
            metrics.cache("inference"),
        ));
        let ledger = if config.metering.enabled {
            Some(Ledger::open(
                &config.data_dir.join("usage.db"),
                config.metering.durability,
                std::time::Duration::from_millis(config.metering.commit_interval_ms),
                metrics.clone(),
            )?)
        } else {
            None
        };
        let app = App {
            config,
            meta,
            blobs,
            runtime,
            registry,
            metrics,
            responses,
            inference,
            ledger,
        };
        let created: std::collections::HashMap<_, _> =
            app.meta.function_created_at()?.into_iter().collect();
        for rec in app.meta.all_versions()? {
            let at = created
                .get(&rec.function)
                .copied()
                .unwrap_or(rec.created_at);
            let models = app
                .runtime
                .models()
                .version_models(&rec.nn, |d| app.blobs.path(d));
            app.register(rec, at, models);
        }
        Ok(Arc::new(app))
    }

    /// Makes a stored version servable: its models tied to the inference cache (unless it
    /// opted out), its response cache placement and its metric series, all made once here
    /// rather than per request.
    fn register(&self, rec: VersionRecord, created_at: i64, mut models: VersionModels) {
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
        self.registry.add(
            VersionEntry {
                admission: self.registry.admission(rec.limits.max_concurrency),
                function: owner,
                record: rec,
                models: Arc::new(models),
                metrics,
                responses,
            },
            created_at,
        );
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

    /// Copies the models embedded in `component` out into blobs.
    fn store_embedded(&self, component: &[u8]) -> Result<Vec<ModelRef>, DeployError> {
        let mut out = Vec::new();
        for (meta, range) in embed::extract(component)? {
            let bytes = &component[range];
            let digest = self
                .blobs
                .put(bytes)
                .map_err(|e| anyhow::Error::from(e).context("storing an embedded model"))?;
            out.push(ModelRef {
                name: meta.name,
                digest,
                size: bytes.len() as u64,
                encoding: meta.encoding,
                target: meta.target,
                backend: meta.backend,
            });
        }
        Ok(out)
    }

    /// Adds the embedded models to `nn`, then checks every model: a valid name, its blob
    /// present, one digest per name.
    fn resolve_models(
        &self,
        embedded: Vec<ModelRef>,
        mut nn: NnSpec,
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
                .ok_or(DeployError::MissingBlob(m.digest))?;
        }
        Ok(nn)
    }

    /// Creates a version of `function` from a stored component blob: compile, persist,
    /// pre-instantiate, record. Returns only once the version can serve.
    pub async fn deploy(
        &self,
        function: &str,
        component: Digest,
        limits: Limits,
        nn: NnSpec,
        cache: CacheSpec,
    ) -> Result<VersionRecord, DeployError> {
        limits.check(&self.config.runtime)?;
        let path = self.blobs.path(&component);
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
        // Bytes that are not a component get the compiler's error, not the extractor's.
        let embedded = self.store_embedded(&bytes);
        let started = std::time::Instant::now();
        let loaded = self
            .runtime
            .compile(function, bytes, component, limits)
            .await?;
        self.metrics.compiled(started.elapsed());
        let nn = self.resolve_models(embedded?, nn)?;
        let models = self
            .runtime
            .models()
            .version_models(&nn, |d| self.blobs.path(d));
        // Load every model now: a model that cannot run fails the deploy, not a request.
        self.runtime
            .models()
            .load_all(&models)
            .await
            .map_err(|(name, error)| DeployError::Model { name, error })?;
        let record = self.meta.create_version(&NewVersion {
            function: function.to_string(),
            digest: component,
            size,
            limits,
            nn,
            cache,
        })?;
        self.runtime.insert_loaded(record.id, loaded);
        self.register(record.clone(), record.created_at, models);
        tracing::info!(function, version = record.version, %component, models = record.nn.models.len(), "deployed");
        Ok(record)
    }

    /// Deletes a function and every version; false when there was none.
    pub fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let existed = self.meta.delete_function(name)?;
        self.clear_caches(name);
        if let Some(f) = self.registry.remove(name) {
            for v in f.versions.values() {
                self.runtime.unload(v.record.id);
            }
        }
        Ok(existed)
    }
}
