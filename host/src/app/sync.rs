//! Keeping a node's memory in step with a database that other nodes write (PostgreSQL):
//! the rows are the truth. Every writing transaction bumps a change counter last (its row
//! lock orders the bumps as the commits, so a committed change always moves it) and
//! announces it with `NOTIFY`; the node listens, and reads the counter when woken or
//! every [`POLL_EVERY`] (a notification lost with a dropped connection is caught there).
//! When it moved, the node reads the state as of one
//! instant and applies what its memory lacks the way a local change is applied: new
//! versions registered, deleted (or deleted and re-created) functions dropped and rebuilt,
//! policies and aliases whose revision moved swapped in whole, rollouts whose epoch moved
//! taken in (a node refuses a traffic change during another node's rollout), keys reloaded (a revocation
//! made on any node is refused here from then on). Every [`FULL_EVERY`] it applies the
//! state even without a change, as a safety net.
//!
//! A request sees the old or the new state of a function, never a mix: each function's
//! snapshot is swapped at once, as for a local change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::App;
use crate::deploy::{Routing, TrafficPolicy};

/// How often a node looks for changes made by other nodes without being woken.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// How often a node applies the stored state even when the counter did not move.
pub const FULL_EVERY: Duration = Duration::from_secs(30);

impl App {
    /// Applies every change the database holds that this node's memory lacks: at start
    /// (`from_other_nodes` false) that is everything, afterwards what other nodes changed.
    pub(super) async fn apply_stored(&self, from_other_nodes: bool) -> anyhow::Result<()> {
        // Read under the publishing lock: a change this node makes meanwhile is then
        // either in what is read, or made after it is applied, never undone by it.
        let _publishing = self.publishing().await;
        let state = self.meta.state().await?;
        let functions: HashMap<String, _> = state
            .functions
            .into_iter()
            .map(|f| (f.name.clone(), f))
            .collect();
        let ids: HashSet<i64> = state.versions.iter().map(|v| v.id).collect();
        let mut changed = HashSet::new();
        for f in self.registry.functions() {
            let gone = match functions.get(&f.name) {
                None => {
                    tracing::info!(function = %f.name, "deleted on another node");
                    true
                }
                // Deleted and made again (maybe by another tenant) since the last look:
                // nothing of the old function may stay.
                Some(info)
                    if info.created_at != f.created_at
                        || *info.tenant != *f.owner
                        || f.versions.values().any(|v| !ids.contains(&v.record.id)) =>
                {
                    tracing::info!(function = %f.name, "deleted and created again on another node");
                    true
                }
                Some(_) => false,
            };
            if gone {
                self.forget_function(&f.name);
            }
        }
        for rec in state.versions {
            let Some(info) = functions.get(&rec.function) else {
                continue;
            };
            let known = self
                .registry
                .function(&rec.function)
                .and_then(|f| f.versions.get(&rec.version).map(|v| v.record.id == rec.id))
                .unwrap_or(false);
            if !known {
                if from_other_nodes {
                    tracing::info!(function = %rec.function, version = rec.version, "deployed on another node");
                }
                changed.insert(rec.function.clone());
                let models = self.runtime.models().version_models(&rec.nn);
                self.register(rec, info, models);
            }
        }
        let current = |name: &str, alias: Option<&str>| {
            self.registry.function(name).and_then(|f| {
                f.routing_for(alias)
                    .ok()
                    .flatten()
                    .map(|r: &Arc<Routing>| r.revision)
            })
        };
        let rows = state
            .traffic
            .into_iter()
            .map(|(f, p, r)| (f, None, p, r))
            .chain(
                state
                    .aliases
                    .into_iter()
                    .map(|(f, a, p, r)| (f, Some(a), p, r)),
            );
        for (function, alias, policy, revision) in rows {
            if self.registry.function(&function).is_none()
                || current(&function, alias.as_deref()) == Some(revision)
            {
                continue;
            }
            let policy = match serde_json::from_str::<Option<TrafficPolicy>>(&policy) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(function, "stored traffic policy unreadable: {e}");
                    continue;
                }
            };
            // A stored 'null' after a policy: removed; never had one: nothing to do.
            if policy.is_none() && current(&function, alias.as_deref()).is_none() {
                continue;
            }
            let routing = policy.map(|p| Arc::new(Routing::new(p, revision)));
            self.registry
                .set_routing(&function, alias.as_deref(), routing);
            changed.insert(function);
        }
        for name in changed {
            self.keep_loaded(&name);
        }
        self.apply_rollouts(state.rollouts);
        self.apply_variables(state.variables);
        drop(_publishing);
        if !from_other_nodes {
            return Ok(());
        }
        let sticky = crate::deploy::StickySecret::new(self.meta.secret("sticky").await?);
        *self.sticky.write().unwrap_or_else(|p| p.into_inner()) = sticky;
        self.auth.reload().await
    }

    /// Drops function `name` from memory (deleted in the database).
    pub(super) fn forget_function(&self, name: &str) {
        self.forget_rollout(name);
        self.clear_caches(name);
        // A function made again under the name must not show the old one's output.
        self.logs.remove(name);
        self.runtime.keep_loaded(name, &[]);
        if let Some(f) = self.registry.remove(name) {
            for v in f.versions.values() {
                self.runtime.unload(v.record.id);
            }
            self.metrics.forget(name, f.versions.keys().copied());
        }
        let destinations = self.breakers.forget(name);
        self.metrics.forget_breakers(name, &destinations);
    }
}

/// Reads the database's change counter when another node announces a change (on `url`'s
/// `LISTEN` connection) and every [`POLL_EVERY`], and syncs when it moved, for as long as
/// the app lives. Errors (the database away) are logged once and retried.
pub(super) fn spawn_store_sync(app: &Arc<App>, url: &str) -> anyhow::Result<()> {
    let weak = Arc::downgrade(app);
    let wake = Arc::new(tokio::sync::Notify::new());
    crate::store::pg::listen_for_changes(url, wake.clone())?;
    tokio::spawn(async move {
        let mut seen = None;
        let mut failing = false;
        let mut last_full = std::time::Instant::now();
        loop {
            // Woken early by a notification: changes that arrive together are read once.
            let _ = tokio::time::timeout(POLL_EVERY, wake.notified()).await;
            let Some(app) = weak.upgrade() else { return };
            let now = match app.meta.changes().await {
                Ok(f) => f,
                Err(e) => {
                    if !failing {
                        tracing::warn!("watching the database for changes: {e:#}");
                    }
                    failing = true;
                    continue;
                }
            };
            if seen.as_ref() == Some(&now) && last_full.elapsed() < FULL_EVERY {
                failing = false;
                continue;
            }
            last_full = std::time::Instant::now();
            match app.apply_stored(true).await {
                Ok(()) => {
                    seen = Some(now);
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("applying changes from the database: {e:#}");
                    }
                    failing = true;
                }
            }
        }
    });
    Ok(())
}
