//! Validation before a version takes traffic (`[validate]` in `kiln.toml`): a file of cases,
//! one request per line with what it should answer, run against the new version at deploy
//! (real invocations, never billed); a version that misses is refused.
//!
//! A case passes when its status is the expected one (any 2xx when it names none) and,
//! when it names a `label`, the request's prediction (the guest's `x-kiln-prediction`, or
//! its model's class) is that label. A version passes when every case's status is right,
//! the labelled cases' accuracy is at least `min_accuracy`, and the cases' p99 latency is
//! at most `max_p99_ms` (when set).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::common::Digest;

/// Most cases a file may hold.
pub const MAX_CASES: usize = 10_000;
/// Largest cases file, in bytes.
pub const MAX_CASES_BYTES: u64 = 16 << 20;
/// Failing cases kept with the version (the refusal lists every case).
const KEPT_FAILURES: usize = 20;

/// `[validate]` as a version records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateSpec {
    /// Digest of the cases file (JSON lines), uploaded like a model.
    pub cases: Digest,
    /// Share of the labelled cases that must be predicted right (default 1: all).
    #[serde(default = "one")]
    pub min_accuracy: f64,
    /// Highest p99 latency of the cases, in milliseconds (unset: not judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<u64>,
}

fn one() -> f64 {
    1.0
}

impl ValidateSpec {
    /// Checks the settings' ranges.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.min_accuracy) {
            return Err(format!(
                "validate.min_accuracy is {}; it is a share from 0 to 1",
                self.min_accuracy
            ));
        }
        if self.max_p99_ms == Some(0) {
            return Err("validate.max_p99_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// One line of the cases file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseLine {
    /// A string is sent as is; any other JSON value is sent as its JSON text.
    body: Option<serde_json::Value>,
    body_base64: Option<String>,
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    status: Option<u16>,
    label: Option<serde_json::Value>,
}

/// A case, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Its line in the file (from 1).
    pub line: usize,
    pub method: http::Method,
    /// Path (and query) under the function, from `/`.
    pub path: String,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: bytes::Bytes,
    pub status: Option<u16>,
    pub label: Option<String>,
}

/// Parses a cases file; the error names the line.
pub fn parse_cases(text: &str) -> Result<Vec<Case>, String> {
    let mut cases = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if cases.len() == MAX_CASES {
            return Err(format!("more than {MAX_CASES} cases"));
        }
        let bad = |why: String| format!("line {line}: {why}");
        let c: CaseLine = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
        let body = match (c.body, c.body_base64) {
            (Some(_), Some(_)) => return Err(bad("give body or body_base64, not both".into())),
            (Some(serde_json::Value::String(s)), None) => bytes::Bytes::from(s),
            (Some(v), None) => bytes::Bytes::from(v.to_string()),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| bad(format!("body_base64: {e}")))?
                .into(),
            (None, None) => bytes::Bytes::new(),
        };
        let method = match c.method {
            Some(m) => http::Method::from_bytes(m.as_bytes())
                .map_err(|_| bad(format!("method {m:?} is not an HTTP method")))?,
            None if body.is_empty() => http::Method::GET,
            None => http::Method::POST,
        };
        let path = c.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(bad(format!("path {path:?} must be a path from /")));
        }
        let mut headers = Vec::with_capacity(c.headers.len());
        for (k, v) in c.headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(format!("header name {k:?}")))?;
            let value =
                http::HeaderValue::from_str(&v).map_err(|_| bad(format!("header {k} value")))?;
            headers.push((name, value));
        }
        if let Some(s) = c.status
            && !(100..=599).contains(&s)
        {
            return Err(bad(format!("status {s} is not an HTTP status")));
        }
        let label = match c.label {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            Some(other) => return Err(bad(format!("label {other}: an integer or a string"))),
        };
        cases.push(Case {
            line,
            method,
            path,
            headers,
            body,
            status: c.status,
            label,
        });
    }
    if cases.is_empty() {
        return Err("the cases file holds no case".into());
    }
    Ok(cases)
}

/// What one case got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub line: usize,
    /// The status answered (`None`: the function failed to answer).
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub ms: f64,
    pub passed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CaseResult {
    /// Judges what `case` got: `status` (or `error`), `prediction`, in `ms`.
    pub fn judge(
        case: &Case,
        status: Option<u16>,
        prediction: Option<String>,
        ms: f64,
        error: Option<String>,
    ) -> CaseResult {
        let status_ok = match (status, case.status) {
            (Some(s), Some(want)) => s == want,
            (Some(s), None) => (200..300).contains(&s),
            (None, _) => false,
        };
        let label_ok = case
            .label
            .as_ref()
            .is_none_or(|l| prediction.as_ref() == Some(l));
        CaseResult {
            line: case.line,
            status,
            expected_status: case.status,
            prediction,
            label: case.label.clone(),
            ms,
            passed: status_ok && label_ok,
            error,
        }
    }

    fn status_ok(&self) -> bool {
        match (self.status, self.expected_status) {
            (Some(s), Some(want)) => s == want,
            (Some(s), None) => (200..300).contains(&s),
            (None, _) => false,
        }
    }
}

/// A version's validation: the verdict, the numbers it rests on, and the cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationResult {
    pub passed: bool,
    pub cases: usize,
    pub failed: usize,
    /// Cases answered with a status other than expected.
    pub wrong_status: usize,
    pub labelled: usize,
    pub correct: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    pub min_accuracy: f64,
    pub p99_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<u64>,
    /// Why it failed, one sentence per reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// The cases: every one in a refusal; the failing ones (at most 20) once kept.
    pub results: Vec<CaseResult>,
}

impl ValidationResult {
    /// The verdict on `results` under `spec`.
    pub fn of(spec: &ValidateSpec, results: Vec<CaseResult>) -> ValidationResult {
        let wrong_status = results.iter().filter(|r| !r.status_ok()).count();
        let labelled: Vec<&CaseResult> = results.iter().filter(|r| r.label.is_some()).collect();
        let correct = labelled
            .iter()
            .filter(|r| r.prediction.is_some() && r.prediction == r.label)
            .count();
        let accuracy = (!labelled.is_empty()).then(|| correct as f64 / labelled.len() as f64);
        let mut ms: Vec<f64> = results.iter().map(|r| r.ms).collect();
        ms.sort_by(f64::total_cmp);
        let p99_ms = ms
            .get((ms.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        let mut reasons = Vec::new();
        if wrong_status > 0 {
            reasons.push(format!(
                "{wrong_status} of {} cases answered another status than expected",
                results.len()
            ));
        }
        if let Some(a) = accuracy
            && a < spec.min_accuracy
        {
            reasons.push(format!(
                "accuracy {a:.4} on {} labelled cases is below min_accuracy {}",
                labelled.len(),
                spec.min_accuracy
            ));
        }
        if let Some(max) = spec.max_p99_ms
            && p99_ms > max as f64
        {
            reasons.push(format!("p99 {p99_ms:.1} ms is over max_p99_ms {max}"));
        }
        ValidationResult {
            passed: reasons.is_empty(),
            cases: results.len(),
            failed: results.iter().filter(|r| !r.passed).count(),
            wrong_status,
            labelled: labelled.len(),
            correct,
            accuracy,
            min_accuracy: spec.min_accuracy,
            p99_ms,
            max_p99_ms: spec.max_p99_ms,
            reasons,
            results,
        }
    }

    /// What the version keeps: the numbers and the first failing cases.
    pub fn kept(mut self) -> ValidationResult {
        self.results.retain(|r| !r.passed);
        self.results.truncate(KEPT_FAILURES);
        self
    }
}

/// A version's validation as it records it: the settings and the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub spec: ValidateSpec,
    pub result: ValidationResult,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min_accuracy: f64, max_p99_ms: Option<u64>) -> ValidateSpec {
        ValidateSpec {
            cases: Digest::of(b""),
            min_accuracy,
            max_p99_ms,
        }
    }

    #[test]
    fn cases_parse_with_defaults_and_errors_name_the_line() {
        let cases = parse_cases(
            "{\"body\": {\"pixels\": [1]}, \"label\": 3}\n\n{\"method\": \"GET\", \"path\": \"/x?y=1\", \"status\": 404}\n{\"body_base64\": \"aGk=\", \"label\": \"cat\"}\n",
        )
        .expect("cases");
        assert_eq!(cases.len(), 3);
        assert_eq!((cases[0].method.as_str(), cases[0].line), ("POST", 1));
        assert_eq!(&cases[0].body[..], b"{\"pixels\":[1]}");
        assert_eq!(cases[0].label.as_deref(), Some("3"));
        assert_eq!(
            (cases[1].path.as_str(), cases[1].status),
            ("/x?y=1", Some(404))
        );
        assert_eq!((cases[1].line, &cases[2].body[..]), (3, &b"hi"[..]));
        let err = parse_cases("{\"body\": \"a\"}\n{\"bodyy\": 1}\n").expect_err("unknown");
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(parse_cases("\n").is_err());
        assert!(parse_cases("{\"path\": \"x\"}").is_err());
    }

    #[test]
    fn the_verdict_weighs_statuses_labels_and_the_p99() {
        let cases = parse_cases("{\"label\": 1}\n{\"label\": 2}\n{\"status\": 404}\n{}\n").unwrap();
        let got = |i: usize, status: u16, pred: &str, ms: f64| {
            CaseResult::judge(&cases[i], Some(status), Some(pred.to_string()), ms, None)
        };
        let results = vec![
            got(0, 200, "1", 1.0),
            got(1, 200, "7", 2.0),
            got(2, 404, "", 3.0),
            got(3, 200, "", 40.0),
        ];
        let half = ValidationResult::of(&spec(0.5, None), results.clone());
        assert!(half.passed, "{half:?}");
        assert_eq!((half.labelled, half.correct, half.failed), (2, 1, 1));
        assert_eq!(half.p99_ms, 40.0);
        let strict = ValidationResult::of(&spec(1.0, Some(10)), results.clone());
        assert!(!strict.passed);
        assert_eq!(strict.reasons.len(), 2, "{:?}", strict.reasons);
        assert_eq!(strict.clone().kept().results.len(), 1);
        let mut wrong = results;
        wrong[3] = got(3, 500, "", 1.0);
        let r = ValidationResult::of(&spec(0.0, None), wrong);
        assert_eq!((r.passed, r.wrong_status), (false, 1));
    }
}
