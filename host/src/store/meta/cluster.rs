//! What the nodes of a cluster share besides functions and policies: their heartbeats
//! (`GET /v1/cluster`), the lease of each rollout's driver, the gate numbers every node
//! publishes for the rollouts in progress, and the secrets they must agree on. On SQLite the one node does the same on its own
//! file, so a single node and a cluster run the same code.
//!
//! Lease times are the database's clock on PostgreSQL (nodes' clocks may disagree; the
//! database decides who holds a lease), the node's own on SQLite.

use serde::{Deserialize, Serialize};

use super::MetaStore;
use crate::deploy::Rollout;

/// What a node reports of itself with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub id: String,
    /// Where it listens (`--listen`).
    pub address: String,
    /// The Kiln version it runs.
    pub version: String,
    /// Unix ms.
    pub started_at_ms: i64,
    /// The last heartbeat, unix ms (set by the store).
    pub heartbeat_ms: i64,
    /// The versions it holds in memory, `function@version`.
    pub loaded: Vec<String>,
    /// Requests it is answering now.
    pub in_flight: u64,
}

/// One process's numbers of one version over a rollout's current step, as published (a
/// JSON aggregate the meter reads).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedStats {
    pub version: u32,
    pub stats: String,
}

/// Heartbeats older than this are forgotten.
pub(super) const FORGET_NODES_MS: i64 = 86_400_000;

/// Length of a shared secret, in bytes.
pub const SECRET_LEN: usize = 32;

impl MetaStore {
    /// The shared secret called `name`, made (from the OS's random source) by the first
    /// node that asks; every node gets the same bytes.
    pub async fn secret(&self, name: &str) -> anyhow::Result<[u8; SECRET_LEN]> {
        let mut fresh = [0u8; SECRET_LEN];
        getrandom::fill(&mut fresh).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        let stored = on_backend!(self.secret(name, &fresh))?;
        stored.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "stored secret {name:?} is {} bytes, not {SECRET_LEN}",
                stored.len()
            )
        })
    }

    /// Stores `report` as its node's latest, stamped now.
    pub async fn heartbeat(&self, report: &NodeReport) -> anyhow::Result<()> {
        on_backend!(self.heartbeat(report))
    }

    /// The nodes whose last heartbeat is at most `within_ms` old, by id.
    pub async fn nodes(&self, within_ms: i64) -> anyhow::Result<Vec<NodeReport>> {
        on_backend!(self.nodes(within_ms))
    }

    /// Takes the lease of `function`'s active rollout for `node`, for `lease_ms`, if nobody
    /// holds it (or its holder let it lapse, or it is `node`'s already): returns the
    /// rollout at its new epoch, which fences off every earlier holder.
    pub async fn take_lease(
        &self,
        function: &str,
        node: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Option<Rollout>> {
        on_backend!(self.take_lease(function, node, lease_ms))
    }

    /// Extends `node`'s lease of `function`'s active rollout by `lease_ms` from now;
    /// returns the rollout's epoch, or `None` when the lease is no longer `node`'s (or the
    /// rollout ended).
    pub async fn renew_lease(
        &self,
        function: &str,
        node: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Option<u64>> {
        on_backend!(self.renew_lease(function, node, lease_ms))
    }

    /// Gives up every lease `node` holds (it is shutting down): the rollouts are free for
    /// any node to take at once. Returns how many were released.
    pub async fn release_leases(&self, node: &str) -> anyhow::Result<u64> {
        on_backend!(self.release_leases(node))
    }

    /// Stores `process`'s numbers of `stats.version` over the step of `function`'s rollout
    /// that began at `step_started_ms`.
    pub async fn publish_rollout_stats(
        &self,
        function: &str,
        process: &str,
        step_started_ms: i64,
        stats: &[PublishedStats],
    ) -> anyhow::Result<()> {
        on_backend!(self.publish_rollout_stats(function, process, step_started_ms, stats))
    }

    /// What every process but `except` published over the step of `function`'s rollout
    /// that began at `step_started_ms`.
    pub async fn rollout_stats(
        &self,
        function: &str,
        step_started_ms: i64,
        except: &str,
    ) -> anyhow::Result<Vec<PublishedStats>> {
        on_backend!(self.rollout_stats(function, step_started_ms, except))
    }
}
