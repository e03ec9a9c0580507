//! `GET /v1/usage`: usage totals from the ledger, optionally grouped, or the records as CSV.
//!
//! Parameters: `function`, `tenant`, `since`, `until` (RFC 3339 with any offset, unix
//! milliseconds, or a span back from now like `1h`; `since <= start < until`), `group_by` (`function`, `version`, `tenant`, `hour`, `day`),
//! `format` (`json`, default, or `csv`).

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};

use super::{ApiError, percent_decode};
use crate::app::App;
use crate::auth::Caller;
use crate::common::time::parse_time;
use crate::meter::query::{self, GroupBy, UsageQuery};
use crate::server::{Body, full, json_response};

/// Parses the query string of `GET /v1/usage`; returns the query and whether CSV is wanted.
pub fn parse(query_string: &str) -> Result<(UsageQuery, bool), String> {
    let mut q = UsageQuery::default();
    let mut csv = false;
    for pair in query_string.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "function" => q.function = Some(v),
            "tenant" => q.tenant = Some(v),
            "since" => q.since_ms = Some(parse_time(&v).map_err(|e| format!("since: {e}"))?),
            "until" => q.until_ms = Some(parse_time(&v).map_err(|e| format!("until: {e}"))?),
            "group_by" => q.group_by = Some(GroupBy::parse(&v)?),
            "format" => {
                csv = match v.as_str() {
                    "csv" => true,
                    "json" => false,
                    other => return Err(format!("format={other:?}: use json or csv")),
                }
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (known: function, tenant, since, until, group_by, format)"
                ));
            }
        }
    }
    Ok((q, csv))
}

enum Answer {
    Csv(String),
    Json(serde_json::Value),
}

/// A key without `admin` reads its own tenant's usage only.
pub(super) async fn get(
    app: &Arc<App>,
    query_string: &str,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let (mut q, csv) = parse(query_string).map_err(ApiError::InvalidRequest)?;
    q.tenant = caller.tenant_filter(q.tenant.take(), "usage")?;
    if app.ledger.is_none() {
        return Err(ApiError::InvalidRequest(
            "metering is off on this server ([metering] enabled = false)".into(),
        ));
    }
    let ledger = app
        .ledger
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no ledger"))?;
    let answer = if csv {
        Answer::Csv(query::export_csv(ledger, &q).await?)
    } else {
        Answer::Json(query::report(ledger, &q, &app.config.pricing.currency).await?)
    };
    Ok(match answer {
        Answer::Csv(text) => {
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            resp
        }
        Answer::Json(json) => json_response(StatusCode::OK, &json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_parameters_parse_and_bad_ones_say_why() {
        let (q, csv) = parse("function=hello&since=2026-11-27T10%3A00%3A00Z&until=1800000000000&group_by=day&format=csv")
            .expect("parse");
        assert_eq!(q.function.as_deref(), Some("hello"));
        assert_eq!(q.since_ms, Some(1_795_773_600_000));
        assert_eq!(q.until_ms, Some(1_800_000_000_000));
        assert_eq!(q.group_by, Some(GroupBy::Day));
        assert!(csv);
        assert!(
            parse("group_by=week")
                .expect_err("bad")
                .contains("group_by")
        );
        assert!(parse("since=yesterday").expect_err("bad").contains("since"));
        assert!(parse("bogus=1").expect_err("bad").contains("bogus"));
    }
}
