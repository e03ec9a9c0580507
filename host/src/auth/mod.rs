//! Who may do what: API keys and their scopes, the tenant each request acts for (and
//! bills), rate limits per key, and the audit log of control-plane actions.
//!
//! Keys live in the database (hashed; [`KeyStore`]) and in memory (by hash), so a request is authenticated
//! with one SHA-256 and one map lookup, and a revocation takes effect on the next request.
//! Bootstrap: `KILN_ADMIN_KEY` names an admin key; without it and without any key, a
//! server on loopback makes one and prints it once, and a server on any other address
//! refuses to start unless `--insecure` turns authentication off.

pub mod audit;
pub mod key_store;
pub mod keys;
pub mod rate;
pub mod signing;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use http::HeaderMap;

pub use audit::{AuditEntry, AuditLog, AuditQuery};
pub use key_store::{KeyRow, KeyStore};
pub use keys::{ApiKey, Pattern, Scope};
pub use rate::{Limiter, Nodes};

use crate::common::Rate;

/// Tenant of functions made with authentication off, and of the bootstrap admin key.
pub const DEFAULT_TENANT: &str = "default";

/// Why a key could not be created: the request (answered 400) or the store (500, or 503
/// while the database is away).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(anyhow::Error),
}

/// Why a request is refused before it reaches a function or the control plane.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("this call needs an API key: send it as 'authorization: Bearer <key>'")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
    #[error("API key {0} has been revoked")]
    Revoked(String),
    #[error("{0}")]
    Forbidden(String),
    /// Another tenant's function, answered as if it did not exist.
    #[error("function {0:?} does not exist")]
    Hidden(String),
    /// Over a rate limit; `retry_after` is when the next request would pass.
    #[error("rate limit of {what} exceeded ({rate}); retry in {}s", retry_secs(.retry_after))]
    RateLimited {
        what: String,
        rate: Rate,
        retry_after: Duration,
    },
}

/// Whole seconds to wait, at least one (what `retry-after` carries).
pub fn retry_secs(d: &Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off (`--insecure` with no keys): every right, tenant `default`.
    Open,
    /// A valid key.
    Key(Arc<ApiKey>),
    /// No key: only public functions.
    Anonymous,
}

impl Caller {
    /// The tenant the caller acts for; `None` for an anonymous caller.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Open => Some(DEFAULT_TENANT),
            Caller::Key(k) => Some(&k.tenant),
            Caller::Anonymous => None,
        }
    }

    /// The calling key's id.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Caller::Key(k) => Some(&k.id),
            _ => None,
        }
    }

    /// Whether the caller has every right.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key(k) => k.is_admin(),
            Caller::Anonymous => false,
        }
    }

    fn key(&self) -> Result<Option<&ApiKey>, AuthError> {
        match self {
            Caller::Open => Ok(None),
            Caller::Key(k) => Ok(Some(k)),
            Caller::Anonymous => Err(AuthError::Missing),
        }
    }

    /// Any authenticated caller.
    pub fn authenticated(&self) -> Result<(), AuthError> {
        self.key().map(|_| ())
    }

    /// Checks the caller holds `scope` (or admin).
    pub fn need(&self, scope: &Scope) -> Result<(), AuthError> {
        match self.key()? {
            Some(k) if !k.has(scope) => Err(AuthError::Forbidden(format!(
                "API key {} lacks the {scope} scope",
                k.id
            ))),
            _ => Ok(()),
        }
    }

    /// The tenant filter of a read of `what` (usage, the audit log): as asked for an admin;
    /// for anyone else, their own tenant, and asking for another is refused.
    pub fn tenant_filter(
        &self,
        asked: Option<String>,
        what: &str,
    ) -> Result<Option<String>, AuthError> {
        if self.is_admin() {
            return Ok(asked);
        }
        let own = self.tenant().unwrap_or_default();
        match asked {
            Some(t) if t != own => Err(AuthError::Forbidden(format!(
                "this key reads the {what} of tenant {own:?} only"
            ))),
            _ => Ok(Some(own.to_string())),
        }
    }

    /// Checks the caller may upload blobs: any deploy scope.
    pub fn may_upload(&self) -> Result<(), AuthError> {
        match self.key()? {
            Some(k) if !k.is_admin() && !k.scopes.iter().any(|s| matches!(s, Scope::Deploy(_))) => {
                Err(AuthError::Forbidden(format!(
                    "API key {} has no deploy scope: uploading blobs needs one",
                    k.id
                )))
            }
            _ => Ok(()),
        }
    }

    /// Checks the caller may see function `name` owned by `owner`: its own tenant's, or
    /// admin. Another tenant's function looks absent.
    pub fn may_read(&self, name: &str, owner: &str) -> Result<(), AuthError> {
        match self.key()? {
            Some(k) if !k.is_admin() && *k.tenant != *owner => {
                Err(AuthError::Hidden(name.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Checks the caller may deploy to (`creating`), or delete or clear the caches of,
    /// function `name`, owned by `owner` when it exists. Creating a version of another
    /// tenant's function is refused (the name is taken); touching it otherwise finds
    /// nothing.
    pub fn may_deploy(
        &self,
        name: &str,
        owner: Option<&str>,
        creating: bool,
    ) -> Result<(), AuthError> {
        let Some(k) = self.key()? else { return Ok(()) };
        match owner {
            Some(o) if !k.is_admin() && *k.tenant != *o => {
                return Err(match creating {
                    true => not_yours(k, name),
                    false => AuthError::Hidden(name.to_string()),
                });
            }
            _ => {}
        }
        if !k.may_deploy(name) {
            return Err(AuthError::Forbidden(format!(
                "API key {} has no deploy scope matching function {name:?}",
                k.id
            )));
        }
        Ok(())
    }

    /// Checks the caller may call function `name` owned by `owner` (public ones need no key).
    pub fn may_invoke(&self, name: &str, owner: &str, public: bool) -> Result<(), AuthError> {
        if public {
            return Ok(());
        }
        let Some(k) = self.key()? else { return Ok(()) };
        if !k.is_admin() && *k.tenant != *owner {
            return Err(AuthError::Hidden(name.to_string()));
        }
        if !k.may_invoke(name) {
            return Err(AuthError::Forbidden(format!(
                "API key {} has no invoke scope matching function {name:?}",
                k.id
            )));
        }
        Ok(())
    }
}

fn not_yours(k: &ApiKey, name: &str) -> AuthError {
    AuthError::Forbidden(format!(
        "the name {name:?} is taken by a function of another tenant than {:?}",
        &*k.tenant
    ))
}

impl AuthError {
    /// Short name of the refusal, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_key",
            AuthError::Invalid => "invalid_key",
            AuthError::Revoked(_) => "revoked_key",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::Hidden(_) => "not_found",
            AuthError::RateLimited { .. } => "rate_limited",
        }
    }
}

/// What `POST /v1/keys` asks for.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub tenant: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub rate: Option<Rate>,
}

/// Keys (in memory and in the database) and the audit log.
pub struct Auth {
    store: KeyStore,
    keys: RwLock<HashMap<[u8; 32], Arc<ApiKey>>>,
    /// Authentication is off: `--insecure` and no key. Turned off for good (this run) by
    /// the first key created.
    open: AtomicBool,
    default_rate: Option<Rate>,
    /// The live nodes, whose number splits every key's rate.
    nodes: Nodes,
    audit: AuditLog,
    /// Held by every change to the keys and by reloads, so a reload that read the rows
    /// before a change cannot undo it in memory (bring back a key just revoked).
    changing: tokio::sync::Mutex<()>,
}

/// How the server was started, for the bootstrap decision.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `KILN_ADMIN_KEY`.
    pub admin_key: Option<String>,
    pub listen: SocketAddr,
    /// `--insecure`: with no keys, serve without authentication instead of refusing.
    pub insecure: bool,
}

/// Shortest `KILN_ADMIN_KEY` accepted.
pub const MIN_ADMIN_KEY_LEN: usize = 24;

impl Auth {
    /// Loads the keys of `store`, takes the audit log, and applies the bootstrap rules.
    /// Returns the new admin key's secret when one was made (to print, once).
    pub async fn open(
        store: KeyStore,
        audit: AuditLog,
        boot: &Bootstrap,
        default_rate: Option<Rate>,
        nodes: Nodes,
    ) -> anyhow::Result<(Auth, Option<String>)> {
        let auth = Auth {
            store,
            keys: RwLock::new(HashMap::new()),
            open: AtomicBool::new(false),
            default_rate,
            nodes,
            audit,
            changing: tokio::sync::Mutex::new(()),
        };
        auth.load().await?;
        if let Some(secret) = &boot.admin_key {
            auth.adopt_admin_key(secret).await?;
        }
        let any_active = auth.list().iter().any(|k| k.revoked_at.is_none());
        let mut printed = None;
        if !any_active {
            if boot.insecure {
                tracing::warn!(listen = %boot.listen, "no API keys and --insecure: authentication is OFF, every caller is an admin, until a key is created");
                auth.open.store(true, Ordering::SeqCst);
            } else if boot.listen.ip().is_loopback() {
                let (id, secret) = keys::generate()?;
                auth.insert(&id, &secret, DEFAULT_TENANT, &[Scope::Admin], None, None)
                    .await?;
                auth.record_system("key.bootstrap", &id, "admin key made at first start")
                    .await;
                printed = Some(secret);
            } else {
                bail!(
                    "refusing to listen on {} with no API keys: set KILN_ADMIN_KEY to an admin key \
                     (at least {MIN_ADMIN_KEY_LEN} characters), or pass --insecure to serve without authentication",
                    boot.listen
                );
            }
        }
        Ok((auth, printed))
    }

    /// Whether authentication is off.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    fn limiter(&self, rate: Option<Rate>) -> Option<Arc<Limiter>> {
        rate.or(self.default_rate)
            .map(|r| Arc::new(Limiter::new(r, &self.nodes)))
    }

    /// Reads the keys again (made or revoked on another node): a revoked key is refused
    /// from the next request on; unchanged keys keep their rate-limit state.
    pub async fn reload(&self) -> anyhow::Result<()> {
        let _changing = self.changing.lock().await;
        self.load().await
    }

    async fn load(&self) -> anyhow::Result<()> {
        let rows = self.store.load().await?;
        let old = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut map = HashMap::new();
        for row in rows {
            let KeyRow {
                id,
                hash,
                tenant,
                scopes,
                rate,
                created_at,
                created_by,
                revoked_at,
            } = row;
            let hash: [u8; 32] = hash
                .try_into()
                .map_err(|_| anyhow::anyhow!("corrupt hash of API key {id}"))?;
            if let Some(k) = old.get(&hash)
                && k.id == id
                && k.revoked_at == revoked_at
            {
                map.insert(hash, k.clone());
                continue;
            }
            let scopes: Vec<String> = serde_json::from_str(&scopes)
                .with_context(|| format!("corrupt scopes of API key {id}"))?;
            let scopes = scopes
                .iter()
                .map(|s| s.parse())
                .collect::<Result<Vec<Scope>, _>>()
                .map_err(|e| anyhow::anyhow!("API key {id}: {e}"))?;
            let rate = rate
                .map(|r| r.parse::<Rate>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("API key {id}: {e}"))?;
            let limiter = self.limiter(rate);
            map.insert(
                hash,
                Arc::new(ApiKey {
                    id,
                    tenant: tenant.into(),
                    scopes,
                    rate,
                    created_at,
                    created_by,
                    revoked_at,
                    limiter,
                }),
            );
        }
        if map.values().any(|k| k.revoked_at.is_none()) {
            // A key made on another node ends authentication-off here too.
            self.open.store(false, Ordering::SeqCst);
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    async fn insert(
        &self,
        id: &str,
        secret: &str,
        tenant: &str,
        scopes: &[Scope],
        rate: Option<Rate>,
        created_by: Option<&str>,
    ) -> anyhow::Result<Arc<ApiKey>> {
        let hash = keys::hash(secret);
        let created_at = crate::unix_ms() / 1000;
        let scope_strings: Vec<String> = scopes.iter().map(Scope::to_string).collect();
        let scope_json = serde_json::to_string(&scope_strings)?;
        self.store
            .insert(&KeyRow {
                id: id.to_string(),
                hash: hash.to_vec(),
                tenant: tenant.to_string(),
                scopes: scope_json,
                rate: rate.map(|r| r.to_string()),
                created_at,
                created_by: created_by.map(str::to_string),
                revoked_at: None,
            })
            .await?;
        let key = Arc::new(ApiKey {
            id: id.to_string(),
            tenant: tenant.into(),
            scopes: scopes.to_vec(),
            rate,
            created_at,
            created_by: created_by.map(str::to_string),
            revoked_at: None,
            limiter: self.limiter(rate),
        });
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, key.clone());
        // From the first key on, every call needs one.
        self.open.store(false, Ordering::SeqCst);
        Ok(key)
    }

    /// Makes `KILN_ADMIN_KEY` an admin key (once; a revoked one stays revoked).
    async fn adopt_admin_key(&self, secret: &str) -> anyhow::Result<()> {
        if secret.len() < MIN_ADMIN_KEY_LEN {
            bail!(
                "KILN_ADMIN_KEY is too short: use at least {MIN_ADMIN_KEY_LEN} random characters"
            );
        }
        let hash = keys::hash(secret);
        if let Some(k) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
        {
            if k.revoked_at.is_some() {
                tracing::warn!(key = %k.id, "KILN_ADMIN_KEY names a revoked key; it stays revoked");
            }
            return Ok(());
        }
        let id = keys::id_of(secret)?;
        let older: Vec<String> = self
            .list()
            .iter()
            .filter(|k| k.created_by.is_none() && k.is_admin() && k.revoked_at.is_none())
            .map(|k| k.id.clone())
            .collect();
        if !older.is_empty() {
            tracing::warn!(
                keys = older.join(","),
                "KILN_ADMIN_KEY is new; earlier bootstrap admin keys stay valid until revoked (kiln keys revoke ID)"
            );
        }
        self.insert(&id, secret, DEFAULT_TENANT, &[Scope::Admin], None, None)
            .await?;
        self.record_system("key.bootstrap", &id, "admin key from KILN_ADMIN_KEY")
            .await;
        Ok(())
    }

    /// Identifies the caller of a request from its `authorization` header, and takes one
    /// request from its key's rate budget.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(if self.is_open() {
                Caller::Open
            } else {
                Caller::Anonymous
            });
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or(AuthError::Invalid)?;
        let key = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&keys::hash(token))
            .cloned()
            .ok_or(AuthError::Invalid)?;
        if key.revoked_at.is_some() {
            return Err(AuthError::Revoked(key.id.clone()));
        }
        if let Some(l) = &key.limiter {
            l.check().map_err(|retry_after| AuthError::RateLimited {
                what: format!("API key {}", key.id),
                rate: l.rate(),
                retry_after,
            })?;
        }
        Ok(Caller::Key(key))
    }

    /// Creates a key; returns it with its secret (shown this once).
    pub async fn create(
        &self,
        new: &NewKey,
        by: &Caller,
    ) -> Result<(Arc<ApiKey>, String), KeyError> {
        let _changing = self.changing.lock().await;
        keys::validate_tenant(&new.tenant).map_err(KeyError::Invalid)?;
        if new.scopes.is_empty() {
            return Err(KeyError::Invalid("a key needs at least one scope".into()));
        }
        let scopes = new
            .scopes
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<Scope>, _>>()
            .map_err(KeyError::Invalid)?;
        let (id, secret) = keys::generate().map_err(|e| KeyError::Store(e.into()))?;
        let key = self
            .insert(&id, &secret, &new.tenant, &scopes, new.rate, by.key_id())
            .await
            .map_err(|e| KeyError::Store(e.context("storing the key")))?;
        Ok((key, secret))
    }
    /// Every key, oldest first.
    pub fn list(&self) -> Vec<Arc<ApiKey>> {
        let mut all: Vec<_> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// Revokes key `id`: refused from the next request on; `None` when there is no such
    /// key. The database is written first, without holding up authentication, then the
    /// key is swapped in memory.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<Option<Arc<ApiKey>>> {
        let _changing = self.changing.lock().await;
        let found = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, k)| k.id == id)
            .map(|(h, k)| (*h, k.clone()));
        let Some((hash, key)) = found else {
            return Ok(None);
        };
        if key.revoked_at.is_some() {
            return Ok(Some(key));
        }
        let at = crate::unix_ms() / 1000;
        self.store.revoke(id, at).await?;
        let revoked = Arc::new(ApiKey {
            id: key.id.clone(),
            tenant: key.tenant.clone(),
            scopes: key.scopes.clone(),
            rate: key.rate,
            created_at: key.created_at,
            created_by: key.created_by.clone(),
            revoked_at: Some(at),
            limiter: None,
        });
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, revoked.clone());
        Ok(Some(revoked))
    }

    /// Appends an action to the audit log; `subject` is the tenant acted on, when known.
    /// A failure to write it is logged, not answered: the action has happened already.
    pub async fn record(
        &self,
        caller: Option<&Caller>,
        action: &str,
        target: &str,
        subject: Option<&str>,
        status: u16,
        detail: &str,
    ) {
        let outcome = match status {
            200..=399 => "ok",
            401 | 403 | 429 => "denied",
            _ => "failed",
        };
        let at_ms = crate::unix_ms();
        let entry = AuditEntry {
            seq: 0,
            at_ms,
            at: String::new(),
            key_id: caller.and_then(Caller::key_id).map(str::to_string),
            tenant: caller.and_then(Caller::tenant).map(str::to_string),
            subject_tenant: subject.map(str::to_string),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            status,
            detail: detail.to_string(),
        };
        if let Err(e) = self.audit.append(&entry).await {
            tracing::error!(action, subject = target, "writing the audit log: {e}");
        }
    }

    async fn record_system(&self, action: &str, target: &str, detail: &str) {
        self.record(None, action, target, Some(DEFAULT_TENANT), 200, detail)
            .await;
    }

    /// Audit entries matching `q`, newest first.
    pub async fn audit(&self, q: &AuditQuery) -> anyhow::Result<Vec<AuditEntry>> {
        self.audit.query(q).await
    }

    /// The tenant of key `id`, if there is one.
    pub fn tenant_of_key(&self, id: &str) -> Option<Arc<str>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|k| k.id == id)
            .map(|k| k.tenant.clone())
    }
}
