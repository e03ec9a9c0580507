//! [`App`]: the composition root that owns the stores, the runtime and the registry, and
//! the few operations that touch several of them (deploy a version, delete a function).

use std::sync::Arc;

use anyhow::Context;

use crate::config::ServerConfig;
use crate::deploy::Registry;
use crate::runtime::{CompileError, Limits, Runtime};
use crate::store::{BlobStore, Digest, MetaStore, NewVersion, VersionRecord};

/// Everything a running server shares between requests.
pub struct App {
    pub config: ServerConfig,
    pub meta: MetaStore,
    pub blobs: BlobStore,
    pub runtime: Runtime,
    pub registry: Registry,
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
        let runtime = Runtime::new(config.runtime.clone(), &config.data_dir)?;
        let registry = Registry::new(config.runtime.queue_depth);
        let created: std::collections::HashMap<_, _> =
            meta.function_created_at()?.into_iter().collect();
        for rec in meta.all_versions()? {
            let at = created
                .get(&rec.function)
                .copied()
                .unwrap_or(rec.created_at);
            registry.add(rec, at);
        }
        Ok(Arc::new(App {
            config,
            meta,
            blobs,
            runtime,
            registry,
        }))
    }

    /// Creates a version of `function` from a stored component blob: compile, persist,
    /// pre-instantiate, record. Returns only once the version can serve.
    pub async fn deploy(
        &self,
        function: &str,
        component: Digest,
        limits: Limits,
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
        let loaded = self
            .runtime
            .compile(function, bytes, component, limits)
            .await?;
        let record = self.meta.create_version(&NewVersion {
            function: function.to_string(),
            digest: component,
            size,
            limits,
        })?;
        self.runtime.insert_loaded(record.id, loaded);
        self.registry.add(record.clone(), record.created_at);
        tracing::info!(function, version = record.version, %component, "deployed");
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
