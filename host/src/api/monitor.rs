//! Model monitoring over the API: `GET /v1/functions/{name}/versions/{v}/drift` scores
//! what a version's monitored models saw in a window against their references;
//! `POST /v1/feedback` takes ground truth for requests and
//! `GET /v1/functions/{name}/versions/{v}/quality` scores predictions against it.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};

use super::ApiError;
use crate::app::{App, ReferenceError};
use crate::auth::Caller;
use crate::monitor::feedback::{self, Feedback, MAX_LABEL_BYTES, Poster, Truth};
use crate::monitor::{DriftState, MIN_SAMPLES, live};
use crate::server::{Body, json_response};

/// The window a drift answer covers unless `window=` says otherwise.
const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// `GET /v1/functions/{name}/versions/{v}/drift[?window=15m]`: per monitored model, each
/// feature's score against the reference and the prediction's class shares, over every
/// node's traffic; `drifted` when any passes its threshold on at least [`MIN_SAMPLES`]
/// rows. `partial` says another node's part could not be read.
pub(super) async fn drift(
    app: &Arc<App>,
    name: &str,
    version: &str,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let n = super::version_number(version)?;
    let window = window_param(query, DEFAULT_WINDOW)?;
    let entry = app.registry.route(name, Some(n))?;
    let monitors: Vec<_> = entry.models.monitors().collect();
    if monitors.is_empty() {
        return Err(not_configured(name, n));
    }
    let window_ms = window.as_millis() as u64;
    let mut models = Vec::with_capacity(monitors.len());
    let mut partial = false;
    for (_, m) in monitors {
        let (state, p) = app
            .model_drift((name, n), &entry.models, m, window_ms)
            .await;
        partial |= p;
        models.push(state);
    }
    let (samples, drifted) = models.iter().fold((0, false), |(s, d), m| match m {
        DriftState::Ready(r) => (s + r.samples, d || r.drifted),
        DriftState::NotReady { .. } => (s, d),
    });
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "function": name,
            "version": n,
            "window": humantime::format_duration(window).to_string(),
            "samples": samples,
            "min_samples": MIN_SAMPLES,
            "drifted": drifted,
            "partial": partial,
            "models": models,
        }),
    ))
}

/// `window=` of a drift question or a reference: from a minute to the 48 hours kept.
fn window_param(query: &str, default: Duration) -> Result<Duration, ApiError> {
    super::window_param(
        query,
        default,
        Duration::from_secs(60)..=Duration::from_secs(live::HOURS * 3600),
        &format!("from 1m to {}h, e.g. 15m or 24h", live::HOURS),
    )
}

fn not_configured(name: &str, n: u32) -> ApiError {
    ApiError::NotFound(
        format!("version {n} of {name} monitors no model: deploy it with [models.<name>.monitor]"),
        "monitor.not_configured",
    )
}

/// `POST /v1/functions/{name}/versions/{v}/reference` with `{"window": "1h"}`: what the
/// version's monitored models saw in that window (on every node) becomes their reference.
pub(super) async fn set_reference(
    app: &Arc<App>,
    caller: &Caller,
    name: &str,
    version: &str,
    req: http::Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let n = super::version_number(version)?;
    let body: serde_json::Value =
        super::read_json(req.into_body(), 4096, "reference request").await?;
    let window = match body.get("window") {
        Some(serde_json::Value::String(w))
            if w.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ') =>
        {
            window_param(&format!("window={w}"), DEFAULT_WINDOW)?
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "give the window whose traffic becomes the reference: {\"window\": \"1h\"}".into(),
            ));
        }
    };
    if let Some(k) = body
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "window"))
    {
        return Err(ApiError::InvalidRequest(format!(
            "unknown field {k:?} (known: window)"
        )));
    }
    let made = app
        .set_reference(name, n, window, &set_by(caller))
        .await
        .map_err(|e| match e {
            ReferenceError::Route(e) => e.into(),
            ReferenceError::NotConfigured => not_configured(name, n),
            ReferenceError::Store(e) => ApiError::Unavailable(format!("{e:#}")),
            e @ (ReferenceError::NotReady(_) | ReferenceError::TooFew { .. }) => {
                ApiError::Conflict(e.to_string(), "monitor.not_enough_samples")
            }
        })?;
    let models: Vec<_> = made
        .iter()
        .map(|(model, rows, predictions)| {
            serde_json::json!({"model": model, "rows": rows, "predictions": predictions})
        })
        .collect();
    let window = humantime::format_duration(window).to_string();
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::json!({
            "function": name,
            "version": n,
            "window": window,
            "models": models,
        }),
    );
    resp.extensions_mut().insert(super::AuditDetail {
        detail: format!("reference from the last {window}"),
        subject: None,
    });
    Ok(resp)
}

/// Who set a reference, as its drift answers show it: the key's id, else the tenant.
fn set_by(caller: &Caller) -> String {
    match (caller.key_id(), caller.tenant()) {
        (Some(k), _) => k.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => "admin".to_string(),
    }
}

/// Most items one `POST /v1/feedback` takes.
const MAX_FEEDBACK_ITEMS: usize = 10_000;
/// Largest feedback body, in bytes.
const MAX_FEEDBACK_BYTES: usize = 4 << 20;

/// One feedback object: `{"request_id", "label"}` or `{"request_id", "value"}`.
fn feedback_item(v: serde_json::Value, line: usize) -> Result<Feedback, ApiError> {
    let bad = |why: &str| ApiError::InvalidRequest(format!("feedback item {line}: {why}"));
    let serde_json::Value::Object(mut o) = v else {
        return Err(bad("expected an object"));
    };
    let request_id = match o.remove("request_id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= 128 => s,
        _ => {
            return Err(bad(
                "\"request_id\" must be the x-kiln-request-id of a request",
            ));
        }
    };
    let truth = match (o.remove("label"), o.remove("value")) {
        (Some(serde_json::Value::String(l)), None) if !l.is_empty() => Truth::Label(l),
        (Some(serde_json::Value::Number(n)), None) if n.is_i64() || n.is_u64() => {
            Truth::Label(n.to_string())
        }
        (None, Some(serde_json::Value::Number(n))) => match n.as_f64() {
            Some(v) if v.is_finite() => Truth::Value(v),
            _ => return Err(bad("\"value\" must be a finite number")),
        },
        (Some(_), Some(_)) => return Err(bad("give a \"label\" or a \"value\", not both")),
        _ => {
            return Err(bad(
                "give a \"label\" (a class: integer or string) or a \"value\" (a number)",
            ));
        }
    };
    if let Truth::Label(l) = &truth
        && l.len() > MAX_LABEL_BYTES
    {
        return Err(bad("the label is too long"));
    }
    if let Some(k) = o.keys().next() {
        return Err(bad(&format!(
            "unknown field {k:?} (known: request_id, label, value)"
        )));
    }
    Ok(Feedback { request_id, truth })
}

/// `POST /v1/feedback`: one JSON object, or NDJSON (one object per line). Answers 202 with
/// how many were `accepted`, `duplicates` (that request's feedback was in already) and
/// `unknown` (no such request, or another tenant's).
pub(super) async fn feedback(
    app: &Arc<App>,
    req: http::Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let ledger = super::ledger(app, "predictions and feedback")?;
    let bytes = super::read_small_body(req.into_body(), MAX_FEEDBACK_BYTES, "feedback").await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::InvalidRequest("feedback is not UTF-8 text".into()))?;
    let mut items = Vec::new();
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => items.push(feedback_item(v, 1)?),
        Err(_) => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v = serde_json::from_str(line).map_err(|e| {
                    ApiError::InvalidRequest(format!("feedback line {}: invalid JSON: {e}", i + 1))
                })?;
                items.push(feedback_item(v, i + 1)?);
            }
        }
    }
    if items.is_empty() {
        return Err(ApiError::InvalidRequest(
            "no feedback: send {\"request_id\": ..., \"label\": ...} or one such object per line"
                .into(),
        ));
    }
    if items.len() > MAX_FEEDBACK_ITEMS {
        return Err(ApiError::TooLarge(format!(
            "{} feedback items; at most {MAX_FEEDBACK_ITEMS} per request",
            items.len()
        )));
    }
    let owner_of = |function: &str| app.registry.function(function).map(|f| f.owner.to_string());
    let poster = match (caller.is_admin(), caller.tenant()) {
        (true, _) => Poster::Admin,
        (false, Some(tenant)) => Poster::Tenant {
            tenant,
            owner_of: &owner_of,
        },
        (false, None) => return Err(crate::auth::AuthError::Missing.into()),
    };
    // Other nodes' records reach a shared ledger within their commit window.
    let settle = match &app.config.store.database {
        crate::store::DatabaseUrl::Postgres(_) => {
            Duration::from_millis(app.config.metering.commit_interval_ms + 50)
        }
        _ => Duration::ZERO,
    };
    let counts = feedback::record(ledger, &items, &poster, settle).await?;
    if counts.accepted > 0 {
        app.accuracy_changed();
    }
    let m = &app.metrics.models;
    m.feedback("accepted", counts.accepted);
    m.feedback("duplicate", counts.duplicates);
    m.feedback("unknown", counts.unknown);
    let mut resp = json_response(
        StatusCode::ACCEPTED,
        &serde_json::to_value(counts).unwrap_or_default(),
    );
    resp.extensions_mut().insert(super::AuditDetail {
        detail: format!(
            "{} accepted, {} duplicates, {} unknown",
            counts.accepted, counts.duplicates, counts.unknown
        ),
        subject: None,
    });
    Ok(resp)
}

/// The longest quality window: as far back as a usage query would reasonably look.
const MAX_QUALITY_WINDOW: Duration = Duration::from_secs(90 * 24 * 3600);

/// `GET /v1/functions/{name}/versions/{v}/quality[?window=24h]`: the version's predictions
/// in the window and how the labelled ones fared (`accuracy`; `mae`, `rmse` for values).
pub(super) async fn quality(
    app: &Arc<App>,
    name: &str,
    version: &str,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let n = super::version_number(version)?;
    let window = super::window_param(
        query,
        Duration::from_secs(24 * 3600),
        Duration::from_secs(60)..=MAX_QUALITY_WINDOW,
        "from 1m to 90d, e.g. 1h or 24h",
    )?;
    app.registry.route(name, Some(n))?;
    let since = crate::unix_ms() - window.as_millis() as i64;
    let q = feedback::quality(
        super::ledger(app, "predictions and feedback")?,
        name,
        n,
        since,
    )
    .await?;
    let mut json = serde_json::to_value(q).unwrap_or_default();
    json["function"] = name.into();
    json["version"] = n.into();
    json["window"] = humantime::format_duration(window).to_string().into();
    Ok(json_response(StatusCode::OK, &json))
}
