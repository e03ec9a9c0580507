//! A node among others: every [`HEARTBEAT_EVERY`] it reports itself (`GET /v1/cluster`),
//! counts the live nodes (each enforces its share of a rate limit), keeps or takes the
//! leases of the rollouts in progress (one driver per rollout across the cluster), and
//! publishes its numbers of every running rollout's versions for the driver to add up.
//!
//! A lease lasts [`LEASE`] on the database's clock and is renewed every heartbeat, so a
//! driver that dies, stops or loses the database is replaced within about [`LEASE`]. Taking
//! a lease moves the rollout's epoch, and every write of a step checks it: a former driver
//! that wakes up still believing it drives cannot write over its successor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::App;
use crate::deploy::Rollout;
use crate::meter::ended_seconds;
use crate::store::{NodeReport, PublishedStats};

/// How often a node reports itself, renews its leases and publishes its numbers.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A node whose last heartbeat is older than this is not alive.
pub const LIVE_WITHIN: Duration = Duration::from_secs(10);
/// How long a rollout's lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(5);
/// How much sooner than the database this node deems its own lease lapsed (the lease was
/// stamped after the request left).
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// The leases this node holds: until when (by its own clock) it may drive each rollout.
pub(super) type Leases = std::sync::Mutex<HashMap<String, Instant>>;

impl App {
    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node holds the lease of `name`'s rollout now.
    pub(super) fn drives(&self, name: &str) -> bool {
        !self.stopping.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .leases()
                .get(name)
                .is_some_and(|until| Instant::now() < *until)
    }

    pub(super) fn drop_lease(&self, name: &str) {
        self.leases().remove(name);
    }

    /// Takes the lease of `name`'s rollout if it is free (or lapsed, or this node's), and
    /// then drives the rollout as the database holds it.
    pub(super) async fn take_lease(&self, name: &str) {
        // A node shutting down leaves its rollouts to the others.
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let _publishing = self.publishing().await;
        // Checked again under the lock: a release may have run while this waited.
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let sent = Instant::now();
        match self
            .meta
            .take_lease(name, &self.node_id, LEASE.as_millis() as i64)
            .await
        {
            Ok(Some(r)) => {
                tracing::info!(function = name, epoch = r.epoch, "driving the rollout");
                self.leases()
                    .insert(name.to_string(), sent + LEASE - LEASE_MARGIN);
                self.active().insert(name.to_string(), r);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(function = name, "taking a rollout's lease: {e:#}"),
        }
    }

    /// Renews the lease of `name`'s rollout; when another change moved the rollout
    /// meanwhile, reads it again. A lease that is gone is dropped.
    async fn renew_lease(&self, name: &str) {
        let sent = Instant::now();
        let renewed = self
            .meta
            .renew_lease(name, &self.node_id, LEASE.as_millis() as i64)
            .await;
        match renewed {
            // Released meanwhile (shutting down): the database has it as released.
            Ok(Some(_)) if self.stopping.load(std::sync::atomic::Ordering::SeqCst) => {}
            Ok(Some(epoch)) => {
                self.leases()
                    .insert(name.to_string(), sent + LEASE - LEASE_MARGIN);
                let behind = self.active().get(name).is_none_or(|r| r.epoch != epoch);
                if behind {
                    self.reread_rollout(name).await;
                }
            }
            Ok(None) => {
                tracing::info!(function = name, "no longer driving the rollout");
                self.drop_lease(name);
                self.reread_rollout(name).await;
            }
            // Kept until it lapses: the database may be back before then.
            Err(e) => tracing::debug!(function = name, "renewing a rollout's lease: {e:#}"),
        }
    }

    /// Replaces `name`'s rollout in memory with the stored one.
    async fn reread_rollout(&self, name: &str) {
        let _publishing = self.publishing().await;
        match self.meta.rollout(name).await {
            Ok(Some(r)) if r.state.active() => {
                let mut active = self.active();
                if active.get(name).is_none_or(|m| m.epoch != r.epoch) {
                    active.insert(name.to_string(), r);
                }
            }
            Ok(_) => {
                self.active().remove(name);
                self.drop_lease(name);
            }
            Err(e) => tracing::debug!(function = name, "reading a rollout: {e:#}"),
        }
    }

    /// Makes memory hold the rollouts in progress as stored (at start, and when another
    /// node changed any); the caller holds the publishing lock. One already known at the
    /// same epoch keeps what memory adds (the last check, the monotonic step start).
    pub(super) fn apply_rollouts(&self, stored: Vec<Rollout>) {
        let stored: HashMap<String, Rollout> = stored
            .into_iter()
            .map(|r| (r.function.clone(), r))
            .collect();
        let mut active = self.active();
        let ended: Vec<String> = active
            .keys()
            .filter(|n| !stored.contains_key(*n))
            .cloned()
            .collect();
        for name in ended {
            active.remove(&name);
            self.drop_lease(&name);
        }
        for (name, r) in stored {
            if active.get(&name).is_none_or(|m| m.epoch != r.epoch) {
                if r.driver.as_deref() != Some(&self.node_id) {
                    self.drop_lease(&name);
                }
                active.insert(name, r);
            }
        }
    }

    /// One heartbeat: report, count the live nodes, keep or take leases, publish numbers.
    pub(super) async fn heartbeat(&self) -> anyhow::Result<()> {
        // The leases held first: nothing else this node does may let them lapse.
        let held: Vec<String> = self.leases().keys().cloned().collect();
        for name in &held {
            self.renew_lease(name).await;
        }
        self.meta.heartbeat(&self.report()).await?;
        let live = self.meta.nodes(LIVE_WITHIN.as_millis() as i64).await?;
        self.live_nodes.set(live.len());
        let free: Vec<String> = self
            .active()
            .keys()
            .filter(|n| !held.contains(n))
            .cloned()
            .collect();
        for name in &free {
            self.take_lease(name).await;
        }
        self.publish_rollout_numbers().await
    }

    /// Hands every lease this node holds back (it is shutting down), so another node
    /// drives those rollouts from its next heartbeat instead of after the lease lapses.
    /// From now on this node takes no lease and writes no step.
    pub async fn release_leases(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The publishing lock waits out a step being written and a lease being taken.
        let _publishing = self.publishing().await;
        self.leases().clear();
        // The database is asked even when memory holds none: a renewal in flight may
        // have extended one.
        match self.meta.release_leases(&self.node_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rollouts = n, "rollout leases released"),
            // They lapse on their own within a lease.
            Err(e) => tracing::warn!("releasing rollout leases: {e:#}"),
        }
    }

    /// What this node reports of itself.
    pub fn report(&self) -> NodeReport {
        let loaded = self.runtime.loaded_ids();
        let mut versions: Vec<String> = self
            .registry
            .functions()
            .iter()
            .flat_map(|f| {
                f.versions
                    .values()
                    .filter(|v| loaded.contains(&v.record.id))
                    .map(|v| format!("{}@{}", f.name, v.record.version))
                    .collect::<Vec<_>>()
            })
            .collect();
        versions.sort();
        NodeReport {
            id: self.node_id.clone(),
            address: self.config.listen.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: self.started_at_ms,
            heartbeat_ms: crate::unix_ms(),
            loaded: versions,
            in_flight: self.metrics.in_flight(),
        }
    }

    /// Stores this process's numbers of the candidate and the stable version of every
    /// running rollout over its current step.
    async fn publish_rollout_numbers(&self) -> anyhow::Result<()> {
        let now = crate::unix_ms();
        let running: Vec<Rollout> = self
            .active()
            .values()
            .filter(|r| r.state == crate::deploy::Phase::Running)
            .cloned()
            .collect();
        for r in running {
            let Some(f) = self.registry.function(&r.function) else {
                continue;
            };
            let seconds = ended_seconds(r.elapsed(now));
            let mut stats = Vec::new();
            for v in [r.candidate, r.stable] {
                if let Some(entry) = f.versions.get(&v) {
                    stats.push(PublishedStats {
                        version: v,
                        stats: serde_json::to_string(&entry.routed.aggregate_in(&seconds))?,
                    });
                }
            }
            self.meta
                .publish_rollout_stats(&r.function, &self.process, r.step_started_ms, &stats)
                .await?;
        }
        Ok(())
    }

    /// The nodes alive now (`GET /v1/cluster`).
    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeReport>> {
        self.meta.nodes(LIVE_WITHIN.as_millis() as i64).await
    }

    /// How many nodes are alive (at least this one), as of the last heartbeat.
    pub fn live_nodes(&self) -> usize {
        self.live_nodes.get()
    }
}

/// Runs [`App::heartbeat`] every [`HEARTBEAT_EVERY`] while the app lives; a failure (the
/// database away) is logged once until it passes.
pub(super) fn spawn_heartbeat(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { return };
            match app.heartbeat().await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!("heartbeat: {e:#}");
                    }
                    failing = true;
                }
            }
        }
    });
}
