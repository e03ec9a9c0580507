//! Progressive rollouts: move a function's traffic from its stable version to a candidate
//! step by step (5%, 25%, 50%, 100%...), judging the candidate at the end of each step
//! against the stable version over that step's window, and returning all traffic to the
//! stable version the moment a gate fails.
//!
//! This module is the pure part: the request, the state kept in the database, the weights
//! of each step and the health gates. `App` drives it (on a timer, under the publishing
//! lock) and stores each change with its history entry.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::traffic::{Shadow, Sticky, TrafficPolicy};
use crate::meter::Stats;

/// Steps when a rollout names none.
pub const DEFAULT_STEPS: [u8; 4] = [5, 25, 50, 100];
/// Step interval when a rollout names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Latencies under this are "fast enough": p99s are compared from this floor, so two
/// sub-millisecond versions are not judged on scheduler noise.
pub const LATENCY_FLOOR_MS: f64 = 1.0;

/// Thresholds of the health gates (`[rollout]` in the server config, or per rollout).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Candidate requests a step's window needs before its gate is judged; the step waits
    /// for them.
    pub min_requests: u64,
    /// Highest candidate error rate (5xx, traps, timeouts), 0 to 1, tolerated when the
    /// stable version does better.
    pub max_error_rate: f64,
    /// Highest ratio of candidate p99 to stable p99 (both from a 1 ms floor).
    pub max_p99_ratio: f64,
    /// Highest drift of the candidate's model inputs and predictions from the stable
    /// version's over the step (PSI per feature, L-infinity on class shares); label-free:
    /// the step waits until both have enough rows of each model they monitor alike.
    /// Unset: not judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_drift: Option<f64>,
    /// Labelled requests (feedback) each version needs since the rollout started before
    /// their accuracies are compared (default 50 when `max_accuracy_drop` is set); the step
    /// waits for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_labels: Option<u64>,
    /// Largest accuracy the candidate may lose against the stable version (0.05: five
    /// points). Unset: not judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            min_requests: 20,
            max_error_rate: 0.05,
            max_p99_ratio: 2.0,
            max_drift: None,
            min_labels: None,
            max_accuracy_drop: None,
        }
    }
}

/// Labelled requests per version before accuracies are compared, when a rollout names no
/// `min_labels`.
pub const DEFAULT_MIN_LABELS: u64 = 50;

impl Gates {
    /// Checks the thresholds' ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_requests == 0 {
            return Err("min_requests must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err(format!(
                "max_error_rate {} is not a fraction from 0 to 1 (0.05 is 5%)",
                self.max_error_rate
            ));
        }
        if let Some(d) = self.max_drift
            && !(d.is_finite() && d > 0.0)
        {
            return Err(format!(
                "max_drift {d} must be a positive number (0.2 is a usual PSI threshold)"
            ));
        }
        if let Some(d) = self.max_accuracy_drop
            && !(0.0..=1.0).contains(&d)
        {
            return Err(format!(
                "max_accuracy_drop {d} is not a fraction from 0 to 1 (0.05 is five points)"
            ));
        }
        if self.min_labels == Some(0) {
            return Err("min_labels must be at least 1".into());
        }
        if !(self.max_p99_ratio >= 1.0 && self.max_p99_ratio.is_finite()) {
            return Err(format!(
                "max_p99_ratio {} must be at least 1 (2 allows twice the stable p99)",
                self.max_p99_ratio
            ));
        }
        Ok(())
    }
}

/// `POST /v1/functions/{name}/rollout`: what a rollout is asked to do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// The candidate version.
    pub to: u32,
    /// Candidate shares, ascending, in percent (default 5, 25, 50, 100).
    #[serde(default)]
    pub steps: Option<Vec<u8>>,
    /// How long each step runs before its gate: `"30s"`, `"5m"` (default 60 s).
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub min_requests: Option<u64>,
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    #[serde(default)]
    pub max_p99_ratio: Option<f64>,
    #[serde(default)]
    pub max_drift: Option<f64>,
    #[serde(default)]
    pub min_labels: Option<u64>,
    #[serde(default)]
    pub max_accuracy_drop: Option<f64>,
}

impl RolloutRequest {
    /// The steps, interval and gates, checked; `defaults` are the server's gates.
    pub fn resolve(&self, defaults: Gates) -> Result<(Vec<u8>, Duration, Gates), String> {
        let steps = self.steps.clone().unwrap_or_else(|| DEFAULT_STEPS.to_vec());
        if steps.is_empty() || steps.len() > 20 {
            return Err("steps: name 1 to 20 shares, e.g. 5,25,50,100".into());
        }
        if let Some(bad) = steps.iter().find(|s| !(1..=100).contains(*s)) {
            return Err(format!("steps: {bad} is not a share from 1 to 100"));
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("steps {steps:?} must rise strictly"));
        }
        let interval = match &self.interval {
            None => DEFAULT_INTERVAL,
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| format!("interval {s:?}: {e} (e.g. 30s, 5m)"))?,
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&interval) {
            return Err(format!(
                "interval {}: from 1s to 24h",
                humantime::format_duration(interval)
            ));
        }
        let gates = Gates {
            min_requests: self.min_requests.unwrap_or(defaults.min_requests),
            max_error_rate: self.max_error_rate.unwrap_or(defaults.max_error_rate),
            max_p99_ratio: self.max_p99_ratio.unwrap_or(defaults.max_p99_ratio),
            max_drift: self.max_drift.or(defaults.max_drift),
            min_labels: self.min_labels.or(defaults.min_labels),
            max_accuracy_drop: self.max_accuracy_drop.or(defaults.max_accuracy_drop),
        };
        gates.validate()?;
        Ok((steps, interval, gates))
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Advancing step by step.
    Running,
    /// Holding its current weights; gates are not judged.
    Paused,
    /// The candidate reached its last step.
    Completed,
    /// A gate failed: all traffic went back to the stable version.
    RolledBack,
    /// Stopped by a person: all traffic went back to the stable version.
    Aborted,
}

impl Phase {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }

    /// Running or paused: it owns the function's traffic policy.
    pub fn active(self) -> bool {
        matches!(self, Phase::Running | Phase::Paused)
    }
}

/// What a gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Too few candidate requests yet.
    Wait,
    Pass,
    Fail,
}

/// One judgement of a step: the numbers and what they meant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub at_ms: i64,
    pub verdict: Verdict,
    pub reason: String,
    pub candidate: Stats,
    pub stable: Stats,
    /// The model gates' numbers, when judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<ModelCheck>,
}

/// What the model gates measured: the candidate's drift from the stable version over the
/// step, and both versions' accuracy on feedback since the rollout started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCheck {
    /// Largest drift score (feature PSI, or prediction L-infinity) of the candidate
    /// against the stable version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<f64>,
    /// What it was measured on (`model input[index]`, or `model predictions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_labelled: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_labelled: Option<u64>,
    /// Why a model gate cannot judge yet (too few labels, or too few rows): the step waits.
    #[serde(skip)]
    pub waiting: Option<String>,
}

impl Rollout {
    /// Judges the model gates on `m`: the failure, if one fails, with the alert it raises
    /// (`drift.detected` or `accuracy.dropped`).
    pub fn judge_models(&self, m: &ModelCheck) -> Option<(&'static str, String)> {
        let g = &self.gates;
        if let (Some(max), Some(d)) = (g.max_drift, m.drift)
            && d > max
        {
            return Some((
                "drift.detected",
                format!(
                    "candidate v{} drifted from stable v{}: score {d:.3} on {} (max {max})",
                    self.candidate,
                    self.stable,
                    m.drift_on.as_deref().unwrap_or("its inputs")
                ),
            ));
        }
        if let (Some(max), Some(c), Some(s)) =
            (g.max_accuracy_drop, m.candidate_accuracy, m.stable_accuracy)
            && s - c > max
        {
            return Some((
                "accuracy.dropped",
                format!(
                    "candidate v{} accuracy {c:.3} on {} labelled requests is {:.3} below stable v{}'s {s:.3} on {} (max drop {max})",
                    self.candidate,
                    m.candidate_labelled.unwrap_or(0),
                    s - c,
                    self.stable,
                    m.stable_labelled.unwrap_or(0)
                ),
            ));
        }
        None
    }
}

/// A rollout as stored (one per function: the latest) and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub function: String,
    pub candidate: u32,
    pub stable: u32,
    pub steps: Vec<u8>,
    /// Index in `steps` of the step in force.
    pub step: usize,
    pub interval_ms: u64,
    pub gates: Gates,
    pub state: Phase,
    /// Kept from the policy in force when the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// The API key that started it.
    pub actor: Option<String>,
    /// The policy in force before it started: what `kiln rollback` returns to after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<TrafficPolicy>,
    pub started_at_ms: i64,
    /// When the current step's window began (reset when resumed). Every node publishes
    /// its numbers since then, so the window outlives the node that began it.
    pub step_started_ms: i64,
    /// The same moment on the monotonic clock, while this process runs: the step's time
    /// does not jump with the wall clock.
    #[serde(skip)]
    pub step_started: Option<std::time::Instant>,
    pub updated_at_ms: i64,
    /// Why it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The latest judgement of the current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<Check>,
    /// Moved by every stored change of the rollout (a step, a pause, a new driver): a write
    /// made on an older epoch is refused, so a driver that lost its lease while it was
    /// paused or cut off can never write a step (the fencing token).
    #[serde(default)]
    pub epoch: u64,
    /// The node that holds the lease to drive it (judge gates, write steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

impl Rollout {
    /// The candidate's share now, in percent.
    pub fn percent(&self) -> u8 {
        self.steps.get(self.step).copied().unwrap_or(0)
    }

    /// The traffic policy of step `step`: the candidate at its share, the rest on stable.
    pub fn policy_at(&self, step: usize) -> TrafficPolicy {
        let share = self.steps.get(step).copied().unwrap_or(100).min(100);
        self.policy([(self.candidate, share), (self.stable, 100 - share)])
    }

    /// The policy after a rollback or an abort: everything on the stable version.
    pub fn stable_policy(&self) -> TrafficPolicy {
        self.policy([(self.stable, 100), (self.candidate, 0)])
    }

    fn policy(&self, weights: [(u32, u8); 2]) -> TrafficPolicy {
        TrafficPolicy {
            weights: weights.into_iter().collect(),
            sticky: self.sticky.clone(),
            shadow: self.shadow,
        }
    }

    /// Whether the current step's interval is over (its gate is to be judged).
    pub fn due(&self, now_ms: i64) -> bool {
        self.state == Phase::Running
            && self.elapsed(now_ms).as_millis() >= u128::from(self.interval_ms)
    }

    /// How long the current step has run (by the monotonic clock when this process
    /// started the step, else by the wall clock `now_ms`).
    pub fn elapsed(&self, now_ms: i64) -> Duration {
        match self.step_started {
            Some(at) => at.elapsed(),
            None => {
                Duration::from_millis(now_ms.saturating_sub(self.step_started_ms).max(0) as u64)
            }
        }
    }

    /// Whether a step window of `window_s` whole seconds covers the interval (with
    /// one-second buckets, the gate waits for the interval's last whole second to end).
    pub fn window_full(&self, window_s: u64) -> bool {
        window_s * 1000
            >= self
                .interval_ms
                .min(crate::meter::window::MAX_WINDOW.as_millis() as u64)
    }

    /// Judges the candidate against the stable version over one step's window.
    pub fn judge(&self, candidate: &Stats, stable: &Stats) -> (Verdict, String) {
        let g = &self.gates;
        let pct = |r: f64| r * 100.0;
        if candidate.requests < g.min_requests {
            return (
                Verdict::Wait,
                format!(
                    "waiting for {} candidate requests ({} in the last {}s)",
                    g.min_requests, candidate.requests, candidate.window_s
                ),
            );
        }
        if candidate.error_rate > g.max_error_rate && candidate.error_rate > stable.error_rate {
            return (
                Verdict::Fail,
                format!(
                    "candidate v{} error rate {:.1}% ({} of {}) over {}s exceeds {:.1}% (stable v{}: {:.1}% of {})",
                    self.candidate,
                    pct(candidate.error_rate),
                    candidate.errors,
                    candidate.requests,
                    candidate.window_s,
                    pct(g.max_error_rate),
                    self.stable,
                    pct(stable.error_rate),
                    stable.requests
                ),
            );
        }
        let p99 = |s: &Stats| s.p99_ms.unwrap_or(0.0).max(LATENCY_FLOOR_MS);
        let latency = if stable.requests >= g.min_requests {
            let ratio = p99(candidate) / p99(stable);
            if ratio > g.max_p99_ratio {
                return (
                    Verdict::Fail,
                    format!(
                        "candidate v{} p99 {:.1} ms is {ratio:.2}x stable v{}'s {:.1} ms (max {}x) over {}s",
                        self.candidate,
                        p99(candidate),
                        self.stable,
                        p99(stable),
                        g.max_p99_ratio,
                        candidate.window_s
                    ),
                );
            }
            format!(
                "p99 {:.1} ms vs stable {:.1} ms ({ratio:.2}x)",
                p99(candidate),
                p99(stable)
            )
        } else {
            format!(
                "p99 {:.1} ms (stable had {} requests, too few to compare)",
                p99(candidate),
                stable.requests
            )
        };
        (
            Verdict::Pass,
            format!(
                "candidate v{} healthy over {}s: {:.1}% errors of {} requests (stable {:.1}%), {latency}",
                self.candidate,
                candidate.window_s,
                pct(candidate.error_rate),
                candidate.requests,
                pct(stable.error_rate)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(requests: u64, errors: u64, p99_ms: f64) -> Stats {
        Stats {
            window_s: 30,
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: Some(p99_ms / 2.0),
            p95_ms: Some(p99_ms),
            p99_ms: Some(p99_ms),
            cold_starts: 0,
            cache_hits: 0,
            cache_hit_ratio: 0.0,
        }
    }

    fn rollout() -> Rollout {
        Rollout {
            function: "f".into(),
            candidate: 2,
            stable: 1,
            steps: vec![10, 50, 100],
            step: 0,
            interval_ms: 1000,
            gates: Gates::default(),
            state: Phase::Running,
            sticky: None,
            shadow: None,
            actor: None,
            before: None,
            started_at_ms: 0,
            step_started_ms: 0,
            step_started: None,
            updated_at_ms: 0,
            outcome: None,
            last_check: None,
            epoch: 0,
            driver: None,
        }
    }

    #[test]
    fn requests_are_resolved_with_defaults_and_checked() {
        let req = |json: &str| {
            serde_json::from_str::<RolloutRequest>(json).unwrap_or_else(|e| panic!("{e}"))
        };
        let (steps, interval, gates) = req(r#"{"to": 2}"#)
            .resolve(Gates::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (steps, interval, gates),
            (DEFAULT_STEPS.to_vec(), DEFAULT_INTERVAL, Gates::default())
        );
        let (_, interval, gates) = req(r#"{"to": 2, "interval": "2s", "max_error_rate": 0.2}"#)
            .resolve(Gates::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (interval, gates.max_error_rate),
            (Duration::from_secs(2), 0.2)
        );
        for bad in [
            r#"{"to": 2, "steps": [50, 25]}"#,
            r#"{"to": 2, "steps": [0, 100]}"#,
            r#"{"to": 2, "steps": [101]}"#,
            r#"{"to": 2, "steps": []}"#,
            r#"{"to": 2, "interval": "soon"}"#,
            r#"{"to": 2, "interval": "10ms"}"#,
            r#"{"to": 2, "max_error_rate": 5}"#,
            r#"{"to": 2, "max_p99_ratio": 0.5}"#,
            r#"{"to": 2, "min_requests": 0}"#,
        ] {
            assert!(req(bad).resolve(Gates::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn steps_move_weights_from_stable_to_candidate() {
        let r = rollout();
        assert_eq!(r.policy_at(0).weights, [(1, 90), (2, 10)].into());
        assert_eq!(r.policy_at(2).weights, [(1, 0), (2, 100)].into());
        assert_eq!(r.stable_policy().weights, [(1, 100), (2, 0)].into());
        assert!(!r.due(999) && r.due(1000));
        assert_eq!(r.elapsed(1500), Duration::from_millis(1500));
        assert!(!r.window_full(0) && r.window_full(1));
    }

    #[test]
    fn gates_wait_for_samples_then_judge_errors_and_latency() {
        let r = rollout();
        assert_eq!(
            r.judge(&stats(5, 5, 1.0), &stats(100, 0, 1.0)).0,
            Verdict::Wait
        );
        let (v, why) = r.judge(&stats(40, 20, 1.0), &stats(400, 0, 1.0));
        assert_eq!(v, Verdict::Fail);
        assert!(why.contains("50.0%") && why.contains("20 of 40"), "{why}");
        // Both failing alike: the candidate is not to blame.
        assert_eq!(
            r.judge(&stats(40, 20, 1.0), &stats(400, 240, 1.0)).0,
            Verdict::Pass
        );
        let (v, why) = r.judge(&stats(40, 0, 30.0), &stats(400, 0, 10.0));
        assert_eq!(v, Verdict::Fail);
        assert!(why.contains("3.00x"), "{why}");
        // Sub-millisecond noise is not a regression.
        assert_eq!(
            r.judge(&stats(40, 0, 0.9), &stats(400, 0, 0.2)).0,
            Verdict::Pass
        );
        // Without enough stable requests, latency is not compared.
        assert_eq!(
            r.judge(&stats(40, 0, 90.0), &stats(3, 0, 1.0)).0,
            Verdict::Pass
        );
    }
}
