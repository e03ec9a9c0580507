//! Progressive rollouts: started, paused, resumed and aborted by request, advanced (or
//! rolled back) by a timer that judges each step's gate, resumed after a restart. Each
//! change goes through [`App::store_policy`] with the rollout's state, so policy, history
//! and rollout are written together.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::App;
use super::traffic::{Actor, Change, TrafficError};
use crate::deploy::rollout::{Check, Verdict};
use crate::deploy::{Phase, Rollout, RolloutRequest, Routing};

/// How often running rollouts are looked at.
const TICK: Duration = Duration::from_millis(250);

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

/// Rollouts running or paused, by function.
pub(super) type ActiveRollouts = Mutex<HashMap<String, Rollout>>;

/// `v2 at 25%, step 2/4, running`: a rollout in a message.
pub(super) fn describe(r: &Rollout) -> String {
    format!(
        "v{} at {}%, step {}/{}, {}",
        r.candidate,
        r.percent(),
        r.step + 1,
        r.steps.len(),
        r.state.as_str()
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
                app.rollout_tick().await;
            }
        }
    });
}

impl App {
    pub(super) fn active(&self) -> MutexGuard<'_, HashMap<String, Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a progressive rollout of `name` to `req.to`: the first step applies at once.
    ///
    /// The stable version is the only other version with traffic in the policy in force
    /// (or, with no policy, the newest version, when the candidate is an older one).
    pub async fn start_rollout(
        &self,
        name: &str,
        req: &RolloutRequest,
        by: &Actor,
    ) -> Result<Rollout, TrafficError> {
        let (steps, interval, gates) = req
            .resolve(self.config.rollout)
            .map_err(TrafficError::InvalidRollout)?;
        let _publishing = self.publishing().await;
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
        self.store_policy(name, None, Some(&policy), change).await?;
        self.metrics.rollout_step(name);
        if r.state.active() {
            self.active().insert(name.to_string(), r.clone());
        }
        tracing::info!(function = name, from = stable, to, "rollout started");
        Ok(r)
    }

    /// `name`'s rollout: the one in progress, else the latest that ended.
    pub async fn rollout(&self, name: &str) -> Result<Option<Rollout>, TrafficError> {
        if let Some(r) = self.active().get(name) {
            return Ok(Some(r.clone()));
        }
        Ok(self.meta.rollout(name).await?)
    }

    /// Pauses, resumes or aborts `name`'s rollout in progress.
    pub async fn control_rollout(
        &self,
        name: &str,
        control: Control,
        by: &Actor,
        reason: Option<&str>,
    ) -> Result<Rollout, TrafficError> {
        let _publishing = self.publishing().await;
        self.owned(name, by)?;
        let actor = by.key_id.as_deref();
        let active = self.active().get(name).cloned();
        let mut r = match active {
            Some(r) => r,
            None => {
                return Err(match self.meta.rollout(name).await? {
                    Some(ended) => TrafficError::RolloutState(
                        name.to_string(),
                        ended.state.as_str().to_string(),
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
                )
                .await?;
                return Ok(self.meta.rollout(name).await?.unwrap_or(r));
            }
            Control::Pause => ("rollout.pause", Phase::Paused),
            Control::Resume => ("rollout.resume", Phase::Running),
        };
        if r.state == state {
            return Err(TrafficError::RolloutState(
                name.to_string(),
                r.state.as_str().to_string(),
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
        self.meta
            .record_rollout(name, actor, kind, &reason, &r)
            .await?;
        self.active().insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Ends a rollout in progress with all traffic back on its stable version; the
    /// caller holds the publishing lock.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn end_rollout(
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
        let routing = self
            .store_policy(name, None, Some(&r.stable_policy()), change)
            .await?;
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
    pub async fn rollout_tick(&self) {
        let now = crate::unix_ms();
        let due: Vec<String> = self
            .active()
            .iter()
            .filter(|(_, r)| r.due(now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Err(e) = self.advance(&name).await {
                tracing::error!(function = name, "rollout step failed: {e:#}");
            }
        }
    }

    async fn advance(&self, name: &str) -> Result<(), TrafficError> {
        let _publishing = self.publishing().await;
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
                )
                .await?;
                self.metrics.rollout_rolled_back(name);
            }
            Verdict::Pass if step == steps => {
                // The last step held below 100% and passed: the rollout is done there.
                r.state = Phase::Completed;
                r.updated_at_ms = now;
                r.outcome = Some(format!("completed at {percent}%: {why}"));
                r.last_check = Some(check);
                let reason = r.outcome.clone().unwrap_or_default();
                self.meta
                    .record_rollout(name, r.actor.as_deref(), "rollout.complete", &reason, &r)
                    .await?;
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
                self.store_policy(name, None, Some(&r.policy_at(r.step)), change)
                    .await?;
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
    pub(super) async fn resume_rollouts(&self) -> anyhow::Result<()> {
        let now = crate::unix_ms();
        let stored = self.meta.active_rollouts().await?;
        let mut active = self.active();
        for mut r in stored {
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
