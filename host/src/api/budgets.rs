//! `/v1/budgets`: tenants' monthly cost budgets (admin). `GET` lists them with the month's
//! spend; `PUT /v1/budgets/{tenant}` sets one (`{"monthly", "alert_at"?, "hard"?}`);
//! `DELETE` removes it.

use std::sync::Arc;

use http::{Request, Response, StatusCode};

use super::{ApiError, AuditDetail};
use crate::app::App;
use crate::meter::budgets::{self, Budget};
use crate::server::{Body, json_response};

/// `GET /v1/budgets`.
pub(super) async fn list(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let standings = budgets::standings(super::ledger(app, "budgets")?, crate::unix_ms()).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "currency": app.config.pricing.currency,
            "budgets": standings,
        }),
    ))
}

/// `PUT /v1/budgets/{tenant}`.
pub(super) async fn put(
    app: &Arc<App>,
    tenant: &str,
    req: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let ledger = super::ledger(app, "budgets")?;
    let mut b: Budget = super::read_json(req.into_body(), 16 << 10, "budget").await?;
    if tenant.is_empty() || tenant.len() > 128 {
        return Err(ApiError::InvalidRequest(
            "a tenant name of 1 to 128 bytes".into(),
        ));
    }
    b.tenant = tenant.to_string();
    b.check().map_err(ApiError::InvalidRequest)?;
    budgets::set(ledger, &b).await?;
    // Applied at once on this node; the others within a refresh.
    app.refresh_budgets().await?;
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::to_value(&b).unwrap_or_default(),
    );
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "monthly {} alert_at {:?} hard {}",
            b.monthly, b.alert_at, b.hard
        ),
        subject: Some(tenant.to_string()),
    });
    Ok(resp)
}

/// `DELETE /v1/budgets/{tenant}`.
pub(super) async fn delete(app: &Arc<App>, tenant: &str) -> Result<Response<Body>, ApiError> {
    if !budgets::delete(super::ledger(app, "budgets")?, tenant).await? {
        return Err(ApiError::NotFound(
            format!("tenant {tenant:?} has no budget"),
            "budget.not_found",
        ));
    }
    app.refresh_budgets().await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"tenant": tenant, "deleted": true}),
    ))
}
