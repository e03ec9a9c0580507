//! `GET /v1/audit`: the audit log, newest first. Parameters: `since`, `until` (RFC 3339
//! with any offset, unix milliseconds, or a span back from now like `1h`), `tenant`,
//! `action`, and the pages' `limit` (default 100, at most 10000) and `cursor` (see
//! [`super::page`]). A key without `admin` sees its own tenant's entries only.

use std::sync::Arc;

use http::{Response, StatusCode};

use super::page::Paging;
use super::{ApiError, percent_decode};
use crate::app::App;
use crate::auth::{AuditQuery, Caller};
use crate::common::time::parse_time;
use crate::server::{Body, json_response};

/// Most entries one page holds.
const MAX_PAGE: usize = 10_000;

fn parse(query: &str) -> Result<(AuditQuery, Paging), String> {
    let mut q = AuditQuery::default();
    let mut paging = Paging::new("audit", MAX_PAGE);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "since" => q.since_ms = Some(parse_time(&v).map_err(|e| format!("since: {e}"))?),
            "until" => q.until_ms = Some(parse_time(&v).map_err(|e| format!("until: {e}"))?),
            "tenant" => q.tenant = Some(v),
            "action" => q.action = Some(v),
            other if paging.take(other, &v)? => {}
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (known: since, until, tenant, action, limit, cursor)"
                ));
            }
        }
    }
    Ok((q, paging))
}

pub(super) async fn get(
    app: &Arc<App>,
    query: &str,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let (mut q, paging) = parse(query).map_err(ApiError::InvalidRequest)?;
    q.tenant = caller.tenant_filter(q.tenant.take(), "audit log")?;
    q.limit = paging.limit as u32 + 1;
    q.before_seq = paging.after()?;
    let entries = app.auth.audit(&q).await?;
    let (entries, next) = paging.finish(entries, |e| e.seq);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"entries": entries, "next_cursor": next}),
    ))
}
