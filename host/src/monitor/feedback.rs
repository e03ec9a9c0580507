//! Ground truth for predictions: `POST /v1/feedback` attaches a label (classification) or a
//! value (regression) to a request by its `x-kiln-request-id`; each version's accuracy (and
//! mean absolute and root mean squared error) is what it predicted against that truth.
//!
//! Feedback lives beside the usage ledger (SQLite `usage.db`, or the cluster's PostgreSQL
//! database, so every node's requests and feedback count), one row per request: posting the
//! same request's truth again counts as a duplicate, never twice. Only the tenant billed
//! for the request (or an admin) may post it; anyone else's is answered as unknown, so a
//! request id reveals nothing across tenants.

use std::time::Duration;

use serde::Serialize;

use crate::meter::Ledger;
use crate::meter::ledger::{Arg, Cell};

/// Longest label kept, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

/// One item of feedback.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub request_id: String,
    pub truth: Truth,
}

/// What the request should have predicted.
#[derive(Debug, Clone, PartialEq)]
pub enum Truth {
    /// A class: compared with the prediction as text (`3`, `"cat"`).
    Label(String),
    /// A number: the prediction's error is measured.
    Value(f64),
}

/// What became of a post's items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub accepted: u64,
    pub duplicates: u64,
    /// No such request (or not the caller's to judge).
    pub unknown: u64,
}

/// Records `items` for the caller's `tenant` (`None`: an admin, any request). A request
/// not in the ledger yet (answered within the last commit window) is looked up again once
/// after `settle`.
pub async fn record(
    ledger: &Ledger,
    items: &[Feedback],
    tenant: Option<&str>,
    settle: Duration,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut missing = Vec::new();
    for item in items {
        if !record_one(ledger, item, tenant, &mut counts).await? {
            missing.push(item);
        }
    }
    if !missing.is_empty() {
        tokio::time::sleep(settle).await;
        for item in missing {
            if !record_one(ledger, item, tenant, &mut counts).await? {
                counts.unknown += 1;
            }
        }
    }
    Ok(counts)
}

/// Records one item; false when its request is not (yet) in the ledger.
async fn record_one(
    ledger: &Ledger,
    item: &Feedback,
    tenant: Option<&str>,
    counts: &mut Counts,
) -> anyhow::Result<bool> {
    let m = ledger.marker();
    let found = ledger
        .rows(
            format!(
                "SELECT tenant, function, version, start_ms FROM usage WHERE request_id = {}
                 ORDER BY start_ms LIMIT 1",
                m(1)
            ),
            vec![Arg::Text(item.request_id.clone())],
        )
        .await?;
    let Some(row) = found.first() else {
        return Ok(false);
    };
    let owner = row[0].text();
    if tenant.is_some_and(|t| t != owner) {
        // Another tenant's request: as if it did not exist.
        counts.unknown += 1;
        return Ok(true);
    }
    let (label, value) = match &item.truth {
        Truth::Label(l) => (Arg::Text(l.clone()), Arg::Null),
        Truth::Value(v) => (Arg::Null, Arg::Text(v.to_string())),
    };
    let changed = ledger
        .execute(
            format!(
                "INSERT INTO feedback (request_id, tenant, function, version, start_ms, label,
                    value, received_ms) VALUES ({}, {}, {}, {}, {}, {}, {}, {})
                 ON CONFLICT (request_id) DO NOTHING",
                m(1),
                m(2),
                m(3),
                m(4),
                m(5),
                m(6),
                m(7),
                m(8)
            ),
            vec![
                Arg::Text(item.request_id.clone()),
                Arg::Text(owner.to_string()),
                Arg::Text(row[1].text().to_string()),
                Arg::Int(row[2].int()),
                Arg::Int(row[3].int()),
                label,
                value,
                Arg::Int(crate::unix_ms()),
            ],
        )
        .await?;
    match changed {
        0 => counts.duplicates += 1,
        _ => counts.accepted += 1,
    }
    Ok(true)
}

/// A version's predictions and how they fared against feedback, over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Quality {
    /// Requests that recorded a prediction.
    pub predictions: u64,
    /// Of those, the ones with feedback (a label or a value).
    pub labelled: u64,
    /// Labelled with a class, and predicted right.
    pub correct: u64,
    /// `correct` over the requests labelled with a class (`None` without any).
    pub accuracy: Option<f64>,
    /// Mean absolute error over the requests given a value whose prediction is a number.
    pub mae: Option<f64>,
    /// Root mean squared error over the same requests.
    pub rmse: Option<f64>,
}

/// The quality of `function`'s `version` over requests that started at `since_ms` or later.
pub async fn quality(
    ledger: &Ledger,
    function: &str,
    version: u32,
    since_ms: i64,
) -> anyhow::Result<Quality> {
    let m = ledger.marker();
    let args = || {
        vec![
            Arg::Text(function.to_string()),
            Arg::Int(i64::from(version)),
            Arg::Int(since_ms),
        ]
    };
    let predictions = ledger
        .rows(
            format!(
                "SELECT COUNT(*) FROM usage WHERE function = {} AND version = {}
                 AND start_ms >= {} AND prediction IS NOT NULL",
                m(1),
                m(2),
                m(3)
            ),
            args(),
        )
        .await?
        .first()
        .and_then(|r| r.first())
        .map_or(0, Cell::int);
    let judged = ledger
        .rows(
            format!(
                "SELECT u.prediction, f.label, f.value FROM feedback f
                 JOIN usage u ON u.start_ms = f.start_ms AND u.request_id = f.request_id
                 WHERE f.function = {} AND f.version = {} AND f.start_ms >= {}
                 AND u.prediction IS NOT NULL",
                m(1),
                m(2),
                m(3)
            ),
            args(),
        )
        .await?;
    let mut q = Quality {
        predictions: predictions.max(0) as u64,
        ..Quality::default()
    };
    let (mut classed, mut valued, mut abs, mut sq) = (0u64, 0u64, 0.0f64, 0.0f64);
    for row in &judged {
        q.labelled += 1;
        let predicted = row[0].text();
        match (&row[1], &row[2]) {
            (Cell::Text(label), _) => {
                classed += 1;
                q.correct += u64::from(predicted == label);
            }
            (_, Cell::Text(value)) => {
                if let (Ok(p), Ok(v)) = (predicted.parse::<f64>(), value.parse::<f64>()) {
                    valued += 1;
                    abs += (p - v).abs();
                    sq += (p - v) * (p - v);
                }
            }
            _ => {}
        }
    }
    q.accuracy = (classed > 0).then(|| q.correct as f64 / classed as f64);
    if valued > 0 {
        q.mae = Some(abs / valued as f64);
        q.rmse = Some((sq / valued as f64).sqrt());
    }
    Ok(q)
}

/// Per (function, version): requests labelled with a class since `since_ms`, and how many
/// were predicted right (for the accuracy gauges).
pub async fn accuracy_by_version(
    ledger: &Ledger,
    since_ms: i64,
) -> anyhow::Result<Vec<(String, u32, u64, u64)>> {
    let rows = ledger
        .rows(
            format!(
                "SELECT f.function, f.version, COUNT(*),
                        SUM(CASE WHEN u.prediction = f.label THEN 1 ELSE 0 END)
                 FROM feedback f
                 JOIN usage u ON u.start_ms = f.start_ms AND u.request_id = f.request_id
                 WHERE f.start_ms >= {} AND f.label IS NOT NULL AND u.prediction IS NOT NULL
                 GROUP BY f.function, f.version",
                ledger.marker()(1)
            ),
            vec![Arg::Int(since_ms)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r[0].text().to_string(),
                r[1].int() as u32,
                r[2].int().max(0) as u64,
                r[3].int().max(0) as u64,
            )
        })
        .collect())
}
