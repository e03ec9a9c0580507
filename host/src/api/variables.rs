//! `/v1/functions/{name}/variables`: the values a function's guests read, for every request
//! or for one alias's. `GET` lists them (a secret's value is never shown); `POST` sets and
//! removes some in one change, audited by name only.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use serde::Deserialize;

use super::{ApiError, AuditDetail};
use crate::app::{Actor, App, SetValue};
use crate::auth::Caller;
use crate::common::time::format_time;
use crate::deploy::RouteError;
use crate::server::{Body, json_response};

/// Largest change accepted, in bytes (64 values of 16 KiB, and their names).
const MAX_CHANGE_BYTES: usize = 1100 << 10;

/// One value of a change: the text, or `{"value", "secret"}` (no `Debug`: it may be a
/// secret).
#[derive(Deserialize)]
#[serde(untagged)]
enum NewValue {
    Text(String),
    Full {
        value: String,
        #[serde(default)]
        secret: bool,
    },
}

/// The body of `POST /v1/functions/{name}/variables`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    /// The alias whose requests the values are for; none (or `default`): every request.
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    set: BTreeMap<String, NewValue>,
    #[serde(default)]
    unset: Vec<String>,
}

/// `GET /v1/functions/{name}/variables[?alias=A]`: the values set (of alias `A` only, with
/// `alias`), and what the newest version declares.
pub(super) fn get(app: &Arc<App>, name: &str, query: &str) -> Result<Response<Body>, ApiError> {
    let mut alias = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "alias" => alias = Some(super::percent_decode(v).map_err(ApiError::InvalidRequest)?),
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown query parameter {other:?} (this endpoint takes alias)"
                )));
            }
        }
    }
    let scope = match alias.as_deref() {
        None | Some(crate::deploy::DEFAULT_ALIAS) => None,
        Some(a) => Some(a),
    };
    let f = app
        .registry
        .function(name)
        .ok_or_else(|| RouteError::NoFunction(name.to_string()))?;
    let values: Vec<serde_json::Value> = f
        .variables
        .iter()
        .filter(|(s, _, _)| alias.is_none() || Some(*s) == scope.or(Some("")))
        .map(|(s, key, v)| {
            // A value set in clear before a version declared its key secret is shown as
            // the secret it has become.
            let secret = v.secret || crate::app::is_secret(&f, key);
            let mut json = serde_json::json!({
                "key": key,
                "secret": secret,
                "updated_at": format_time(v.updated_ms),
            });
            if !s.is_empty() {
                json["alias"] = s.into();
            }
            match (&v.text, secret) {
                (Some(text), false) => json["value"] = (**text).into(),
                (None, true) => json["unreadable"] = true.into(),
                _ => {}
            }
            if let Some(by) = &v.updated_by {
                json["updated_by"] = by.as_str().into();
            }
            json
        })
        .collect();
    let declared = f
        .latest()
        .map(|v| serde_json::to_value(&v.record.variables).unwrap_or_default())
        .unwrap_or_else(|| serde_json::json!({}));
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"function": name, "variables": values, "declared": declared}),
    ))
}

/// `POST /v1/functions/{name}/variables` (`{"alias"?, "set"?: {key: value or {"value",
/// "secret"}}, "unset"?: [key]}`): one change, applied to new requests at once.
pub(super) async fn change(
    app: &Arc<App>,
    name: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let bytes =
        super::read_small_body(req.into_body(), MAX_CHANGE_BYTES, "variables change").await?;
    // serde's messages quote the values they stumble on, and these may be secrets: say
    // where, never what.
    let change: Change = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "invalid variables change at line {} column {}: expected {{\"alias\"?: name, \"set\"?: {{key: \"value\" or {{\"value\": \"...\", \"secret\": true}}}}, \"unset\"?: [key]}}",
            e.line(),
            e.column()
        ))
    })?;
    let set: Vec<SetValue> = change
        .set
        .into_iter()
        .map(|(key, v)| match v {
            NewValue::Text(value) => SetValue {
                key,
                value,
                secret: false,
            },
            NewValue::Full { value, secret } => SetValue { key, value, secret },
        })
        .collect();
    // The audit log keeps names, never values.
    let mut detail: Vec<String> = set.iter().map(|v| format!("set {}", v.key)).collect();
    detail.extend(change.unset.iter().map(|k| format!("unset {k}")));
    let alias = change.alias.as_deref();
    app.change_variables(name, alias, set, change.unset.clone(), &Actor::of(caller))
        .await?;
    let mut resp = get(app, name, "")?;
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "{}{}",
            alias.map(|a| format!("alias {a}: ")).unwrap_or_default(),
            detail.join(", ")
        ),
        subject: None,
    });
    Ok(resp)
}
