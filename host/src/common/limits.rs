//! Per-version resource limits (stored with each version, enforced by the runtime) and
//! the partial form manifests and query strings give them in.

use serde::{Deserialize, Serialize};

use super::Rate;

/// Default per-request timeout of a version, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default linear-memory cap of a version, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 128;
/// Default number of requests a version runs at once.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 64;

/// The limits one version runs under; fixed when the version is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock budget of one request, guest and host calls included, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory the instance may grow to, in MiB.
    pub memory_mb: u64,
    /// Requests served at once; more wait in a short queue, then get 503.
    pub max_concurrency: u32,
    /// Requests accepted per second, minute or hour across the function (429 beyond);
    /// `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: DEFAULT_TIMEOUT_MS,
            memory_mb: DEFAULT_MEMORY_MB,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            rate: None,
        }
    }
}

/// A limit outside what this server allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name} = {value} is out of range (allowed: 1..={max})")]
pub struct LimitError {
    pub name: &'static str,
    pub value: u64,
    pub max: u64,
}

/// Limits as a manifest, query string or API call gives them: each one optional, the
/// server's defaults filling the gaps.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// `"N/s"`, `"N/m"` or `"N/h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

impl LimitsSpec {
    /// Fills unset limits from `defaults`.
    pub fn resolve(&self, defaults: &Limits) -> Limits {
        Limits {
            timeout_ms: self.timeout_ms.unwrap_or(defaults.timeout_ms),
            memory_mb: self.memory_mb.unwrap_or(defaults.memory_mb),
            max_concurrency: self.max_concurrency.unwrap_or(defaults.max_concurrency),
            rate: self.rate.or(defaults.rate),
        }
    }

    /// Parses `timeout_ms=..&memory_mb=..&max_concurrency=..`; other keys are an error.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut spec = LimitsSpec::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = || {
                v.parse::<u64>()
                    .map_err(|_| format!("query parameter {k}={v:?} is not a whole number"))
            };
            match k {
                "timeout_ms" => spec.timeout_ms = Some(num()?),
                "memory_mb" => spec.memory_mb = Some(num()?),
                "rate" => spec.rate = Some(v.parse()?),
                "max_concurrency" => {
                    spec.max_concurrency =
                        Some(u32::try_from(num()?).map_err(|_| {
                            format!("query parameter max_concurrency={v} is too large")
                        })?)
                }
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?} (known: timeout_ms, memory_mb, max_concurrency, rate)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_query_parses_known_keys_only() {
        let spec = LimitsSpec::from_query("timeout_ms=2000&memory_mb=64").expect("parse");
        let l = spec.resolve(&Limits::default());
        assert_eq!(
            (l.timeout_ms, l.memory_mb, l.max_concurrency),
            (2000, 64, DEFAULT_MAX_CONCURRENCY)
        );
        assert!(LimitsSpec::from_query("timeout=1").is_err());
        assert!(LimitsSpec::from_query("memory_mb=lots").is_err());
    }
}
