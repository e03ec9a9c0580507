//! `GET /v1/audit`: the audit log, newest first. Parameters: `since`, `until` (RFC 3339
//! or unix milliseconds), `tenant`, `action`, `limit` (default 100, at most 10000). A key
//! without `admin` sees its own tenant's entries only.

use std::sync::Arc;

use http::{Response, StatusCode};

use super::{ApiError, percent_decode};
use crate::app::App;
use crate::auth::{AuditQuery, Caller};
use crate::meter::query::parse_time;
use crate::server::{Body, json_response};

/// Entries returned when `limit` is not given.
const DEFAULT_LIMIT: u32 = 100;
/// Most entries one call returns.
const MAX_LIMIT: u32 = 10_000;

fn parse(query: &str) -> Result<AuditQuery, String> {
    let mut q = AuditQuery {
        limit: DEFAULT_LIMIT,
        ..AuditQuery::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "since" => q.since_ms = Some(parse_time(&v).map_err(|e| format!("since: {e}"))?),
            "until" => q.until_ms = Some(parse_time(&v).map_err(|e| format!("until: {e}"))?),
            "tenant" => q.tenant = Some(v),
            "action" => q.action = Some(v),
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit={v:?}: use 1 to {MAX_LIMIT}"))?
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (known: since, until, tenant, action, limit)"
                ));
            }
        }
    }
    Ok(q)
}

pub(super) async fn get(
    app: &Arc<App>,
    query: &str,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let mut q = parse(query).map_err(ApiError::InvalidRequest)?;
    q.tenant = caller.tenant_filter(q.tenant.take(), "audit log")?;
    let entries = app.auth.audit(&q).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"entries": entries}),
    ))
}
