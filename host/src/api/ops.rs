//! Which operation a control-plane request is ([`Op`], from its method and path against
//! [`ROUTES`]), who may do it, and how the audit log names it.

use http::Method;

use super::ApiError;
use crate::app::App;
use crate::auth::{Caller, Scope};

/// One control-plane operation, parsed from the method and path.
#[derive(Debug, Clone, Copy)]
pub(super) enum Op<'a> {
    OpenApi,
    PutBlob(&'a str),
    HeadBlob(&'a str),
    ListFunctions,
    ShowFunction(&'a str),
    DeleteFunction(&'a str),
    ListVersions(&'a str),
    CreateVersion(&'a str),
    ShowVersion(&'a str, &'a str),
    VersionStats(&'a str, &'a str),
    VersionDrift(&'a str, &'a str),
    VersionQuality(&'a str, &'a str),
    SetReference(&'a str, &'a str),
    Logs(&'a str),
    GetVariables(&'a str),
    ChangeVariables(&'a str),
    Feedback,
    ListBudgets,
    PutBudget(&'a str),
    DeleteBudget(&'a str),
    ClearCache(&'a str),
    GetTraffic(&'a str),
    PutTraffic(&'a str),
    GetAlias(&'a str, &'a str),
    PutAlias(&'a str, &'a str),
    DeleteAlias(&'a str, &'a str),
    Promote(&'a str),
    History(&'a str),
    Rollback(&'a str),
    GetRollout(&'a str),
    StartRollout(&'a str),
    ControlRollout(&'a str, &'a str),
    Usage,
    CreateKey,
    ListKeys,
    RevokeKey(&'a str),
    Audit,
    Cluster,
}

/// Every path of the API and the methods it takes (`Allow` on a 405): the router's own
/// table, which the OpenAPI document is checked against. `{...}` matches one segment.
pub(super) const ROUTES: &[(&str, &str)] = &[
    ("/v1/openapi.json", "GET, HEAD"),
    ("/v1/blobs/{digest}", "PUT, HEAD"),
    ("/v1/functions", "GET, HEAD"),
    ("/v1/functions/{name}", "GET, HEAD, DELETE"),
    ("/v1/functions/{name}/versions", "GET, HEAD, POST"),
    ("/v1/functions/{name}/versions/{version}", "GET, HEAD"),
    ("/v1/functions/{name}/versions/{version}/stats", "GET, HEAD"),
    ("/v1/functions/{name}/versions/{version}/drift", "GET, HEAD"),
    (
        "/v1/functions/{name}/versions/{version}/quality",
        "GET, HEAD",
    ),
    ("/v1/functions/{name}/versions/{version}/reference", "POST"),
    ("/v1/functions/{name}/logs", "GET, HEAD"),
    ("/v1/functions/{name}/variables", "GET, HEAD, POST"),
    ("/v1/feedback", "POST"),
    ("/v1/budgets", "GET, HEAD"),
    ("/v1/budgets/{tenant}", "PUT, DELETE"),
    ("/v1/functions/{name}/cache", "DELETE"),
    ("/v1/functions/{name}/traffic", "GET, HEAD, PUT"),
    (
        "/v1/functions/{name}/aliases/{alias}",
        "GET, HEAD, PUT, DELETE",
    ),
    ("/v1/functions/{name}/promote", "POST"),
    ("/v1/functions/{name}/history", "GET, HEAD"),
    ("/v1/functions/{name}/rollback", "POST"),
    ("/v1/functions/{name}/rollout", "GET, HEAD, POST"),
    ("/v1/functions/{name}/rollout/{action}", "POST"),
    ("/v1/usage", "GET, HEAD"),
    ("/v1/keys", "GET, HEAD, POST"),
    ("/v1/keys/{id}", "DELETE"),
    ("/v1/audit", "GET, HEAD"),
    ("/v1/cluster", "GET, HEAD"),
];

/// The entry of [`ROUTES`] whose template `segments` (the path after `/v1/`) fill.
fn route_of(segments: &[&str]) -> Option<&'static (&'static str, &'static str)> {
    ROUTES.iter().find(|(template, _)| {
        let parts: Vec<&str> = template.split('/').skip(2).collect();
        parts.len() == segments.len()
            && parts.iter().zip(segments).all(|(p, s)| {
                if p.starts_with('{') {
                    !s.is_empty()
                } else {
                    p == s
                }
            })
    })
}

impl<'a> Op<'a> {
    /// The operation of `method` on `segments` (the path after `/v1/`). `HEAD` is `GET`
    /// without the body (hyper leaves it out), except on blobs, where it is its own check.
    pub(super) fn parse(
        method: &Method,
        segments: &[&'a str],
        path: &str,
    ) -> Result<Op<'a>, ApiError> {
        let Some((_, allow)) = route_of(segments) else {
            return Err(ApiError::NoRoute(format!("{method} {path}")));
        };
        let verb = match method {
            &Method::HEAD if segments.first() != Some(&"blobs") => &Method::GET,
            m => m,
        };
        Ok(match (segments, verb) {
            (["openapi.json"], &Method::GET) => Op::OpenApi,
            (["blobs", d], &Method::PUT) => Op::PutBlob(d),
            (["blobs", d], &Method::HEAD) => Op::HeadBlob(d),
            (["functions"], &Method::GET) => Op::ListFunctions,
            (["functions", n], &Method::GET) => Op::ShowFunction(n),
            (["functions", n], &Method::DELETE) => Op::DeleteFunction(n),
            (["functions", n, "versions"], &Method::GET) => Op::ListVersions(n),
            (["functions", n, "versions"], &Method::POST) => Op::CreateVersion(n),
            (["functions", n, "versions", v], &Method::GET) => Op::ShowVersion(n, v),
            (["functions", n, "versions", v, "stats"], &Method::GET) => Op::VersionStats(n, v),
            (["functions", n, "versions", v, "drift"], &Method::GET) => Op::VersionDrift(n, v),
            (["functions", n, "versions", v, "quality"], &Method::GET) => Op::VersionQuality(n, v),
            (["functions", n, "logs"], &Method::GET) => Op::Logs(n),
            (["functions", n, "variables"], &Method::GET) => Op::GetVariables(n),
            (["functions", n, "variables"], &Method::POST) => Op::ChangeVariables(n),
            (["functions", n, "versions", v, "reference"], &Method::POST) => Op::SetReference(n, v),
            (["feedback"], &Method::POST) => Op::Feedback,
            (["budgets"], &Method::GET) => Op::ListBudgets,
            (["budgets", t], &Method::PUT) => Op::PutBudget(t),
            (["budgets", t], &Method::DELETE) => Op::DeleteBudget(t),
            (["functions", n, "cache"], &Method::DELETE) => Op::ClearCache(n),
            (["functions", n, "traffic"], &Method::GET) => Op::GetTraffic(n),
            (["functions", n, "traffic"], &Method::PUT) => Op::PutTraffic(n),
            (["functions", n, "aliases", a], &Method::GET) => Op::GetAlias(n, a),
            (["functions", n, "aliases", a], &Method::PUT) => Op::PutAlias(n, a),
            (["functions", n, "aliases", a], &Method::DELETE) => Op::DeleteAlias(n, a),
            (["functions", n, "promote"], &Method::POST) => Op::Promote(n),
            (["functions", n, "history"], &Method::GET) => Op::History(n),
            (["functions", n, "rollback"], &Method::POST) => Op::Rollback(n),
            (["functions", n, "rollout"], &Method::GET) => Op::GetRollout(n),
            (["functions", n, "rollout"], &Method::POST) => Op::StartRollout(n),
            (["functions", n, "rollout", a], &Method::POST) => Op::ControlRollout(n, a),
            (["usage"], &Method::GET) => Op::Usage,
            (["keys"], &Method::POST) => Op::CreateKey,
            (["keys"], &Method::GET) => Op::ListKeys,
            (["keys", id], &Method::DELETE) => Op::RevokeKey(id),
            (["audit"], &Method::GET) => Op::Audit,
            (["cluster"], &Method::GET) => Op::Cluster,
            _ => return Err(ApiError::MethodNotAllowed(method.to_string(), allow)),
        })
    }

    /// The audit log's name for it, and what it acts on.
    pub(super) fn describe(self) -> (&'static str, &'a str) {
        match self {
            Op::OpenApi => ("openapi.read", ""),
            Op::PutBlob(d) => ("blob.put", d),
            Op::HeadBlob(d) => ("blob.check", d),
            Op::ListFunctions => ("function.list", ""),
            Op::ShowFunction(n) => ("function.show", n),
            Op::DeleteFunction(n) => ("function.delete", n),
            Op::ListVersions(n) => ("version.list", n),
            Op::CreateVersion(n) => ("version.create", n),
            Op::ShowVersion(n, _) => ("version.show", n),
            Op::VersionStats(n, _) => ("version.stats", n),
            Op::VersionDrift(n, _) => ("version.drift", n),
            Op::VersionQuality(n, _) => ("version.quality", n),
            Op::SetReference(n, _) => ("version.reference.set", n),
            Op::Logs(n) => ("logs.read", n),
            Op::GetVariables(n) => ("variables.show", n),
            Op::ChangeVariables(n) => ("variables.set", n),
            Op::Feedback => ("feedback.post", ""),
            Op::ListBudgets => ("budget.list", ""),
            Op::PutBudget(t) => ("budget.set", t),
            Op::DeleteBudget(t) => ("budget.delete", t),
            Op::ClearCache(n) => ("cache.clear", n),
            Op::GetTraffic(n) => ("traffic.show", n),
            Op::PutTraffic(n) => ("traffic.set", n),
            Op::GetAlias(n, _) => ("alias.show", n),
            Op::PutAlias(n, _) => ("alias.set", n),
            Op::DeleteAlias(n, _) => ("alias.delete", n),
            Op::Promote(n) => ("alias.promote", n),
            Op::History(n) => ("history.show", n),
            Op::Rollback(n) => ("traffic.rollback", n),
            Op::GetRollout(n) => ("rollout.show", n),
            Op::StartRollout(n) => ("rollout.start", n),
            Op::ControlRollout(n, _) => ("rollout.control", n),
            Op::Usage => ("usage.read", ""),
            Op::CreateKey => ("key.create", ""),
            Op::ListKeys => ("key.list", ""),
            Op::RevokeKey(id) => ("key.revoke", id),
            Op::Audit => ("audit.read", ""),
            Op::Cluster => ("cluster.show", ""),
        }
    }

    /// The tenant whose function or key it acts on, when it names one that exists.
    pub(super) fn subject(self, app: &App) -> Option<String> {
        match self {
            Op::ShowFunction(n)
            | Op::DeleteFunction(n)
            | Op::ListVersions(n)
            | Op::CreateVersion(n)
            | Op::ShowVersion(n, _)
            | Op::VersionStats(n, _)
            | Op::VersionDrift(n, _)
            | Op::VersionQuality(n, _)
            | Op::SetReference(n, _)
            | Op::Logs(n)
            | Op::GetVariables(n)
            | Op::ChangeVariables(n)
            | Op::ClearCache(n)
            | Op::GetTraffic(n)
            | Op::PutTraffic(n)
            | Op::GetAlias(n, _)
            | Op::PutAlias(n, _)
            | Op::DeleteAlias(n, _)
            | Op::Promote(n)
            | Op::History(n)
            | Op::Rollback(n)
            | Op::GetRollout(n)
            | Op::StartRollout(n)
            | Op::ControlRollout(n, _) => app.registry.function(n).map(|f| f.owner.to_string()),
            Op::RevokeKey(id) => app.auth.tenant_of_key(id).map(|t| t.to_string()),
            Op::PutBudget(t) | Op::DeleteBudget(t) => Some(t.to_string()),
            _ => None,
        }
    }

    /// Checks that `caller` may do it (what depends on the request's content is checked
    /// by the handler: blob ownership, usage and audit filters).
    pub(super) fn authorize(self, app: &App, caller: &Caller) -> Result<(), ApiError> {
        caller.authenticated()?;
        let owner = |name: &str| app.registry.function(name).map(|f| f.owner.clone());
        match self {
            Op::OpenApi => {}
            Op::PutBlob(_) | Op::HeadBlob(_) => caller.may_upload()?,
            Op::ListFunctions | Op::Feedback => {}
            Op::ShowFunction(n)
            | Op::ListVersions(n)
            | Op::ShowVersion(n, _)
            | Op::VersionStats(n, _)
            | Op::VersionDrift(n, _)
            | Op::VersionQuality(n, _)
            | Op::Logs(n)
            | Op::GetVariables(n)
            | Op::GetTraffic(n)
            | Op::GetAlias(n, _)
            | Op::History(n)
            | Op::GetRollout(n) => {
                if let Some(o) = owner(n) {
                    caller.may_read(n, &o)?;
                }
            }
            Op::DeleteFunction(n)
            | Op::SetReference(n, _)
            | Op::ChangeVariables(n)
            | Op::ClearCache(n)
            | Op::PutTraffic(n)
            | Op::PutAlias(n, _)
            | Op::DeleteAlias(n, _)
            | Op::Promote(n)
            | Op::Rollback(n)
            | Op::StartRollout(n)
            | Op::ControlRollout(n, _) => {
                caller.may_deploy(n, owner(n).as_deref(), false)?;
            }
            Op::CreateVersion(n) => caller.may_deploy(n, owner(n).as_deref(), true)?,
            Op::Usage => caller.need(&Scope::UsageRead)?,
            Op::CreateKey
            | Op::ListKeys
            | Op::RevokeKey(_)
            | Op::Cluster
            | Op::ListBudgets
            | Op::PutBudget(_)
            | Op::DeleteBudget(_) => caller.need(&Scope::Admin)?,
            Op::Audit => caller.need(&Scope::AuditRead)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METHODS: [Method; 5] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
    ];

    fn openapi_operations() -> Vec<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("openapi.json")).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if METHODS
                    .iter()
                    .any(|m| m.as_str().eq_ignore_ascii_case(method))
                {
                    ops.push((path.clone(), method.to_ascii_uppercase()));
                }
            }
        }
        ops.sort();
        ops
    }

    fn routed_operations() -> Vec<(String, String)> {
        let mut ops: Vec<(String, String)> = ROUTES
            .iter()
            .flat_map(|(path, allow)| allow.split(", ").map(|m| (path.to_string(), m.to_string())))
            .collect();
        ops.sort();
        ops
    }

    #[test]
    fn every_route_is_in_the_openapi_document_and_nothing_else_is() {
        assert_eq!(openapi_operations(), routed_operations());
    }

    #[test]
    fn the_router_takes_exactly_the_methods_its_table_names() {
        for (template, allow) in ROUTES {
            let path = template
                .split('/')
                .map(|p| if p.starts_with('{') { "x" } else { p })
                .collect::<Vec<_>>()
                .join("/");
            let segments: Vec<&str> = path.split('/').skip(2).collect();
            for m in &METHODS {
                let listed = allow.split(", ").any(|a| a == m.as_str());
                match Op::parse(m, &segments, &path) {
                    Ok(_) => assert!(listed, "{m} {template} is routed but not in its Allow"),
                    Err(ApiError::MethodNotAllowed(_, a)) => {
                        assert!(!listed, "{m} {template} is listed but refused");
                        assert_eq!(a, *allow);
                    }
                    Err(e) => panic!("{m} {template}: {e}"),
                }
            }
        }
        for bad in [
            "/v1/nothing",
            "/v1/functions/x/y",
            "/v1/functions//versions",
        ] {
            let segments: Vec<&str> = bad.split('/').skip(2).collect();
            assert!(matches!(
                Op::parse(&Method::GET, &segments, bad),
                Err(ApiError::NoRoute(_))
            ));
        }
    }
}
