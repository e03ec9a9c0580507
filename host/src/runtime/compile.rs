//! Deploy-time compilation: validate the uploaded bytes, compile with Cranelift (bounded in
//! size and in how many run at once), persist the artifact keyed by (component digest,
//! engine fingerprint), check every import against the linker and the `wasi:http` export,
//! and instantiate once with the version's limits (so a component whose memory minimum is
//! over its cap is refused now, not on its first request).
//!
//! Uploaded bytes are never deserialized as native code: wasmtime artifacts are refused.

use std::path::Path;
use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::{Component, InstancePre};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::engine::{EPOCH_TICK, Runtime};
use super::loaded::LoadedVersion;
use super::state::HostState;
use crate::common::Digest;
use crate::common::Limits;
use crate::nn::NnCtx;

/// Why a component was refused at deploy; each maps to a 400 (or 413 / 500) for the client.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("component is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("precompiled wasmtime artifacts are refused; upload the .wasm component itself")]
    Precompiled,
    #[error(
        "this is a core WebAssembly module, not a component; build for wasm32-wasip2 or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("not a WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component needs imports this host does not provide: {0}")]
    UnsatisfiedImport(String),
    #[error("the component does not export wasi:http/incoming-handler@0.2.x: {0}")]
    NotAProxy(String),
    #[error("the component fails to instantiate with its limits: {0}")]
    Instantiate(String),
    #[error("compilation failed: {0:#}")]
    Internal(anyhow::Error),
}

impl Runtime {
    /// Compiles a component at deploy and returns it loaded, ready to serve. The artifact is
    /// written before this returns, so a restart maps it back instead of recompiling.
    pub async fn compile(
        &self,
        function: &str,
        bytes: Vec<u8>,
        digest: Digest,
        limits: Limits,
    ) -> Result<Arc<LoadedVersion>, CompileError> {
        let size = bytes.len() as u64;
        if size > self.config.max_component_bytes {
            return Err(CompileError::TooLarge {
                size,
                limit: self.config.max_component_bytes,
            });
        }
        if wasmtime::Engine::detect_precompiled(&bytes).is_some() {
            return Err(CompileError::Precompiled);
        }
        if !wasmparser::Parser::is_component(&bytes) {
            return Err(if wasmparser::Parser::is_core_wasm(&bytes) {
                CompileError::CoreModule
            } else {
                CompileError::Invalid(
                    "the bytes do not start with the WebAssembly component header (\\0asm, layer 1)"
                        .into(),
                )
            });
        }

        let _permit = self
            .compile_permits
            .acquire()
            .await
            .map_err(|e| CompileError::Internal(e.into()))?;
        let engine = self.engine.clone();
        let artifact = self.artifact_path(&digest);
        let started = std::time::Instant::now();
        let component =
            tokio::task::spawn_blocking(move || compile_and_persist(&engine, &bytes, &artifact))
                .await
                .map_err(|e| CompileError::Internal(e.into()))??;
        tracing::info!(function, %digest, elapsed_ms = started.elapsed().as_millis() as u64, "compiled component");
        // Other nodes map this instead of compiling again; without it they compile once each.
        let name = self.artifact_name(&digest);
        if let Err(e) = self
            .blobs
            .share_artifact(&name, &self.artifact_path(&digest))
            .await
        {
            tracing::warn!(function, %digest, "sharing the compiled artifact: {e:#}");
        }

        let pre = self.link(&component)?;
        self.trial_instantiate(function, &pre, &limits).await?;
        Ok(Arc::new(Self::proxy(function, pre, limits)?))
    }

    /// Links a compiled component against the host, naming what does not link.
    pub(super) fn link(
        &self,
        component: &Component,
    ) -> Result<InstancePre<HostState>, CompileError> {
        self.linker
            .instantiate_pre(component)
            .map_err(|e| CompileError::UnsatisfiedImport(format!("{e:#}")))
    }

    /// Checks the `wasi:http/incoming-handler` export and wraps the version for serving.
    pub(super) fn proxy(
        function: &str,
        pre: InstancePre<HostState>,
        limits: Limits,
    ) -> Result<LoadedVersion, CompileError> {
        let pre = ProxyPre::new(pre).map_err(|e| CompileError::NotAProxy(format!("{e:#}")))?;
        Ok(LoadedVersion {
            pre,
            function: Arc::from(function),
            limits,
        })
    }

    /// Instantiates once under the version's limits: a memory minimum over `memory_mb`, or
    /// a start function that traps or loops, is refused now rather than on every request.
    async fn trial_instantiate(
        &self,
        function: &str,
        pre: &InstancePre<HostState>,
        limits: &Limits,
    ) -> Result<(), CompileError> {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(limits.timeout_ms);
        let nn = NnCtx::new(
            Arc::default(),
            self.models.clone(),
            deadline,
            Arc::default(),
        );
        let mut store = Store::new(
            &self.engine,
            HostState::new(
                &Arc::from(function),
                limits,
                nn,
                Arc::default(),
                super::Outbound::deny_all(),
                None,
                &[],
            ),
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(limits.timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64) + 1);
        store.epoch_deadline_trap();
        pre.instantiate_async(&mut store)
            .await
            .map(|_| ())
            .map_err(|e| CompileError::Instantiate(format!("{e:#}")))
    }
}

pub(super) fn compile_and_persist(
    engine: &wasmtime::Engine,
    bytes: &[u8],
    artifact: &Path,
) -> Result<Component, CompileError> {
    let component = Component::from_binary(engine, bytes)
        .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
    let serialized = component.serialize().map_err(|e| {
        CompileError::Internal(anyhow::Error::from(e).context("serializing the compiled component"))
    })?;
    write_atomically(artifact, &serialized).map_err(|e| {
        CompileError::Internal(
            anyhow::Error::from(e).context(format!("writing {}", artifact.display())),
        )
    })?;
    Ok(component)
}

/// Temp file, fsync, rename: a crash never leaves a truncated artifact under its real name.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // Unique per write: two compiles of one component may run at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}
