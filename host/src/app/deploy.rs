//! Deploying a version: the manifest's blobs checked (owned by the deployer, verified when
//! signed), embedded models copied out, the component compiled and its models loaded, its
//! `[validate]` cases run, and only then the version stored and published.

use anyhow::Context;

use super::App;
use crate::cache::CacheSpec;
use crate::common::{Digest, Limits};
use crate::nn::embed::{self, EmbedError};
use crate::nn::{ModelRef, NnError, NnSpec};
use crate::runtime::CompileError;
use crate::store::{BlobError, NewVersion, VersionRecord};

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
    /// The variables the version declares (checked by the caller).
    pub variables: crate::deploy::variables::Declared,
    /// The API key deploying it (the actor of what the deploy changes besides).
    pub key_id: Option<String>,
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
    /// The version declares secret a variable that holds a clear value, and this node
    /// has no key to seal it with.
    #[error(transparent)]
    Variables(super::VariablesError),
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
    pub(super) async fn check_blob(
        &self,
        digest: &Digest,
        by: &Deployer,
    ) -> Result<(), DeployError> {
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
    pub(super) async fn local_blob(
        &self,
        digest: &Digest,
    ) -> Result<std::path::PathBuf, DeployError> {
        match self.blobs.local_path(digest).await {
            Ok(p) => Ok(p),
            Err(BlobError::NotFound(d)) => Err(DeployError::MissingBlob(d)),
            Err(e) => Err(e.into()),
        }
    }

    /// Hashes a stored blob again (signed bundles: what runs must be what was signed).
    pub(super) async fn verify_blob(&self, digest: &Digest) -> Result<(), DeployError> {
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
        if self.cannot_seal(function, &by.variables) {
            return Err(DeployError::Variables(super::VariablesError::NoSecretsKey));
        }
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
                variables: by.variables.clone(),
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
        if record.variables.values().any(|d| d.secret)
            && let Err(e) = self
                .seal_declared(function, record.id, &record.variables, by.key_id.as_deref())
                .await
        {
            // The version is deployed; its secrets' clear values stay until set again.
            tracing::error!(
                function,
                version = record.version,
                "sealing the values it declares secret: {e:#}"
            );
        }
        tracing::info!(function, version = record.version, %component, models = record.nn.models.len(), "deployed");
        Ok(Deployed::Version(Box::new(record)))
    }
}
