//! Usage queries over the ledger: totals for a window (optionally grouped) and the records
//! themselves as CSV. Totals are sums of the stored per-record values, so the sum of the
//! exported costs always equals the reported cost for the same window.
//!
//! The SQL is written once for both backends (SQLite and PostgreSQL): only the parameter
//! markers differ, and every sum is cast to a 64-bit integer so both answer the same types.

use crate::common::time::format_time;
use std::fmt::Write as _;

use serde_json::json;

use super::ledger::{Arg, Cell, Ledger};

/// How totals are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Function,
    Version,
    Tenant,
    Hour,
    Day,
}

impl GroupBy {
    /// Parses the `group_by` parameter.
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "function" => GroupBy::Function,
            "version" => GroupBy::Version,
            "tenant" => GroupBy::Tenant,
            "hour" => GroupBy::Hour,
            "day" => GroupBy::Day,
            other => {
                return Err(format!(
                    "group_by={other:?}: use function, version, tenant, hour or day"
                ));
            }
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            GroupBy::Function => "function",
            GroupBy::Version => "version",
            GroupBy::Tenant => "tenant",
            GroupBy::Hour => "hour",
            GroupBy::Day => "day",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            GroupBy::Function => "function",
            GroupBy::Version => "function || '@' || version",
            GroupBy::Tenant => "tenant",
            GroupBy::Hour => "(start_ms / 3600000) * 3600000",
            GroupBy::Day => "(start_ms / 86400000) * 86400000",
        }
    }
}

/// Which records a query covers: `since <= start < until` (unix ms) and the filters.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub function: Option<String>,
    pub tenant: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub group_by: Option<GroupBy>,
}

impl UsageQuery {
    /// The `WHERE` clause (parameter markers by `marker`) and its arguments.
    fn filter(&self, marker: fn(usize) -> String) -> (String, Vec<Arg>) {
        let mut args = vec![
            Arg::Int(self.since_ms.unwrap_or(i64::MIN)),
            Arg::Int(self.until_ms.unwrap_or(i64::MAX)),
        ];
        let mut sql = format!(
            " WHERE start_ms >= {} AND start_ms < {}",
            marker(1),
            marker(2)
        );
        if let Some(f) = &self.function {
            args.push(Arg::Text(f.clone()));
            sql.push_str(&format!(" AND function = {}", marker(args.len())));
        }
        if let Some(t) = &self.tenant {
            args.push(Arg::Text(t.clone()));
            sql.push_str(&format!(" AND tenant = {}", marker(args.len())));
        }
        (sql, args)
    }
}

const SUMS: &str = "COUNT(*),
    CAST(COALESCE(SUM(CASE WHEN cache = 'hit' THEN 1 ELSE 0 END), 0) AS BIGINT),
    CAST(COALESCE(SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END), 0) AS BIGINT),
    CAST(COALESCE(SUM(wall_us), 0) AS BIGINT), CAST(COALESCE(SUM(cpu_us), 0) AS BIGINT),
    CAST(COALESCE(SUM(mem_mib_ms), 0) AS BIGINT),
    CAST(COALESCE(SUM(inference_cpu_us), 0) AS BIGINT),
    CAST(COALESCE(SUM(inference_gpu_us), 0) AS BIGINT),
    CAST(COALESCE(SUM(bytes_in), 0) AS BIGINT), CAST(COALESCE(SUM(bytes_out), 0) AS BIGINT),
    CAST(COALESCE(SUM(cost), 0) AS BIGINT)";

/// The totals in `row` from column `at` on (the columns of [`SUMS`]).
fn totals(row: &[Cell], at: usize) -> serde_json::Value {
    let n = |i: usize| row.get(at + i).map_or(0, Cell::int);
    let ms = |us: i64| us as f64 / 1000.0;
    json!({
        "requests": n(0),
        "cache_hits": n(1),
        "errors": n(2),
        "wall_ms": ms(n(3)),
        "cpu_us": n(4),
        "cpu_ms": ms(n(4)),
        "mem_mib_ms": n(5),
        "gb_s": n(5) as f64 / 1_024_000.0,
        "inference_us": {"cpu": n(6), "gpu": n(7)},
        "inference_ms": {"cpu": ms(n(6)), "gpu": ms(n(7))},
        "bytes_in": n(8),
        "bytes_out": n(9),
        "cost": n(10),
    })
}

/// Totals over `q`'s window, and per group when it asks for groups.
pub async fn report(
    ledger: &Ledger,
    q: &UsageQuery,
    currency: &str,
) -> anyhow::Result<serde_json::Value> {
    let (filter, args) = q.filter(ledger.marker());
    let total = ledger
        .rows(format!("SELECT {SUMS} FROM usage{filter}"), args.clone())
        .await?;
    let mut out = json!({
        "currency": currency,
        "since": q.since_ms.map(format_time),
        "until": q.until_ms.map(format_time),
        "group_by": q.group_by.map(GroupBy::as_str),
        "totals": totals(total.first().map_or(&[][..], Vec::as_slice), 0),
    });
    if let Some(g) = q.group_by {
        let key = g.sql();
        let rows = ledger
            .rows(
                format!("SELECT {key} AS k, {SUMS} FROM usage{filter} GROUP BY k ORDER BY k"),
                args,
            )
            .await?;
        let groups: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let k = match r.first() {
                    Some(Cell::Int(ms)) => format_time(*ms),
                    Some(Cell::Text(t)) => t.clone(),
                    _ => String::new(),
                };
                let mut t = totals(r, 1);
                t["key"] = k.into();
                t
            })
            .collect();
        out["groups"] = groups.into();
    }
    Ok(out)
}

pub const CSV_COLUMNS: &str = "request_id,tenant,function,version,start,start_ms,wall_us,cpu_us,memory_peak_bytes,mem_mib_ms,inference_cpu_us,inference_gpu_us,bytes_in,bytes_out,cold,cache,outcome,status,cost,batch_rows,prediction";

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

/// Every record of `q`'s window, oldest first, as CSV with a header line.
/// The records of `q`'s window as CSV ([`CSV_COLUMNS`]), oldest first.
pub async fn export_csv(ledger: &Ledger, q: &UsageQuery) -> anyhow::Result<String> {
    let (filter, args) = q.filter(ledger.marker());
    let rows = ledger
        .rows(
            format!(
                "SELECT request_id, tenant, function, version, start_ms, wall_us, cpu_us,
                        memory_peak_bytes, mem_mib_ms, inference_cpu_us, inference_gpu_us,
                        bytes_in, bytes_out, cold, cache, outcome, status, cost, batch_rows,
                        prediction
                 FROM usage{filter} ORDER BY start_ms, {}",
                ledger.binary_order("request_id")
            ),
            args,
        )
        .await?;
    let mut out = String::from(CSV_COLUMNS);
    out.push('\n');
    for r in &rows {
        let text = |i: usize| r.get(i).map_or("", Cell::text);
        let n = |i: usize| r.get(i).map_or(0, Cell::int);
        for i in 0..3 {
            csv_field(&mut out, text(i));
            out.push(',');
        }
        let start = n(4);
        let _ = write!(out, "{},{},{start}", n(3), format_time(start));
        for i in 5..=12 {
            let _ = write!(out, ",{}", n(i));
        }
        let cold = n(13) != 0;
        let _ = write!(
            out,
            ",{cold},{},{},{},{},{},",
            text(14),
            text(15),
            n(16),
            n(17),
            n(18)
        );
        csv_field(&mut out, text(19));
        out.push('\n');
    }
    Ok(out)
}
