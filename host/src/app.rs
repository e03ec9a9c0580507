//! [`App`]: the composition root that owns the stores, the runtime (with its model cache)
//! and the registry, and the few operations that touch several of them (deploy a version,
//! delete a function).

use std::sync::Arc;

use anyhow::Context;

use crate::config::ServerConfig;
use crate::deploy::Registry;
use crate::meter::Metrics;
use crate::nn::embed::{self, EmbedError};
use crate::nn::{ModelRef, NnError, NnSpec};
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
        let created: std::collections::HashMap<_, _> =
            meta.function_created_at()?.into_iter().collect();
        for rec in meta.all_versions()? {
            let at = created
                .get(&rec.function)
                .copied()
                .unwrap_or(rec.created_at);
            let models = runtime.models().version_models(&rec.nn, |d| blobs.path(d));
            let series = metrics.version(&rec.function, rec.version);
            registry.add(rec, at, Arc::new(models), series);
        }
        Ok(Arc::new(App {
            config,
            meta,
            blobs,
            runtime,
            registry,
            metrics,
        }))
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
        })?;
        self.runtime.insert_loaded(record.id, loaded);
        self.registry.add(
            record.clone(),
            record.created_at,
            Arc::new(models),
            self.metrics.version(function, record.version),
        );
        tracing::info!(function, version = record.version, %component, models = record.nn.models.len(), "deployed");
        Ok(record)
    }

    /// Deletes a function and every version; false when there was none.
    pub fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let existed = self.meta.delete_function(name)?;
        if let Some(f) = self.registry.remove(name) {
            for v in f.versions.values() {
                self.runtime.unload(v.record.id);
            }
        }
        Ok(existed)
    }
}
