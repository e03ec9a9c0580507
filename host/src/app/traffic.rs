//! Traffic changes of a function: policies set by hand (the main one and named aliases),
//! promotions between aliases, rollbacks, and progressive rollouts advanced by a timer. Every change is stored with its history entry (and the
//! rollout's state, when one is involved) in one transaction, then swapped into the
//! registry at once, all under the publishing lock, so changes apply in one order and a
//! request sees either the old policy or the new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::App;
use crate::deploy::rollout::{Check, Verdict};
use crate::deploy::{
    DEFAULT_ALIAS, Phase, Rollout, RolloutRequest, RouteError, Routing, TrafficPolicy,
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
            if app.active().values().any(|r| r.due(now_ms())) {
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
        Ok(routing)
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
        actor: Option<&str>,
        kind: &str,
        reason: &str,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let _publishing = self.publishing();
        let f = self
            .registry
            .function(name)
            .ok_or_else(|| TrafficError::NoFunction(name.to_string()))?;
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
            actor,
            kind,
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
        actor: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(Arc<Routing>, Option<TrafficPolicy>), TrafficError> {
        let _publishing = self.publishing();
        let f = self
            .registry
            .function(name)
            .ok_or_else(|| TrafficError::NoFunction(name.to_string()))?;
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
            actor,
            kind: "promote",
            reason: &reason,
            rollout: None,
            extra: None,
        };
        let routing = self
            .store_policy(name, to_alias, Some(&source), change)?
            .unwrap_or_else(|| Arc::new(Routing::new(source, 0)));
        Ok((routing, previous))
    }

    /// Puts back the traffic policy (main, or `alias`'s) in force before the current one
    /// (none at all, if the current one was the first: the newest version serves
    /// everything again; for an alias, it is removed). Rolling back twice returns to where
    /// it started: after a promote, this is the instant switch-back. During a rollout,
    /// rolling back the main policy aborts it: all traffic returns to the stable version.
    /// Returns the policy now in force.
    pub fn rollback_traffic(
        &self,
        name: &str,
        alias: Option<&str>,
        actor: Option<&str>,
        reason: &str,
    ) -> Result<Option<Arc<Routing>>, TrafficError> {
        let _publishing = self.publishing();
        if self.registry.function(name).is_none() {
            return Err(TrafficError::NoFunction(name.to_string()));
        }
        let alias = check_alias(alias)?;
        let active = match alias {
            None => self.active().get(name).cloned(),
            Some(_) => None,
        };
        if let Some(r) = active {
            let reason = format!("rollback during the rollout: {reason}");
            return self.end_rollout(name, r, Phase::Aborted, actor, "rollback", &reason, None);
        }
        let previous = self
            .meta
            .previous_traffic(name, alias)?
            .ok_or_else(|| TrafficError::NothingToRollBack(name.to_string()))?;
        let policy: Option<TrafficPolicy> =
            serde_json::from_str(&previous).map_err(anyhow::Error::from)?;
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
    /// The stable version is the one with the largest share of the policy in force (or,
    /// with no policy, the newest version other than the candidate).
    pub fn start_rollout(
        &self,
        name: &str,
        req: &RolloutRequest,
        actor: Option<&str>,
    ) -> Result<Rollout, TrafficError> {
        let (steps, interval, gates) = req
            .resolve(self.config.rollout)
            .map_err(TrafficError::InvalidRollout)?;
        let _publishing = self.publishing();
        let f = self
            .registry
            .function(name)
            .ok_or_else(|| TrafficError::NoFunction(name.to_string()))?;
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
        if current.as_ref().and_then(|p| p.weights.get(&to)) == Some(&100) {
            return Err(TrafficError::InvalidRollout(format!(
                "v{to} already serves all of {name:?}'s traffic"
            )));
        }
        let stable = match &current {
            Some(p) => p
                .weights
                .iter()
                .filter(|(v, _)| **v != to)
                .max_by_key(|(v, w)| (**w, **v))
                .map(|(v, _)| *v),
            None => f.versions.keys().rev().find(|v| **v != to).copied(),
        }
        .ok_or_else(|| {
            TrafficError::InvalidRollout(format!(
                "no stable version to roll out from: v{to} is {name:?}'s only version"
            ))
        })?;
        let now = now_ms();
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
            started_at_ms: now,
            step_started_ms: now,
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
        actor: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Rollout, TrafficError> {
        let _publishing = self.publishing();
        if self.registry.function(name).is_none() {
            return Err(TrafficError::NoFunction(name.to_string()));
        }
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
        let now = now_ms();
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
        r.updated_at_ms = now_ms();
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
        let now = now_ms();
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
        let now = now_ms();
        let Some(mut r) = self.active().get(name).filter(|r| r.due(now)).cloned() else {
            return Ok(());
        };
        let f = self.registry.function(name);
        let versions = f
            .as_ref()
            .and_then(|f| Some((f.versions.get(&r.candidate)?, f.versions.get(&r.stable)?)));
        let Some((candidate, stable)) = versions else {
            self.active().remove(name);
            return Ok(());
        };
        let window = r.window(now);
        let (cs, ss) = (candidate.stats.stats(window), stable.stats.stats(window));
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
                self.metrics.rollout_rolled_back(name);
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
        let now = now_ms();
        let mut active = self.active();
        for mut r in self.meta.active_rollouts()? {
            if r.state == Phase::Running {
                r.step_started_ms = now;
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
