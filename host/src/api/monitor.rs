//! Model monitoring over the API: `GET /v1/functions/{name}/versions/{v}/drift` scores
//! what a version's monitored models saw in a window against their references.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};

use super::ApiError;
use crate::app::App;
use crate::monitor::{DriftState, MIN_SAMPLES, live};
use crate::server::{Body, json_response};

/// The window a drift answer covers unless `window=` says otherwise.
const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Parses `window=` (`15m`, `1h`, `24h`): from a minute to the hour buckets kept.
fn window_of(query: &str) -> Result<Duration, ApiError> {
    let mut window = DEFAULT_WINDOW;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("window", w)) => {
                let w = super::percent_decode(w).map_err(ApiError::InvalidRequest)?;
                window = humantime::parse_duration(&w)
                    .ok()
                    .filter(|d| (60..=live::HOURS * 3600).contains(&d.as_secs()))
                    .ok_or_else(|| {
                        ApiError::InvalidRequest(format!(
                            "window={w:?}: a duration from 1m to {}h, e.g. 15m or 24h",
                            live::HOURS
                        ))
                    })?;
            }
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown parameter {pair:?} (known: window)"
                )));
            }
        }
    }
    Ok(window)
}

/// `GET /v1/functions/{name}/versions/{v}/drift[?window=15m]`: per monitored model, each
/// feature's score against the reference and the prediction's class shares; `drifted` when
/// any passes its threshold on at least [`MIN_SAMPLES`] rows.
pub(super) fn drift(
    app: &Arc<App>,
    name: &str,
    version: &str,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let n: u32 = version.parse().map_err(|_| {
        ApiError::InvalidRequest(format!("invalid version {version:?}: expected a number"))
    })?;
    let window = window_of(query)?;
    let entry = app.registry.route(name, Some(n))?;
    let monitors: Vec<_> = entry.models.monitors().collect();
    if monitors.is_empty() {
        return Err(ApiError::NotFound(
            format!(
                "version {n} of {name} monitors no model: deploy it with [models.<name>.monitor] and a reference"
            ),
            "monitor.not_configured",
        ));
    }
    let window_ms = window.as_millis() as u64;
    let models: Vec<DriftState> = monitors.iter().map(|(_, m)| m.drift(window_ms)).collect();
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
            "models": models,
        }),
    ))
}
