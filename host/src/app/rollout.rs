//! Progressive rollouts: started, paused, resumed and aborted by request, advanced (or
//! rolled back) by a timer that judges each step's gate, resumed after a restart. Each
//! change goes through [`App::store_policy`] with the rollout's state, so policy, history
//! and rollout are written together.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::App;
use super::traffic::{Actor, Change, TrafficError};
use crate::deploy::rollout::{Check, DEFAULT_MIN_LABELS, ModelCheck, Verdict};
use crate::deploy::{Phase, Rollout, RolloutRequest, Routing, VersionEntry};
use crate::meter::{Aggregate, Stats};
use crate::store::{Expect, RolloutMoved};

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
            let now = crate::unix_ms();
            if app
                .active()
                .iter()
                .any(|(name, r)| r.due(now) && app.drives(name))
            {
                app.rollout_tick().await;
            }
        }
    });
}

impl App {
    pub(super) fn active(&self) -> MutexGuard<'_, HashMap<String, Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `r`, just stored at `epoch`, as the function's rollout in memory (or drops it,
    /// when it ended).
    pub(super) fn remember_rollout(&self, r: &Rollout, epoch: u64) {
        let mut active = self.active();
        if r.state.active() {
            let mut r = r.clone();
            r.epoch = epoch;
            active.insert(r.function.clone(), r);
        } else {
            active.remove(&r.function);
            self.drop_lease(&r.function);
        }
    }

    /// Takes in what a refused change found stored, unless memory already knows better.
    pub(super) fn adopt(&self, moved: &RolloutMoved) {
        let mut active = self.active();
        let newer = active
            .get(&moved.function)
            .is_none_or(|r| r.epoch <= moved.epoch);
        if !newer {
            return;
        }
        match &moved.now {
            Some(r) => {
                active.insert(moved.function.clone(), (**r).clone());
            }
            None => {
                active.remove(&moved.function);
            }
        }
        if moved
            .now
            .as_ref()
            .is_none_or(|r| r.driver.as_deref() != Some(&self.node_id))
        {
            self.drop_lease(&moved.function);
        }
    }

    /// A store error of a change of `name` decided on `expect`: a rollout that moved is
    /// remembered as it now is, and one in progress where none was expected is answered as
    /// such.
    pub(super) fn refused(&self, name: &str, expect: Expect, e: anyhow::Error) -> TrafficError {
        match TrafficError::stored(e) {
            TrafficError::Moved(moved) => {
                self.adopt(&moved);
                match (&moved.now, expect) {
                    (Some(r), Expect::NoActiveRollout) => {
                        TrafficError::RolloutActive(name.to_string(), describe(r))
                    }
                    _ => TrafficError::Moved(moved),
                }
            }
            other => other,
        }
    }

    /// Stores a rollout change that moves no traffic (paused, resumed, completed where it
    /// stands) decided on the rollout at `r.epoch`, and remembers it.
    async fn save_rollout(
        &self,
        r: &Rollout,
        actor: Option<&str>,
        kind: &str,
        reason: &str,
    ) -> Result<(), TrafficError> {
        let epoch = self
            .meta
            .record_rollout(&r.function, actor, kind, reason, r, r.epoch)
            .await
            .map_err(|e| self.refused(&r.function, Expect::Epoch(r.epoch), e))?;
        self.remember_rollout(r, epoch);
        Ok(())
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
        let publishing = self.publishing().await;
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
            epoch: 0,
            driver: None,
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
            expect: Expect::NoActiveRollout,
            if_revision: None,
        };
        self.store_policy(name, None, Some(&policy), change).await?;
        self.metrics.rollout_step(name);
        tracing::info!(function = name, from = stable, to, "rollout started");
        drop(publishing);
        // The node that started it drives it, unless another is quicker to the lease.
        self.take_lease(name).await;
        Ok(self.active().get(name).cloned().unwrap_or(r))
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
        match self.control_once(name, control, by, reason).await {
            // Decided on a state another node had moved on from (now remembered): again.
            Err(TrafficError::Moved(_)) => self.control_once(name, control, by, reason).await,
            done => done,
        }
    }

    async fn control_once(
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
        self.save_rollout(&r, actor, kind, &reason).await?;
        Ok(self.active().get(name).cloned().unwrap_or(r))
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
            expect: Expect::Epoch(r.epoch),
            if_revision: None,
        };
        let routing = self
            .store_policy(name, None, Some(&r.stable_policy()), change)
            .await?;
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
            .filter(|(n, r)| r.due(now) && self.drives(n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            match self.advance(&name).await {
                Ok(()) => {}
                // Fenced off: another node took the lease, or a person changed the
                // rollout; what it found is remembered.
                Err(TrafficError::Moved(m)) => {
                    tracing::info!(function = name, "rollout step not written: {m}");
                }
                Err(e) => tracing::error!(function = name, "rollout step failed: {e:#}"),
            }
        }
    }

    async fn advance(&self, name: &str) -> Result<(), TrafficError> {
        let _publishing = self.publishing().await;
        let now = crate::unix_ms();
        let Some(mut r) = self.active().get(name).filter(|r| r.due(now)).cloned() else {
            return Ok(());
        };
        if !self.drives(name) {
            return Ok(());
        }
        // A step waiting for requests is looked at again once its numbers can have moved
        // (nodes publish theirs every heartbeat), not at every tick.
        if r.last_check.as_ref().is_some_and(|c| {
            c.verdict == Verdict::Wait
                && now.saturating_sub(c.at_ms) < super::HEARTBEAT_EVERY.as_millis() as i64
        }) {
            return Ok(());
        }
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
        let (cs, ss) = self
            .cluster_stats(&r, (candidate, stable), &seconds)
            .await?;
        let (mut verdict, mut why) = r.judge(&cs, &ss);
        let models = self.model_check(&r, (candidate, stable), now).await;
        let mut model_alert = None;
        if verdict != Verdict::Fail
            && let Some((alert, failed)) = models.as_ref().and_then(|m| r.judge_models(m))
        {
            (verdict, why) = (Verdict::Fail, failed);
            model_alert = Some(alert);
        }
        // The accuracy gate holds a step until both versions have their labels.
        if verdict == Verdict::Pass
            && let Some(waiting) = models.as_ref().and_then(|m| m.waiting.clone())
        {
            (verdict, why) = (Verdict::Wait, waiting);
        }
        let check = Check {
            at_ms: now,
            verdict,
            reason: why.clone(),
            candidate: cs,
            stable: ss,
            models,
        };
        let (step, steps, percent) = (r.step + 1, r.steps.len(), r.percent());
        match verdict {
            Verdict::Wait => {
                // Only onto the state it was judged on: memory may have moved since.
                if let Some(m) = self.active().get_mut(name)
                    && m.epoch == r.epoch
                {
                    m.last_check = Some(check);
                }
            }
            Verdict::Fail => {
                let reason =
                    format!("automatic rollback at step {step}/{steps} ({percent}%): {why}");
                let event = serde_json::json!({
                    "function": name,
                    "candidate": r.candidate,
                    "stable": r.stable,
                    "step": step,
                    "percent": percent,
                    "reason": reason,
                    "check": check,
                });
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
                // Only once the rollback is stored: a fenced-off write raises nothing.
                if let Some(alert) = model_alert {
                    self.alerts.send(alert, event.clone());
                }
                self.alerts.send("rollout.rolled_back", event);
            }
            Verdict::Pass if step == steps => {
                // The last step held below 100% and passed: the rollout is done there.
                r.state = Phase::Completed;
                r.updated_at_ms = now;
                r.outcome = Some(format!("completed at {percent}%: {why}"));
                r.last_check = Some(check);
                let reason = r.outcome.clone().unwrap_or_default();
                self.save_rollout(&r, r.actor.as_deref(), "rollout.complete", &reason)
                    .await?;
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
                    expect: Expect::Epoch(r.epoch),
                    if_revision: None,
                };
                self.store_policy(name, None, Some(&r.policy_at(r.step)), change)
                    .await?;
                self.metrics.rollout_step(name);
            }
        }
        Ok(())
    }

    /// The candidate's and the stable version's numbers over `seconds` on every node:
    /// this one's, and what the others published for the same step (a node that died
    /// meanwhile counts with what it published).
    async fn cluster_stats(
        &self,
        r: &Rollout,
        (candidate, stable): (&VersionEntry, &VersionEntry),
        seconds: &std::ops::Range<u64>,
    ) -> Result<(Stats, Stats), TrafficError> {
        let mut cs = candidate.routed.aggregate_in(seconds);
        let mut ss = stable.routed.aggregate_in(seconds);
        let published = self
            .meta
            .rollout_stats(&r.function, r.step_started_ms, &self.process)
            .await?;
        for p in published {
            let into = match p.version {
                v if v == r.candidate => &mut cs,
                v if v == r.stable => &mut ss,
                _ => continue,
            };
            match serde_json::from_str::<Aggregate>(&p.stats) {
                Ok(a) => into.merge(&a),
                Err(e) => tracing::error!(
                    function = r.function,
                    "published rollout numbers unreadable: {e}"
                ),
            }
        }
        let window_s = seconds.end.saturating_sub(seconds.start);
        Ok((cs.stats(window_s), ss.stats(window_s)))
    }

    /// The model gates' numbers, for the gates the rollout has: the candidate's drift from
    /// the stable version over the step (on every node's summaries), and both versions'
    /// accuracy on the feedback since the rollout started (from the ledger: every node's
    /// requests). `None` when it has no model gate.
    async fn model_check(
        &self,
        r: &Rollout,
        (candidate, stable): (&VersionEntry, &VersionEntry),
        now: i64,
    ) -> Option<ModelCheck> {
        let g = &r.gates;
        if g.max_drift.is_none() && g.max_accuracy_drop.is_none() {
            return None;
        }
        let mut m = ModelCheck::default();
        if g.max_drift.is_some() {
            let window_ms = r.elapsed(now).as_millis() as u64;
            for (name, cm) in candidate.models.monitors() {
                let Some(sm) = stable.models.monitor(name) else {
                    continue;
                };
                // Reading the windows prepares monitors this node has not yet.
                let key_c = (r.function.as_str(), r.candidate);
                let key_s = (r.function.as_str(), r.stable);
                let (cw, sw) = (
                    self.model_window(key_c, &candidate.models, cm, window_ms)
                        .await,
                    self.model_window(key_s, &stable.models, sm, window_ms)
                        .await,
                );
                let (Some(cw), Some(sw)) = (cw, sw) else {
                    m.waiting = Some(format!("the monitors of model {name} are not ready"));
                    continue;
                };
                if cw.partial || sw.partial {
                    m.waiting = Some(format!(
                        "other nodes' monitor buckets of model {name} could not be read"
                    ));
                    continue;
                }
                let d = match crate::monitor::compare(cm, sm, &cw.counts, &sw.counts) {
                    None => continue,
                    Some(Ok(d)) => d,
                    Some(Err((c, s))) => {
                        m.waiting = Some(format!(
                            "waiting for {} rows of model {name} on both versions in the step (candidate v{} has {c}, stable v{} has {s})",
                            crate::monitor::MIN_SAMPLES,
                            r.candidate,
                            r.stable
                        ));
                        continue;
                    }
                };
                let mut worst = (0.0f64, String::new());
                for input in &d.inputs {
                    for f in &input.features {
                        if f.score > worst.0 {
                            worst = (f.score, format!("{name} {}[{}]", f.input, f.index));
                        }
                    }
                }
                if let Some(p) = &d.predictions
                    && p.score > worst.0
                {
                    worst = (p.score, format!("{name} predictions"));
                }
                if m.drift.is_none_or(|d| worst.0 > d) {
                    m.drift = Some(worst.0);
                    m.drift_on = Some(worst.1);
                }
            }
        }
        if g.max_accuracy_drop.is_some()
            && let Some(ledger) = &self.ledger
        {
            let min = g.min_labels.unwrap_or(DEFAULT_MIN_LABELS);
            let quality =
                |v: u32| crate::monitor::feedback::quality(ledger, &r.function, v, r.started_at_ms);
            match (quality(r.candidate).await, quality(r.stable).await) {
                (Ok(c), Ok(s)) => {
                    m.candidate_labelled = Some(c.labelled);
                    m.stable_labelled = Some(s.labelled);
                    if c.labelled >= min && s.labelled >= min {
                        m.candidate_accuracy = c.accuracy;
                        m.stable_accuracy = s.accuracy;
                    } else {
                        m.waiting = Some(format!(
                            "waiting for {min} labelled requests per version since the rollout started (candidate v{} has {}, stable v{} has {})",
                            r.candidate, c.labelled, r.stable, s.labelled
                        ));
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    m.waiting = Some(format!("the accuracy gate cannot read feedback: {e:#}"));
                }
            }
        }
        Some(m)
    }

    /// Drops `name`'s rollout from memory (the function was deleted).
    pub(super) fn forget_rollout(&self, name: &str) {
        self.active().remove(name);
        self.drop_lease(name);
    }
}
