//! This node's identity and readiness: the node id (given, or made once and kept in the
//! data dir), and whether the node has what serving needs — its database, its blob store,
//! its registry — for `GET /readyz`.
//!
//! A shared blob store is probed in the background every [`PROBE_EVERY`], so that a probe
//! answers at once (load balancers time out in about a second) and never waits on the bucket.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::App;

/// How often a shared blob store is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long `/readyz` waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe result older than this no longer counts (the prober is stuck).
const PROBE_STALE: Duration = Duration::from_secs(15);

/// The last probe of the shared blob store: when, and what it said.
#[derive(Default)]
pub(super) struct BlobHealth(Mutex<Option<(Instant, Result<(), String>)>>);

impl BlobHealth {
    fn set(&self, result: Result<(), String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), result));
    }

    fn get(&self) -> Result<(), String> {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Err("not probed yet".into()),
            Some((at, _)) if at.elapsed() > PROBE_STALE => {
                Err(format!("no probe answered for {:?}", at.elapsed()))
            }
            Some((_, r)) => r.clone(),
        }
    }
}

/// The node id: `given` (`--node-id`, `KILN_NODE_ID`), else the one kept in
/// `<data>/node-id`, else a new one (host name and a random suffix) written there.
pub fn node_id(data_dir: &Path, given: Option<&str>) -> anyhow::Result<String> {
    let fits = |id: &str| {
        id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if let Some(id) = given.map(str::trim).filter(|s| !s.is_empty()) {
        if !fits(id) {
            anyhow::bail!(
                "node id {id:?}: use at most 64 letters, digits, '.', '_' and '-' (it names the node in request ids, leases and GET /v1/cluster)"
            );
        }
        return Ok(id.to_string());
    }
    let path = data_dir.join("node-id");
    // One an earlier Kiln made from a host name that does not fit is made again.
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
        && fits(id.trim())
    {
        return Ok(id.trim().to_string());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .take(48)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kiln".into());
    let mut suffix = [0u8; 3];
    getrandom::fill(&mut suffix).map_err(|e| anyhow::anyhow!("random node id suffix: {e}"))?;
    let id = format!("{host}-{}", hex::encode(suffix));
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

impl App {
    /// What `/readyz` reports: `Ok` while the node can serve and change state, else the
    /// first part that cannot, with why. `/readyz` needs no key, so it names the kinds of
    /// store only (never a host, bucket or credential).
    pub async fn readiness(&self) -> Result<serde_json::Value, String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.meta.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // The cause goes to the log: /readyz answers anyone.
                tracing::warn!("readiness: the database does not answer: {e:#}");
                return Err("database unavailable".into());
            }
            Err(_) => {
                return Err(format!(
                    "database unavailable: no answer within {PROBE_TIMEOUT:?}"
                ));
            }
        }
        let blobs = match self.blobs.is_shared() {
            true => self.blob_health.get(),
            false => self.blobs.check().await.map_err(|e| e.to_string()),
        };
        blobs.map_err(|e| format!("blob store unavailable: {e}"))?;
        Ok(serde_json::json!({
            "status": "ready",
            "node": self.node_id,
            "database": self.meta.describe(),
            "blobs": self.blobs.kind(),
        }))
    }
}

/// Probes a shared blob store once now (so `/readyz` is right from the first request),
/// then every [`PROBE_EVERY`] for as long as the app lives.
pub(super) async fn start_blob_prober(app: &Arc<App>) {
    if !app.blobs.is_shared() {
        return;
    }
    let first = app.blobs.check().await.map_err(|e| e.to_string());
    if let Err(e) = &first {
        tracing::warn!(store = %app.blobs.describe(), "blob store unavailable: {e}");
    }
    let mut was_ok = first.is_ok();
    app.blob_health.set(first);
    let app = Arc::downgrade(app);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let Some(app) = app.upgrade() else {
                return;
            };
            let result = app.blobs.check().await.map_err(|e| e.to_string());
            match (&result, was_ok) {
                (Err(e), true) => {
                    tracing::warn!(store = %app.blobs.describe(), "blob store unavailable: {e}")
                }
                (Ok(()), false) => {
                    tracing::info!(store = %app.blobs.describe(), "blob store available again")
                }
                _ => {}
            }
            was_ok = result.is_ok();
            app.blob_health.set(result);
        }
    });
}
