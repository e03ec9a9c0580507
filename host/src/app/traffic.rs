//! Traffic changes of a function: policies set by hand (the main one and named aliases),
//! promotions between aliases and rollbacks ([`super::rollout`] drives progressive
//! rollouts through the same path). Every change is stored with its history entry (and the
//! rollout's state, when one is involved) in one transaction, then swapped into the
//! registry at once, all under the publishing lock, so changes apply in one order and a
//! request sees either the old policy or the new one.

use std::sync::Arc;

use super::App;
use super::rollout::describe;
use crate::deploy::{
    DEFAULT_ALIAS, FunctionEntry, Phase, Rollout, RouteError, Routing, TrafficPolicy,
};
use crate::store::{Expect, RolloutMoved, TrafficChange};

/// Why a traffic change was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("function {0:?} does not exist")]
    NoFunction(String),
    #[error("invalid traffic policy: {0}")]
    Invalid(String),
    #[error("invalid rollout: {0}")]
    InvalidRollout(String),
    #[error("function {0:?} has no traffic change to roll back")]
    NothingToRollBack(String),
    /// The function's traffic belongs to a rollout until it ends or is aborted.
    #[error(
        "function {0:?} has a rollout in progress ({1}); abort it first: kiln rollout {0} --abort"
    )]
    RolloutActive(String, String),
    #[error("function {0:?} has never had a rollout")]
    NoRollout(String),
    /// Pausing a paused rollout, resuming a running one, or touching one that ended.
    #[error("the rollout of {0:?} is {1}: it cannot be {2}")]
    RolloutState(String, String, &'static str),
    /// The rollout changed on another node (or by another request) after this change was
    /// decided on it.
    #[error("{}; look at it again: kiln rollout {}", .0, .0.function)]
    Moved(RolloutMoved),
    /// The policy moved past the revision the change was decided on (`If-Match`).
    #[error(transparent)]
    Stale(crate::store::StaleRevision),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl TrafficError {
    /// A store error, with a rollout that moved told apart.
    pub(super) fn stored(e: anyhow::Error) -> TrafficError {
        match e.downcast::<RolloutMoved>() {
            Ok(moved) => TrafficError::Moved(moved),
            Err(e) => match e.downcast::<crate::store::StaleRevision>() {
                Ok(stale) => TrafficError::Stale(stale),
                Err(e) => TrafficError::Internal(e),
            },
        }
    }
}

/// Checks an alias name; `default` (the main policy) becomes `None`.
fn check_alias(alias: Option<&str>) -> Result<Option<&str>, TrafficError> {
    match alias {
        None | Some(DEFAULT_ALIAS) => Ok(None),
        Some(a) => {
            crate::deploy::validate_name(a)
                .map_err(|e| TrafficError::Invalid(format!("alias: {e}")))?;
            Ok(Some(a))
        }
    }
}

/// What a hand-made change of policy `alias` expects: the main policy belongs to a rollout
/// in progress, so none may be (on any node).
fn main_policy(alias: Option<&str>) -> Expect {
    match alias {
        None => Expect::NoActiveRollout,
        Some(_) => Expect::Anything,
    }
}

/// Who asks for a traffic change: the key recorded as its actor, and the tenant whose
/// functions it may change (`None`: any, an admin).
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub key_id: Option<String>,
    pub tenant: Option<String>,
}

impl Actor {
    /// The actor of an API call (an anonymous caller owns nothing).
    pub fn of(caller: &crate::auth::Caller) -> Actor {
        Actor {
            key_id: caller.key_id().map(str::to_string),
            tenant: match caller.is_admin() {
                true => None,
                false => Some(caller.tenant().unwrap_or_default().to_string()),
            },
        }
    }
}

/// A traffic change but its policy: who, what kind, why, with what rollout and numbers.
pub(super) struct Change<'a> {
    pub actor: Option<&'a str>,
    pub kind: &'a str,
    pub reason: &'a str,
    pub rollout: Option<&'a Rollout>,
    pub extra: Option<&'a serde_json::Value>,
    /// What the change was decided on: the rollout in force, or none.
    pub expect: Expect,
    /// The policy revision the caller read (`If-Match`), when it said.
    pub if_revision: Option<u64>,
}

impl App {
    /// Function `name` as `by` may change it: another tenant's is answered as missing. Checked
    /// under the publishing lock, so a function created while the request was on its way
    /// is judged as it is now.
    pub(super) fn owned(&self, name: &str, by: &Actor) -> Result<Arc<FunctionEntry>, TrafficError> {
        self.registry
            .function(name)
            .filter(|f| by.tenant.as_deref().is_none_or(|t| *f.owner == *t))
            .ok_or_else(|| TrafficError::NoFunction(name.to_string()))
    }

    /// Stores a change of the main policy or `alias`'s (policy, history entry, rollout)
    /// and applies it, the rollout in memory too; the caller holds the publishing lock.
    pub(super) async fn store_policy(
        &self,
        name: &str,
        alias: Option<&str>,
        policy: Option<&TrafficPolicy>,
        change: Change<'_>,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let json = serde_json::to_string(&policy).map_err(anyhow::Error::from)?;
        let stored = self
            .meta
            .set_traffic(
                name,
                alias,
                &TrafficChange {
                    policy: &json,
                    actor: change.actor,
                    kind: change.kind,
                    reason: change.reason,
                    rollout: change.rollout,
                    extra: change.extra,
                    expect: change.expect,
                    if_revision: change.if_revision,
                },
            )
            .await
            .map_err(|e| self.refused(name, change.expect, e))?;
        if let (Some(r), Some(epoch)) = (change.rollout, stored.epoch) {
            self.remember_rollout(r, epoch);
        }
        let routing = policy.map(|p| Arc::new(Routing::new(p.clone(), stored.revision)));
        self.registry.set_routing(name, alias, routing.clone());
        self.keep_loaded(name);
        Ok(routing)
    }

    /// Keeps the versions function `name`'s policies need loaded (see
    /// [`FunctionEntry::kept_versions`]).
    pub(super) fn keep_loaded(&self, name: &str) {
        let ids = self
            .registry
            .function(name)
            .map(|f| f.kept_versions())
            .unwrap_or_default();
        self.runtime.keep_loaded(name, &ids);
    }

    /// Replaces function `name`'s traffic policy (or alias `alias`'s; `None` removes the
    /// alias) after checking it against its versions; stored with a history entry
    /// (`kind`, `reason`, `actor`), then applied at once. The main policy is refused while
    /// a rollout owns it.
    pub async fn set_traffic(
        &self,
        name: &str,
        alias: Option<&str>,
        policy: Option<TrafficPolicy>,
        by: &Actor,
        reason: &str,
        if_revision: Option<u64>,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let _publishing = self.publishing().await;
        let f = self.owned(name, by)?;
        let alias = check_alias(alias)?;
        if alias.is_none()
            && let Some(r) = self.active().get(name)
        {
            return Err(TrafficError::RolloutActive(name.to_string(), describe(r)));
        }
        if let (Some(a), None) = (alias, &policy)
            && !f.aliases.contains_key(a)
        {
            return Err(TrafficError::Route(RouteError::NoAlias(
                name.to_string(),
                a.to_string(),
            )));
        }
        if let Some(p) = &policy {
            p.validate(&f.versions.keys().copied().collect())
                .map_err(TrafficError::Invalid)?;
        }
        let change = Change {
            actor: by.key_id.as_deref(),
            kind: "traffic",
            reason,
            rollout: None,
            extra: None,
            expect: main_policy(alias),
            if_revision,
        };
        self.store_policy(name, alias, policy.as_ref(), change)
            .await
    }

    /// Copies the policy of `from` onto `to` (aliases; `default` is the main policy) in one
    /// change: blue-green is promoting the alias that holds the new version. Returns the
    /// policy now in force at `to` and the one it replaced.
    pub async fn promote(
        &self,
        name: &str,
        from: &str,
        to: &str,
        by: &Actor,
        reason: Option<&str>,
    ) -> Result<(Arc<Routing>, Option<TrafficPolicy>), TrafficError> {
        let _publishing = self.publishing().await;
        let f = self.owned(name, by)?;
        if from == to {
            return Err(TrafficError::Invalid(format!(
                "promote from {from:?} to itself"
            )));
        }
        let (from_alias, to_alias) = (check_alias(Some(from))?, check_alias(Some(to))?);
        let source = f
            .routing_for(from_alias)?
            .map(|r| r.policy.clone())
            .ok_or_else(|| {
                TrafficError::Invalid(format!(
                    "{from:?} has no traffic policy to promote (the newest version serves it)"
                ))
            })?;
        let previous = f
            .routing_for(to_alias)
            .ok()
            .flatten()
            .map(|r| r.policy.clone());
        if to_alias.is_none()
            && let Some(r) = self.active().get(name)
        {
            return Err(TrafficError::RolloutActive(name.to_string(), describe(r)));
        }
        let reason = match reason {
            Some(r) => format!("promoted from {from}: {r}"),
            None => format!("promoted from {from}"),
        };
        let change = Change {
            actor: by.key_id.as_deref(),
            kind: "promote",
            reason: &reason,
            rollout: None,
            extra: None,
            expect: main_policy(to_alias),
            if_revision: None,
        };
        let routing = self
            .store_policy(name, to_alias, Some(&source), change)
            .await?
            .ok_or_else(|| anyhow::anyhow!("promote of {name} stored no policy"))?;
        Ok((routing, previous))
    }

    /// Puts back the traffic policy (main, or `alias`'s) in force before the current one
    /// (none at all, if the current one was the first: the newest version serves
    /// everything again; for an alias, it is removed). Rolling back twice returns to where
    /// it started: after a promote, this is the instant switch-back. During a rollout,
    /// rolling back the main policy aborts it (all traffic returns to the stable version);
    /// after a rollout it returns to the policy in force before the rollout started.
    /// Returns the policy now in force.
    pub async fn rollback_traffic(
        &self,
        name: &str,
        alias: Option<&str>,
        by: &Actor,
        reason: &str,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        match self.rollback_once(name, alias, by, reason).await {
            // This node's memory was a moment behind another's change of the rollout (now
            // remembered): decide again on what is stored.
            Err(TrafficError::Moved(_) | TrafficError::RolloutActive(..)) => {
                self.rollback_once(name, alias, by, reason).await
            }
            done => done,
        }
    }

    async fn rollback_once(
        &self,
        name: &str,
        alias: Option<&str>,
        by: &Actor,
        reason: &str,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let _publishing = self.publishing().await;
        self.owned(name, by)?;
        let alias = check_alias(alias)?;
        let active = match alias {
            None => self.active().get(name).cloned(),
            Some(_) => None,
        };
        let actor = by.key_id.as_deref();
        if let Some(r) = active {
            let reason = format!("rolled back during the rollout: {reason}");
            return self
                .end_rollout(
                    name,
                    r,
                    Phase::Aborted,
                    actor,
                    "rollout.abort",
                    &reason,
                    None,
                )
                .await;
        }
        let (kind, previous) = self
            .meta
            .previous_traffic(name, alias)
            .await?
            .ok_or_else(|| TrafficError::NothingToRollBack(name.to_string()))?;
        let policy: Option<TrafficPolicy> = match (alias, kind.starts_with("rollout.")) {
            // The steps of a rollout are one change: undone together.
            (None, true) => self.meta.rollout(name).await?.and_then(|r| r.before),
            _ => serde_json::from_str(&previous).map_err(anyhow::Error::from)?,
        };
        let change = Change {
            actor,
            kind: "rollback",
            reason,
            rollout: None,
            extra: None,
            expect: main_policy(alias),
            if_revision: None,
        };
        self.store_policy(name, alias, policy.as_ref(), change)
            .await
    }
}
