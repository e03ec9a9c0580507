//! Traffic changes of a function: policies set by hand (the main one and named aliases),
//! promotions between aliases, rollbacks, and progressive rollouts advanced by a timer. Every change is stored with its history entry (and the
//! rollout's state, when one is involved) in one transaction, then swapped into the
//! registry at once, all under the publishing lock, so changes apply in one order and a
//! request sees either the old policy or the new one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::App;
use crate::deploy::rollout::{Check, Verdict};
use crate::deploy::{
    DEFAULT_ALIAS, FunctionEntry, Phase, Rollout, RolloutRequest, RouteError, Routing,
    TrafficPolicy,
};
use crate::store::TrafficChange;

/// How often running rollouts are looked at.
const TICK: Duration = Duration::from_millis(250);

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
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
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

/// What a person can do to a rollout in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Hold the current weights; gates are not judged.
    Pause,
    /// Go on from the current step, with a fresh window.
    Resume,
    /// Stop, and put all traffic back on the stable version.
    Abort,
}

impl Control {
    fn past(self) -> &'static str {
        match self {
            Control::Pause => "paused",
            Control::Resume => "resumed",
            Control::Abort => "aborted",
        }
    }
}

/// A traffic change but its policy: who, what kind, why, with what rollout and numbers.
struct Change<'a> {
    actor: Option<&'a str>,
    kind: &'a str,
    reason: &'a str,
    rollout: Option<&'a Rollout>,
    extra: Option<&'a serde_json::Value>,
}

/// Rollouts running or paused, by function.
pub(super) type ActiveRollouts = Mutex<HashMap<String, Rollout>>;

fn state_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn describe(r: &Rollout) -> String {
    format!(
        "v{} at {}%, step {}/{}, {}",
        r.candidate,
        r.percent(),
        r.step + 1,
        r.steps.len(),
        state_name(r.state)
    )
}

/// Runs [`App::rollout_tick`] every [`TICK`] while the app lives.
pub(super) fn spawn_rollout_driver(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { return };
            if app.active().values().any(|r| r.due(crate::unix_ms())) {
                let _ = tokio::task::spawn_blocking(move || app.rollout_tick()).await;
            }
        }
    });
}

impl App {
    fn active(&self) -> MutexGuard<'_, HashMap<String, Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publishing(&self) -> MutexGuard<'_, ()> {
        self.publishing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Function `name` as `by` may change it: another tenant's is answered as missing. Checked
    /// under the publishing lock, so a function created while the request was on its way
    /// is judged as it is now.
    fn owned(&self, name: &str, by: &Actor) -> Result<Arc<FunctionEntry>, TrafficError> {
        self.registry
            .function(name)
            .filter(|f| by.tenant.as_deref().is_none_or(|t| *f.owner == *t))
            .ok_or_else(|| TrafficError::NoFunction(name.to_string()))
    }

    /// Stores a change of the main policy or `alias`'s (policy, history entry, rollout)
    /// and applies it; the caller holds the publishing lock.
    fn store_policy(
        &self,
        name: &str,
        alias: Option<&str>,
        policy: Option<&TrafficPolicy>,
        change: Change<'_>,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let json = serde_json::to_string(&policy).map_err(anyhow::Error::from)?;
        let revision = self.meta.set_traffic(
            name,
            alias,
            &TrafficChange {
                policy: &json,
                actor: change.actor,
                kind: change.kind,
                reason: change.reason,
                rollout: change.rollout,
                extra: change.extra,
            },
        )?;
        let routing = policy.map(|p| Arc::new(Routing::new(p.clone(), revision)));
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
    pub fn set_traffic(
        &self,
        name: &str,
        alias: Option<&str>,
        policy: Option<TrafficPolicy>,
        by: &Actor,
        reason: &str,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let _publishing = self.publishing();
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
        };
        self.store_policy(name, alias, policy.as_ref(), change)
    }

    /// Copies the policy of `from` onto `to` (aliases; `default` is the main policy) in one
    /// change: blue-green is promoting the alias that holds the new version. Returns the
    /// policy now in force at `to` and the one it replaced.
    pub fn promote(
        &self,
        name: &str,
        from: &str,
        to: &str,
        by: &Actor,
        reason: Option<&str>,
    ) -> Result<(Arc<Routing>, Option<TrafficPolicy>), TrafficError> {
        let _publishing = self.publishing();
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
        };
        let routing = self
            .store_policy(name, to_alias, Some(&source), change)?
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
    pub fn rollback_traffic(
        &self,
        name: &str,
        alias: Option<&str>,
        by: &Actor,
        reason: &str,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let _publishing = self.publishing();
        self.owned(name, by)?;
        let alias = check_alias(alias)?;
        let active = match alias {
            None => self.active().get(name).cloned(),
            Some(_) => None,
        };
        let actor = by.key_id.as_deref();
        if let Some(r) = active {
            let reason = format!("rolled back during the rollout: {reason}");
            return self.end_rollout(
                name,
                r,
                Phase::Aborted,
                actor,
                "rollout.abort",
                &reason,
                None,
            );
        }
        let (kind, previous) = self
            .meta
            .previous_traffic(name, alias)?
            .ok_or_else(|| TrafficError::NothingToRollBack(name.to_string()))?;
        let policy: Option<TrafficPolicy> = match (alias, kind.starts_with("rollout.")) {
            // The steps of a rollout are one change: undone together.
            (None, true) => self.meta.rollout(name)?.and_then(|r| r.before),
            _ => serde_json::from_str(&previous).map_err(anyhow::Error::from)?,
        };
        let change = Change {
            actor,
            kind: "rollback",
            reason,
            rollout: None,
            extra: None,
        };
        self.store_policy(name, alias, policy.as_ref(), change)
    }

    /// Starts a progressive rollout of `name` to `req.to`: the first step applies at once.
    ///
    /// The stable version is the only other version with traffic in the policy in force
    /// (or, with no policy, the newest version, when the candidate is an older one).
    pub fn start_rollout(
        &self,
        name: &str,
        req: &RolloutRequest,
        by: &Actor,
    ) -> Result<Rollout, TrafficError> {
        let (steps, interval, gates) = req
            .resolve(self.config.rollout)
            .map_err(TrafficError::InvalidRollout)?;
        let _publishing = self.publishing();
        let f = self.owned(name, by)?;
        let actor = by.key_id.as_deref();
        if let Some(r) = self.active().get(name) {
            return Err(TrafficError::RolloutActive(name.to_string(), describe(r)));
        }
        let to = req.to;
        if !f.versions.contains_key(&to) {
            return Err(TrafficError::InvalidRollout(format!(
                "function {name:?} has no version {to}"
            )));
        }
        let current = f.routing.as_ref().map(|r| r.policy.clone());
        let invalid = |why: String| Err(TrafficError::InvalidRollout(why));
        let newest = f.latest().map_or(0, |v| v.record.version);
        // Who serves now, the candidate's share included.
        let serving: BTreeMap<u32, u8> = match &current {
            Some(p) => p
                .weights
                .iter()
                .filter(|(_, w)| **w > 0)
                .map(|(v, w)| (*v, *w))
                .collect(),
            None => [(newest, 100)].into(),
        };
        let share = serving.get(&to).copied().unwrap_or(0);
        let others: Vec<u32> = serving.keys().copied().filter(|v| *v != to).collect();
        let stable = match others[..] {
            [stable] => stable,
            [] if current.is_none() => {
                return invalid(format!(
                    "{name:?} has no traffic policy, so its newest version, v{to}, already serves everything; pin the version it replaces first (kiln traffic {name} <v>=100), then roll out"
                ));
            }
            [] => return invalid(format!("v{to} already serves all of {name:?}'s traffic")),
            _ => {
                return invalid(format!(
                    "{name:?}'s traffic is split between versions {others:?}; a rollout moves it from one stable version: set the policy to one version first"
                ));
            }
        };
        if steps[0] < share {
            return invalid(format!(
                "the first step ({}%) is below v{to}'s current share ({share}%)",
                steps[0]
            ));
        }
        let now = crate::unix_ms();
        let mut r = Rollout {
            function: name.to_string(),
            candidate: to,
            stable,
            steps,
            step: 0,
            interval_ms: interval.as_millis() as u64,
            gates,
            state: Phase::Running,
            sticky: current.as_ref().and_then(|p| p.sticky.clone()),
            shadow: current.as_ref().and_then(|p| p.shadow),
            actor: actor.map(str::to_string),
            before: current.clone(),
            started_at_ms: now,
            step_started_ms: now,
            step_started: Some(std::time::Instant::now()),
            updated_at_ms: now,
            outcome: None,
            last_check: None,
        };
        let policy = r.policy_at(0);
        policy
            .validate(&f.versions.keys().copied().collect())
            .map_err(TrafficError::InvalidRollout)?;
        if r.steps.len() == 1 && r.percent() == 100 {
            r.state = Phase::Completed;
            r.outcome = Some(format!("completed: v{to} serves 100%"));
        }
        let reason = format!(
            "rollout from v{stable} to v{to} started: step 1/{}: v{to} at {}%",
            r.steps.len(),
            r.percent()
        );
        let change = Change {
            actor,
            kind: "rollout.step",
            reason: &reason,
            rollout: Some(&r),
            extra: None,
        };
        self.store_policy(name, None, Some(&policy), change)?;
        self.metrics.rollout_step(name);
        if r.state.active() {
            self.active().insert(name.to_string(), r.clone());
        }
        tracing::info!(function = name, from = stable, to, "rollout started");
        Ok(r)
    }

    /// `name`'s rollout: the one in progress, else the latest that ended.
    pub fn rollout(&self, name: &str) -> Result<Option<Rollout>, TrafficError> {
        if let Some(r) = self.active().get(name) {
            return Ok(Some(r.clone()));
        }
        Ok(self.meta.rollout(name)?)
    }

    /// Pauses, resumes or aborts `name`'s rollout in progress.
    pub fn control_rollout(
        &self,
        name: &str,
        control: Control,
        by: &Actor,
        reason: Option<&str>,
    ) -> Result<Rollout, TrafficError> {
        let _publishing = self.publishing();
        self.owned(name, by)?;
        let actor = by.key_id.as_deref();
        let active = self.active().get(name).cloned();
        let mut r = match active {
            Some(r) => r,
            None => {
                return Err(match self.meta.rollout(name)? {
                    Some(ended) => TrafficError::RolloutState(
                        name.to_string(),
                        state_name(ended.state),
                        control.past(),
                    ),
                    None => TrafficError::NoRollout(name.to_string()),
                });
            }
        };
        let reason = reason
            .map(str::to_string)
            .unwrap_or_else(|| format!("rollout {} by request", control.past()));
        let now = crate::unix_ms();
        let (kind, state) = match control {
            Control::Abort => {
                self.end_rollout(
                    name,
                    r.clone(),
                    Phase::Aborted,
                    actor,
                    "rollout.abort",
                    &reason,
                    None,
                )?;
                return Ok(self.meta.rollout(name)?.unwrap_or(r));
            }
            Control::Pause => ("rollout.pause", Phase::Paused),
            Control::Resume => ("rollout.resume", Phase::Running),
        };
        if r.state == state {
            return Err(TrafficError::RolloutState(
                name.to_string(),
                state_name(r.state),
                control.past(),
            ));
        }
        r.state = state;
        r.updated_at_ms = now;
        if state == Phase::Running {
            // The step is judged on what the candidate does from now on.
            r.step_started_ms = now;
            r.step_started = Some(std::time::Instant::now());
            r.last_check = None;
        }
        self.meta.record_rollout(name, actor, kind, &reason, &r)?;
        self.active().insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Ends a rollout in progress with all traffic back on its stable version; the
    /// caller holds the publishing lock.
    #[allow(clippy::too_many_arguments)]
    fn end_rollout(
        &self,
        name: &str,
        mut r: Rollout,
        state: Phase,
        actor: Option<&str>,
        kind: &str,
        reason: &str,
        check: Option<Check>,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        r.state = state;
        r.outcome = Some(reason.to_string());
        r.updated_at_ms = crate::unix_ms();
        let extra = check
            .as_ref()
            .map(|c| serde_json::to_value(c).unwrap_or_default());
        if check.is_some() {
            r.last_check = check;
        }
        let change = Change {
            actor,
            kind,
            reason,
            rollout: Some(&r),
            extra: extra.as_ref(),
        };
        let routing = self.store_policy(name, None, Some(&r.stable_policy()), change)?;
        self.active().remove(name);
        tracing::warn!(
            function = name,
            candidate = r.candidate,
            stable = r.stable,
            "{reason}"
        );
        Ok(routing)
    }

    /// Judges every running rollout whose step is over: advances it, or rolls it back.
    pub fn rollout_tick(&self) {
        let now = crate::unix_ms();
        let due: Vec<String> = self
            .active()
            .iter()
            .filter(|(_, r)| r.due(now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Err(e) = self.advance(&name) {
                tracing::error!(function = name, "rollout step failed: {e:#}");
            }
        }
    }

    fn advance(&self, name: &str) -> Result<(), TrafficError> {
        let _publishing = self.publishing();
        let now = crate::unix_ms();
        let Some(mut r) = self.active().get(name).filter(|r| r.due(now)).cloned() else {
            return Ok(());
        };
        // Versions are never deleted alone, and deleting the function forgets its rollout.
        let f = self.registry.function(name);
        let (candidate, stable) = f
            .as_ref()
            .and_then(|f| Some((f.versions.get(&r.candidate)?, f.versions.get(&r.stable)?)))
            .ok_or_else(|| anyhow::anyhow!("the versions of {name:?}'s rollout are gone"))?;
        // The same whole seconds for both, all inside the step.
        let seconds = crate::meter::ended_seconds(r.elapsed(now));
        if !r.window_full(seconds.end - seconds.start) {
            return Ok(());
        }
        let (cs, ss) = (
            candidate.routed.stats_in(&seconds),
            stable.routed.stats_in(&seconds),
        );
        let (verdict, why) = r.judge(&cs, &ss);
        let check = Check {
            at_ms: now,
            verdict,
            reason: why.clone(),
            candidate: cs,
            stable: ss,
        };
        let (step, steps, percent) = (r.step + 1, r.steps.len(), r.percent());
        match verdict {
            Verdict::Wait => {
                r.last_check = Some(check);
                self.active().insert(name.to_string(), r);
            }
            Verdict::Fail => {
                let reason =
                    format!("automatic rollback at step {step}/{steps} ({percent}%): {why}");
                let actor = r.actor.clone();
                self.end_rollout(
                    name,
                    r,
                    Phase::RolledBack,
                    actor.as_deref(),
                    "rollout.rollback",
                    &reason,
                    Some(check),
                )?;
                self.metrics.rollout_rolled_back(name);
            }
            Verdict::Pass if step == steps => {
                // The last step held below 100% and passed: the rollout is done there.
                r.state = Phase::Completed;
                r.updated_at_ms = now;
                r.outcome = Some(format!("completed at {percent}%: {why}"));
                r.last_check = Some(check);
                let reason = r.outcome.clone().unwrap_or_default();
                self.meta.record_rollout(
                    name,
                    r.actor.as_deref(),
                    "rollout.complete",
                    &reason,
                    &r,
                )?;
                self.active().remove(name);
            }
            Verdict::Pass => {
                r.step += 1;
                r.step_started_ms = now;
                r.step_started = Some(std::time::Instant::now());
                r.updated_at_ms = now;
                r.last_check = Some(check.clone());
                let percent = r.percent();
                if r.step + 1 == steps && percent == 100 {
                    r.state = Phase::Completed;
                    r.outcome = Some(format!("completed: v{} serves 100%", r.candidate));
                }
                let reason = format!(
                    "step {}/{steps}: v{} at {percent}% ({why})",
                    r.step + 1,
                    r.candidate
                );
                let extra = serde_json::to_value(&check).unwrap_or_default();
                let change = Change {
                    actor: r.actor.as_deref(),
                    kind: "rollout.step",
                    reason: &reason,
                    rollout: Some(&r),
                    extra: Some(&extra),
                };
                self.store_policy(name, None, Some(&r.policy_at(r.step)), change)?;
                self.metrics.rollout_step(name);
                match r.state.active() {
                    true => self.active().insert(name.to_string(), r),
                    false => self.active().remove(name),
                };
            }
        }
        Ok(())
    }

    /// Loads the rollouts in progress at start. A running one starts its step's window
    /// again: the statistics it was judged on lived in memory.
    pub(super) fn resume_rollouts(&self) -> anyhow::Result<()> {
        let now = crate::unix_ms();
        let mut active = self.active();
        for mut r in self.meta.active_rollouts()? {
            if r.state == Phase::Running {
                r.step_started_ms = now;
                r.step_started = Some(std::time::Instant::now());
            }
            tracing::info!(function = r.function, "rollout resumed: {}", describe(&r));
            active.insert(r.function.clone(), r);
        }
        Ok(())
    }

    /// Drops `name`'s rollout from memory (the function was deleted).
    pub(super) fn forget_rollout(&self, name: &str) {
        self.active().remove(name);
    }
}
