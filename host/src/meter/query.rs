//! Usage queries over the ledger: totals for a window (optionally grouped) and the records
//! themselves as CSV. Totals are sums of the stored per-record values, so the sum of the
//! exported costs always equals the reported cost for the same window.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Value;
use serde_json::json;

use super::ledger::Ledger;

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

/// Parses a time parameter: RFC 3339 (`2026-11-27T10:00:00Z`) or unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("{s:?} is not a time: {e} (use RFC 3339 like 2026-11-27T10:00:00Z, or unix milliseconds)")
    })?;
    Ok(unix_ms(t))
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 text of unix milliseconds.
pub fn format_time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

impl UsageQuery {
    fn filter(&self) -> (String, Vec<Value>) {
        let mut sql = String::from(" WHERE start_ms >= ? AND start_ms < ?");
        let mut args = vec![
            Value::Integer(self.since_ms.unwrap_or(i64::MIN)),
            Value::Integer(self.until_ms.unwrap_or(i64::MAX)),
        ];
        if let Some(f) = &self.function {
            sql.push_str(" AND function = ?");
            args.push(Value::Text(f.clone()));
        }
        if let Some(t) = &self.tenant {
            sql.push_str(" AND tenant = ?");
            args.push(Value::Text(t.clone()));
        }
        (sql, args)
    }
}

const SUMS: &str = "COUNT(*), COALESCE(SUM(cache = 'hit'), 0), COALESCE(SUM(outcome != 'ok'), 0),
    COALESCE(SUM(wall_us), 0), COALESCE(SUM(cpu_us), 0), COALESCE(SUM(mem_mib_ms), 0),
    COALESCE(SUM(inference_cpu_us), 0), COALESCE(SUM(inference_gpu_us), 0),
    COALESCE(SUM(bytes_in), 0), COALESCE(SUM(bytes_out), 0), COALESCE(SUM(cost), 0)";

fn totals(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<serde_json::Value> {
    let n = |i: usize| row.get::<_, i64>(at + i);
    let ms = |us: i64| us as f64 / 1000.0;
    Ok(json!({
        "requests": n(0)?,
        "cache_hits": n(1)?,
        "errors": n(2)?,
        "wall_ms": ms(n(3)?),
        "cpu_us": n(4)?,
        "cpu_ms": ms(n(4)?),
        "mem_mib_ms": n(5)?,
        "gb_s": n(5)? as f64 / 1_024_000.0,
        "inference_us": {"cpu": n(6)?, "gpu": n(7)?},
        "inference_ms": {"cpu": ms(n(6)?), "gpu": ms(n(7)?)},
        "bytes_in": n(8)?,
        "bytes_out": n(9)?,
        "cost": n(10)?,
    }))
}

/// Totals (and groups) for `q`, as `GET /v1/usage` answers them.
pub fn report(
    ledger: &Ledger,
    q: &UsageQuery,
    currency: &str,
) -> anyhow::Result<serde_json::Value> {
    ledger.read(|conn| {
        let (filter, args) = q.filter();
        let total = conn.query_row(
            &format!("SELECT {SUMS} FROM usage{filter}"),
            rusqlite::params_from_iter(args.iter()),
            |r| totals(r, 0),
        )?;
        let mut out = json!({
            "currency": currency,
            "since": q.since_ms.map(format_time),
            "until": q.until_ms.map(format_time),
            "group_by": q.group_by.map(GroupBy::as_str),
            "totals": total,
        });
        if let Some(g) = q.group_by {
            let key = g.sql();
            let mut stmt = conn.prepare(&format!(
                "SELECT {key} AS k, {SUMS} FROM usage{filter} GROUP BY k ORDER BY k"
            ))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                let k = match r.get::<_, Value>(0)? {
                    Value::Integer(ms) => format_time(ms),
                    Value::Text(t) => t,
                    _ => String::new(),
                };
                let mut t = totals(r, 1)?;
                t["key"] = k.into();
                Ok(t)
            })?;
            out["groups"] = rows.collect::<Result<Vec<_>, _>>()?.into();
        }
        Ok(out)
    })
}

/// Columns of the CSV export, in order.
pub const CSV_COLUMNS: &str = "request_id,tenant,function,version,start,start_ms,wall_us,cpu_us,memory_peak_bytes,mem_mib_ms,inference_cpu_us,inference_gpu_us,bytes_in,bytes_out,cold,cache,outcome,status,cost";

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
pub fn export_csv(ledger: &Ledger, q: &UsageQuery) -> anyhow::Result<String> {
    ledger.read(|conn| {
        let (filter, args) = q.filter();
        let mut stmt = conn.prepare(&format!(
            "SELECT request_id, tenant, function, version, start_ms, wall_us, cpu_us,
                    memory_peak_bytes, mem_mib_ms, inference_cpu_us, inference_gpu_us,
                    bytes_in, bytes_out, cold, cache, outcome, status, cost
             FROM usage{filter} ORDER BY start_ms, request_id"
        ))?;
        let mut out = String::from(CSV_COLUMNS);
        out.push('\n');
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
        while let Some(r) = rows.next()? {
            for i in 0..3 {
                csv_field(&mut out, &r.get::<_, String>(i)?);
                out.push(',');
            }
            let n = |i: usize| r.get::<_, i64>(i);
            let start = n(4)?;
            let _ = write!(out, "{},{},{start}", n(3)?, format_time(start));
            for i in 5..=12 {
                let _ = write!(out, ",{}", n(i)?);
            }
            let cold = n(13)? != 0;
            let _ = writeln!(
                out,
                ",{cold},{},{},{},{}",
                r.get::<_, String>(14)?,
                r.get::<_, String>(15)?,
                n(16)?,
                n(17)?
            );
        }
        Ok(out)
    })
}
