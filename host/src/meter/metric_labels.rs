//! The label sets of Kiln's metrics: bounded (functions, versions, outcomes, classes),
//! never tenants or request ids.

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct InvocationLabels {
    pub(super) function: String,
    pub(super) version: String,
    pub(super) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DurationLabels {
    pub(super) function: String,
    pub(super) version: String,
    pub(super) status_class: &'static str,
}

/// The `status_class` label values, by the status's first digit (1 to 5).
pub(super) const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`STATUS_CLASSES`] of `status` (anything out of range counts as 5xx).
pub(super) fn status_class(status: u16) -> usize {
    match status / 100 {
        1..=5 => usize::from(status / 100 - 1),
        _ => 4,
    }
}

/// The `result` label values of shadow copies.
pub(super) const SHADOW_RESULTS: [&str; 3] = ["match", "mismatch", "skipped"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FunctionLabels {
    pub(super) function: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct InferenceLabels {
    pub(super) backend: &'static str,
    pub(super) device: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CacheLabels {
    pub(super) cache: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ShadowLabels {
    pub(super) function: String,
    pub(super) version: String,
    pub(super) result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ShadowSideLabels {
    pub(super) function: String,
    pub(super) version: String,
    pub(super) side: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BuildLabels {
    pub(super) version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BreakerLabels {
    pub(super) function: String,
    pub(super) destination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RefusalLabels {
    pub(super) reason: &'static str,
}

/// One model of one version (drift gauges).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub function: String,
    pub version: String,
    pub model: String,
}

/// One version of one function (accuracy gauges).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub function: String,
    pub version: String,
}

/// What became of something (feedback items).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) outcome: &'static str,
}
