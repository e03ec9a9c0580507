//! Drift scores of a window against the reference: the population stability index (PSI)
//! and the Jensen–Shannon distance per numeric feature, L-infinity between class shares for
//! predictions. Nothing is called drifted below [`MIN_SAMPLES`] rows: twenty requests are
//! noise, not drift.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::live::Counts;
use super::profile::{FeatureMode, OTHER_CLASS, PredictionSource, Profile, ROW_FEATURES};

/// Rows a window needs before any of its scores can count as drift.
pub const MIN_SAMPLES: u64 = 100;

/// The PSI two samples of `n` and `m` rows from one distribution show on average, over
/// `bins` bins: about (bins - 1)(1/n + 1/m). Scores are what a window shows beyond it, so a
/// small window of unchanged traffic does not pass a threshold by sampling noise alone.
pub fn psi_noise(bins: usize, n: u64, m: u64) -> f64 {
    if n == 0 || m == 0 {
        return 0.0;
    }
    bins.saturating_sub(1) as f64 * (1.0 / n as f64 + 1.0 / m as f64)
}

/// PSI of `live` counts against `reference` counts over the same bins. Both are smoothed
/// (half a count per bin) so that an empty bin on either side stays finite.
pub fn psi(reference: &[u64], live: &[u64]) -> f64 {
    let bins = reference.len().max(1) as f64;
    let (rn, ln) = (
        reference.iter().sum::<u64>() as f64,
        live.iter().sum::<u64>() as f64,
    );
    if ln == 0.0 || rn == 0.0 {
        return 0.0;
    }
    reference
        .iter()
        .zip(live)
        .map(|(&r, &l)| {
            let p = (r as f64 + 0.5) / (rn + 0.5 * bins);
            let q = (l as f64 + 0.5) / (ln + 0.5 * bins);
            (q - p) * (q / p).ln()
        })
        .sum()
}

/// Jensen–Shannon distance (base 2, from 0 for the same shares to 1 for disjoint ones).
pub fn js(reference: &[u64], live: &[u64]) -> f64 {
    let (rn, ln) = (
        reference.iter().sum::<u64>() as f64,
        live.iter().sum::<u64>() as f64,
    );
    if ln == 0.0 || rn == 0.0 {
        return 0.0;
    }
    let kl = |a: f64, m: f64| if a > 0.0 { a * (a / m).log2() } else { 0.0 };
    let divergence: f64 = reference
        .iter()
        .zip(live)
        .map(|(&r, &l)| {
            let (p, q) = (r as f64 / rn, l as f64 / ln);
            let m = (p + q) / 2.0;
            0.5 * kl(p, m) + 0.5 * kl(q, m)
        })
        .sum();
    divergence.max(0.0).sqrt()
}

/// Shares of each class, over the union of both sides' classes.
fn shares(counts: &BTreeMap<i64, u64>) -> BTreeMap<i64, f64> {
    let total = counts.values().sum::<u64>().max(1) as f64;
    counts
        .iter()
        .map(|(&c, &n)| (c, n as f64 / total))
        .collect()
}

/// One feature's score.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureDrift {
    pub input: String,
    pub index: usize,
    /// For per-row features: `mean`, `std`, `min` or `max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'static str>,
    pub statistic: &'static str,
    /// The PSI beyond what sampling alone shows at this many rows ([`psi_noise`]).
    pub score: f64,
    /// Jensen–Shannon distance over the same bins, for a second opinion.
    pub js: f64,
    pub drifted: bool,
}

/// One input's scores.
#[derive(Debug, Clone, Serialize)]
pub struct InputDrift {
    pub input: String,
    pub mode: FeatureMode,
    pub samples: u64,
    pub features: Vec<FeatureDrift>,
}

/// The prediction's drift: class shares in the window against the reference's.
#[derive(Debug, Clone, Serialize)]
pub struct PredictionDrift {
    #[serde(flatten)]
    pub source: PredictionSource,
    pub samples: u64,
    pub statistic: &'static str,
    pub score: f64,
    pub drifted: bool,
    /// Share of each class on the reference and in the window (`other`: classes beyond
    /// the bound).
    pub reference: BTreeMap<String, f64>,
    pub current: BTreeMap<String, f64>,
}

/// What a model's window is scored against.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum ReferenceSource {
    /// The reference sample deployed with the version.
    File,
    /// The first rows the version saw (it was deployed without a reference file); their
    /// deciles are the bins.
    FirstRows,
    /// What the version saw in a window (`POST .../reference`), set at `set_ms` by
    /// `set_by`.
    Window {
        window: String,
        set_ms: i64,
        set_by: String,
    },
}

/// One model's drift in a window.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDrift {
    pub model: String,
    pub reference: ReferenceSource,
    /// Rows summarised in the window (the most of any input).
    pub samples: u64,
    /// Rows whose inputs did not have the reference's layout.
    pub mismatched: u64,
    pub reference_rows: u64,
    /// The largest feature score.
    pub max_score: f64,
    pub drifted: bool,
    pub inputs: Vec<InputDrift>,
    /// `None`: the model has no class output, or the reference could not be run.
    pub predictions: Option<PredictionDrift>,
}

fn class_name(c: i64) -> String {
    if c == OTHER_CLASS {
        "other".into()
    } else {
        c.to_string()
    }
}

/// Scores `window` (counts binned with `profile`'s edges) against the reference.
pub fn score(model: &str, profile: &Profile, window: &Counts, threshold: f64) -> ModelDrift {
    let mut inputs = Vec::with_capacity(profile.inputs.len());
    let mut max_score = 0.0f64;
    let mut drifted = false;
    for (i, input) in profile.inputs.iter().enumerate() {
        let samples = window.rows.get(i).copied().unwrap_or(0);
        let enough = samples >= MIN_SAMPLES;
        let mut at = input.offset;
        let mut features = Vec::with_capacity(input.features.len());
        for (index, f) in input.features.iter().enumerate() {
            let live = &window.bins[at..at + f.reference.len()];
            at += f.reference.len();
            let n: u64 = live.iter().sum();
            let m: u64 = f.reference.iter().sum();
            let score = (psi(&f.reference, live) - psi_noise(f.reference.len(), n, m)).max(0.0);
            let feature_drifted = enough && score > threshold;
            max_score = max_score.max(score);
            drifted |= feature_drifted;
            features.push(FeatureDrift {
                input: input.name.clone(),
                index,
                name: (input.mode == FeatureMode::Rows).then(|| ROW_FEATURES[index]),
                statistic: "psi",
                score,
                js: js(&f.reference, live),
                drifted: feature_drifted,
            });
        }
        inputs.push(InputDrift {
            input: input.name.clone(),
            mode: input.mode,
            samples,
            features,
        });
    }
    let predictions = profile
        .prediction
        .as_ref()
        .filter(|_| !profile.reference_classes.is_empty())
        .map(|source| {
            let (r, c) = (shares(&profile.reference_classes), shares(&window.classes));
            let samples = window.predictions();
            let classes: BTreeSet<i64> = r.keys().chain(c.keys()).copied().collect();
            let score = if samples == 0 {
                0.0
            } else {
                classes
                    .iter()
                    .map(|k| {
                        (r.get(k).copied().unwrap_or(0.0) - c.get(k).copied().unwrap_or(0.0)).abs()
                    })
                    .fold(0.0, f64::max)
            };
            let pred_drifted = samples >= MIN_SAMPLES && score > threshold;
            drifted |= pred_drifted;
            let named = |m: BTreeMap<i64, f64>| -> BTreeMap<String, f64> {
                m.into_iter().map(|(k, v)| (class_name(k), v)).collect()
            };
            PredictionDrift {
                source: source.clone(),
                samples,
                statistic: "linf",
                score,
                drifted: pred_drifted,
                reference: named(r),
                current: named(c),
            }
        });
    ModelDrift {
        model: model.to_string(),
        reference: ReferenceSource::File,
        samples: window.rows.iter().copied().max().unwrap_or(0),
        mismatched: window.mismatched,
        reference_rows: profile.rows,
        max_score,
        drifted,
        inputs,
        predictions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_and_js_are_zero_for_the_same_shares_and_grow_with_the_shift() {
        let r = [100, 200, 300, 400];
        assert!(psi(&r, &[10, 20, 30, 40]).abs() < 1e-3);
        assert!(js(&r, &[10, 20, 30, 40]).abs() < 1e-9);
        let shifted = [40, 30, 20, 10];
        assert!(psi(&r, &shifted) > 0.5, "{}", psi(&r, &shifted));
        let disjoint_js = js(&[10, 0], &[0, 10]);
        assert!((disjoint_js - 1.0).abs() < 1e-9, "{disjoint_js}");
        assert_eq!(psi(&r, &[0, 0, 0, 0]), 0.0);
        assert!((psi_noise(10, 100, 900) - 9.0 * (0.01 + 1.0 / 900.0)).abs() < 1e-12);
        // An empty reference bin that live traffic fills is a large, finite score.
        let new_bin = psi(&[500, 0], &[0, 200]);
        assert!(new_bin.is_finite() && new_bin > 5.0, "{new_bin}");
    }
}
