//! Ground truth for predictions: `POST /v1/feedback` attaches a label (classification) or a
//! value (regression) to a request by its `x-kiln-request-id`; each version's accuracy (and
//! mean absolute and root mean squared error) is what it predicted against that truth.
//!
//! Feedback lives beside the usage ledger (SQLite `usage.db`, or the cluster's PostgreSQL
//! database, so every node's requests and feedback count), one row per request: posting the
//! same request's truth again counts as a duplicate, never twice. Only the tenant billed
//! for the request, when it also owns the function (or an admin), may post it: another
//! tenant calling a public function cannot grade its owner's model. Anything else is
//! answered as unknown, after the same wait as a request not found, so a request id reveals
//! nothing across tenants.

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

/// Who posts feedback: an admin (any request), or a tenant (requests it was billed for, of
/// functions it owns; `owner_of` names a function's owner).
pub enum Poster<'a> {
    Admin,
    Tenant {
        tenant: &'a str,
        owner_of: &'a (dyn Fn(&str) -> Option<String> + Sync),
    },
}

/// Records `items` for `poster`. An item whose request is not found (or not the poster's)
/// is looked up again once every record this node queued so far is committed and `settle`
/// has passed (other nodes' commit windows, in a cluster), then counted unknown.
pub async fn record(
    ledger: &Ledger,
    items: &[Feedback],
    poster: &Poster<'_>,
    settle: std::time::Duration,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut missing = Vec::new();
    for item in items {
        if !record_one(ledger, item, poster, &mut counts).await? {
            missing.push(item);
        }
    }
    if !missing.is_empty() {
        ledger.flush().await;
        tokio::time::sleep(settle).await;
        for item in missing {
            if !record_one(ledger, item, poster, &mut counts).await? {
                counts.unknown += 1;
            }
        }
    }
    Ok(counts)
}

/// Records one item; false when its request is not (yet) in the ledger, or not the
/// poster's to judge.
async fn record_one(
    ledger: &Ledger,
    item: &Feedback,
    poster: &Poster<'_>,
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
    let (billed, function) = (row[0].text(), row[1].text());
    if let Poster::Tenant { tenant, owner_of } = poster
        && (billed != *tenant || owner_of(function).as_deref() != Some(*tenant))
    {
        // Not the poster's: as if it did not exist (and answered after the same wait).
        return Ok(false);
    }
    let owner = billed;
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
    /// Of those, the ones given a class label.
    pub labelled: u64,
    /// Labelled, and predicted right.
    pub correct: u64,
    /// `correct` over `labelled` (`None` without labels).
    pub accuracy: Option<f64>,
    /// Of the predictions, the ones given a value (whose prediction is a number).
    pub valued: u64,
    /// Mean absolute error over the valued requests.
    pub mae: Option<f64>,
    /// Root mean squared error over the same requests.
    pub rmse: Option<f64>,
}

/// Most value rows one quality answer reads (regression feedback is aggregated in memory).
const MAX_VALUE_ROWS: i64 = 100_000;

/// The quality of `function`'s `version` over requests that started at `since_ms` or later:
/// counts aggregated by the database, errors over at most [`MAX_VALUE_ROWS`] values.
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
    let first = |rows: Vec<Vec<Cell>>, i: usize| {
        rows.first()
            .and_then(|r| r.get(i))
            .map_or(0, Cell::int)
            .max(0) as u64
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
        .await?;
    let joined = "FROM feedback f
                 JOIN usage u ON u.start_ms = f.start_ms AND u.request_id = f.request_id";
    let labels = ledger
        .rows(
            format!(
                "SELECT COUNT(*), SUM(CASE WHEN u.prediction = f.label THEN 1 ELSE 0 END)
                 {joined}
                 WHERE f.function = {} AND f.version = {} AND f.start_ms >= {}
                 AND f.label IS NOT NULL AND u.prediction IS NOT NULL",
                m(1),
                m(2),
                m(3)
            ),
            args(),
        )
        .await?;
    let values = ledger
        .rows(
            format!(
                "SELECT u.prediction, f.value {joined}
                 WHERE f.function = {} AND f.version = {} AND f.start_ms >= {}
                 AND f.value IS NOT NULL AND u.prediction IS NOT NULL
                 LIMIT {MAX_VALUE_ROWS}",
                m(1),
                m(2),
                m(3)
            ),
            args(),
        )
        .await?;
    let mut q = Quality {
        predictions: first(predictions, 0),
        labelled: labels
            .first()
            .and_then(|r| r.first())
            .map_or(0, Cell::int)
            .max(0) as u64,
        correct: first(labels, 1),
        ..Quality::default()
    };
    q.accuracy = (q.labelled > 0).then(|| q.correct as f64 / q.labelled as f64);
    let (mut abs, mut sq) = (0.0f64, 0.0f64);
    for row in &values {
        if let (Ok(p), Ok(v)) = (row[0].text().parse::<f64>(), row[1].text().parse::<f64>()) {
            q.valued += 1;
            abs += (p - v).abs();
            sq += (p - v) * (p - v);
        }
    }
    if q.valued > 0 {
        q.mae = Some(abs / q.valued as f64);
        q.rmse = Some((sq / q.valued as f64).sqrt());
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
