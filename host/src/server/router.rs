//! Top-level routing and the request id. Every response carries `x-kiln-request-id`;
//! every error is JSON `{"error":{"code","message"}}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::{Body, full};
use crate::api::{self, ApiError};
use crate::app::App;
use crate::auth::AuthError;

/// Header carrying the request id, echoed on every response.
pub const REQUEST_ID: &str = "x-kiln-request-id";

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A new request id: this node's id, the process's start (nanoseconds) and a counter,
/// unique across the nodes of a cluster and across restarts (the usage ledger keys records
/// by it), cheap, sortable per process.
fn request_id(node: &str) -> HeaderValue {
    static EPOCH: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    });
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    HeaderValue::try_from(format!("{node}-{epoch:x}-{n:x}"))
        .unwrap_or(HeaderValue::from_static("0"))
}

/// Handles one request from any connection.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let id = request_id(&app.node_id);
    // The data plane's requests are logged as they end (their body may stream on), with
    // their function and outcome; the others here, when their answer is ready.
    let access =
        (app.config.server.access_log && !req.uri().path().starts_with("/fn/")).then(|| {
            (
                std::time::Instant::now(),
                req.method().clone(),
                req.uri().path().to_string(),
            )
        });
    let path = req.uri().path();
    let mut resp = if path.starts_with("/fn/") {
        let _counted = app.metrics.request();
        super::data_plane::handle(&app, req, &id).await
    } else if path == "/healthz" {
        // Liveness only: open to anyone, so it says nothing about tenants or functions,
        // and it takes no lock a request could hold.
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"status": "ok"}),
        ))
    } else if path == "/readyz" {
        app.readiness()
            .await
            .map(|ready| json_response(StatusCode::OK, &ready))
            .map_err(ApiError::Unavailable)
    } else if path == "/metrics" {
        // Metrics name every tenant's functions: an admin or metrics:read key reads them.
        app.auth
            .authenticate(req.headers())
            .and_then(|c| c.need(&crate::auth::Scope::MetricsRead))
            .map_err(ApiError::from)
            .map(|()| {
                let mut resp = Response::new(full(app.metrics.encode()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            })
    } else if path.starts_with("/v1/") {
        api::handle(&app, req).await
    } else {
        Err(ApiError::NoRoute(format!("{} {path}", req.method())))
    }
    .unwrap_or_else(|e| {
        if let ApiError::Auth(a) = &e {
            app.metrics.refused(a.reason());
        }
        log_error(&e, &id);
        error_response(&e)
    });
    if let Some((started, method, path)) = access {
        access_line(&id, &method, &path, resp.status(), started);
    }
    resp.headers_mut().insert(REQUEST_ID, id);
    resp
}

/// One access-log line of a request that names no function version (`[server] access_log`).
pub(super) fn access_line(
    id: &HeaderValue,
    method: &http::Method,
    path: &str,
    status: StatusCode,
    started: std::time::Instant,
) {
    let status = status.as_u16();
    tracing::info!(
        target: "kiln::access",
        request_id = id.to_str().unwrap_or_default(),
        method = method.as_str(),
        path,
        status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "{status} {method} {path}"
    );
}

/// Logs a 5xx once, with the request's id (a 4xx is the client's business).
fn log_error(e: &ApiError, id: &HeaderValue) {
    if !e.status().is_server_error() {
        return;
    }
    let request_id = id.to_str().unwrap_or_default();
    match e {
        ApiError::Invoke(_) | ApiError::Overloaded(_) => {
            tracing::info!(request_id, code = e.code(), "{e:#}")
        }
        // A flood answered fast must not become a flood of log lines.
        ApiError::Busy(_) => tracing::debug!(request_id, code = e.code(), "{e:#}"),
        _ => tracing::error!(request_id, code = e.code(), "{e:#}"),
    }
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The one conversion of an [`ApiError`] into a response (5xx are logged by the caller,
/// with the request's id).
pub fn error_response(e: &ApiError) -> Response<Body> {
    let status = e.status();
    let mut resp = json_response(status, &e.to_json());
    match e {
        ApiError::Overloaded(_) | ApiError::Busy(_) => {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        ApiError::MethodNotAllowed(_, allow) => {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        ApiError::Auth(AuthError::RateLimited { retry_after, .. }) => {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(crate::auth::retry_secs(retry_after)),
            );
        }
        _ if status == StatusCode::UNAUTHORIZED => {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kiln\""),
            );
        }
        _ => {}
    }
    resp
}
