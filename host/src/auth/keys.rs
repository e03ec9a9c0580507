//! API keys: what a key may do ([`Scope`]), who it bills (its tenant), and how secrets are
//! made and kept. A secret is 32 random bytes shown once, `kiln_<id>_<hex>`; the server
//! keeps only its SHA-256, so a copy of the database lets no one in.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::rate::Limiter;
use crate::common::Rate;

/// What a key may do. Function patterns match names with `*` as a wildcard; they only ever
/// reach the functions of the key's own tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything, every tenant: keys, the audit log, all functions and usage.
    Admin,
    /// Upload blobs, create versions of, delete and clear the caches of matching functions.
    Deploy(Pattern),
    /// Call matching (private) functions.
    Invoke(Pattern),
    /// Read the tenant's usage.
    UsageRead,
    /// Read the tenant's entries of the audit log.
    AuditRead,
    /// Scrape `/metrics` (which names every tenant's functions), and nothing else.
    MetricsRead,
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let pattern = |p: &str| Pattern::new(p).map_err(|e| format!("scope {s:?}: {e}"));
        Ok(match s.split_once(':') {
            None if s == "admin" => Scope::Admin,
            None if s == "deploy" => Scope::Deploy(pattern("*")?),
            None if s == "invoke" => Scope::Invoke(pattern("*")?),
            Some(("deploy", p)) => Scope::Deploy(pattern(p)?),
            Some(("invoke", p)) => Scope::Invoke(pattern(p)?),
            Some(("usage", "read")) => Scope::UsageRead,
            Some(("audit", "read")) => Scope::AuditRead,
            Some(("metrics", "read")) => Scope::MetricsRead,
            _ => {
                return Err(format!(
                    "unknown scope {s:?}: use admin, deploy:PATTERN, invoke:PATTERN, usage:read, audit:read or metrics:read"
                ));
            }
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Deploy(p) => write!(f, "deploy:{p}"),
            Scope::Invoke(p) => write!(f, "invoke:{p}"),
            Scope::UsageRead => f.write_str("usage:read"),
            Scope::AuditRead => f.write_str("audit:read"),
            Scope::MetricsRead => f.write_str("metrics:read"),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A function-name pattern: the characters of a name, plus `*` for any run of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Checks the characters (those of function names, and `*`).
    pub fn new(p: &str) -> Result<Self, String> {
        let ok = !p.is_empty()
            && p.len() <= 63
            && p.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'*')
            });
        if ok {
            Ok(Pattern(p.to_string()))
        } else {
            Err(format!(
                "invalid function pattern {p:?}: use a-z, 0-9, '-', '_' and '*' (any run)"
            ))
        }
    }

    /// Whether `name` matches: `*` stands for any (possibly empty) run of characters.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One API key as the server knows it (never its secret).
#[derive(Debug, Serialize)]
pub struct ApiKey {
    pub id: String,
    /// The tenant it acts for and bills.
    #[serde(serialize_with = "as_str")]
    pub tenant: Arc<str>,
    pub scopes: Vec<Scope>,
    /// Its own rate limit; unset takes the server's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Unix seconds (RFC 3339 in answers).
    #[serde(serialize_with = "crate::common::time::serialize_secs")]
    pub created_at: i64,
    /// Id of the key that created it (none for the bootstrap key).
    pub created_by: Option<String>,
    /// Unix seconds (RFC 3339 in answers); set once revoked, and from then on the key is
    /// refused.
    #[serde(serialize_with = "revoked_at")]
    pub revoked_at: Option<i64>,
    /// The key's request budget (its rate, or the server's default).
    #[serde(skip)]
    pub limiter: Option<Arc<Limiter>>,
}

fn revoked_at<S: serde::Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(secs) => crate::common::time::serialize_secs(secs, s),
        None => s.serialize_none(),
    }
}

fn as_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

impl ApiKey {
    /// Whether the key holds `admin`.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether the key may deploy (or delete, or clear the caches of) function `name`,
    /// ownership aside.
    pub fn may_deploy(&self, name: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Admin => true,
            Scope::Deploy(p) => p.matches(name),
            _ => false,
        })
    }

    /// Whether the key may call function `name`, ownership aside.
    pub fn may_invoke(&self, name: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Admin => true,
            Scope::Invoke(p) => p.matches(name),
            _ => false,
        })
    }

    /// Whether the key holds `scope` (or `admin`).
    pub fn has(&self, scope: &Scope) -> bool {
        self.is_admin() || self.scopes.contains(scope)
    }
}

/// Length of a key id, in hex characters.
const ID_HEX: usize = 12;

/// A new secret and its id: `kiln_<id>_<64 hex>`.
pub fn generate() -> std::io::Result<(String, String)> {
    let mut bytes = [0u8; 6 + 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let id = hex::encode(&bytes[..6]);
    debug_assert_eq!(id.len(), ID_HEX);
    let secret = format!("kiln_{id}_{}", hex::encode(&bytes[6..]));
    Ok((id, secret))
}

/// What the server stores of a secret.
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The id of a key given from outside (`KILN_ADMIN_KEY`): the id inside a Kiln-made secret,
/// or a random one (nothing derived from the secret, which could be checked offline).
pub fn id_of(secret: &str) -> std::io::Result<String> {
    let mut parts = secret.splitn(3, '_');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("kiln"), Some(id), Some(_))
            if id.len() == ID_HEX && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(id.to_string())
        }
        _ => generate().map(|(id, _)| id),
    }
}

/// Validates a tenant name (the rules of function names).
pub fn validate_tenant(tenant: &str) -> Result<(), String> {
    crate::deploy::validate_name(tenant).map_err(|e| e.replace("function name", "tenant name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_with_wildcards() {
        let p = |s: &str| Pattern::new(s).unwrap_or_else(|e| panic!("{e}"));
        assert!(p("*").matches("anything"));
        assert!(p("hello").matches("hello"));
        assert!(!p("hello").matches("hello2"));
        assert!(p("team-a-*").matches("team-a-digits"));
        assert!(p("team-a-*").matches("team-a-"));
        assert!(!p("team-a-*").matches("team-b-digits"));
        assert!(p("*-prod").matches("ocr-prod"));
        assert!(!p("*-prod").matches("ocr-prod2"));
        assert!(p("a*b*c").matches("abc"));
        assert!(p("a*b*c").matches("axxbyyc"));
        assert!(!p("a*b*c").matches("axxbyy"));
        assert!(!p("ab*ba").matches("aba"), "the ends may not overlap");
        assert!(Pattern::new("Bad").is_err());
        assert!(Pattern::new("").is_err());
    }

    #[test]
    fn scopes_parse_and_print_back() {
        for s in [
            "admin",
            "deploy:*",
            "invoke:team-*",
            "usage:read",
            "audit:read",
        ] {
            let scope: Scope = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(scope.to_string(), s);
        }
        assert_eq!(
            "deploy".parse::<Scope>(),
            Ok(Scope::Deploy(Pattern("*".into())))
        );
        for bad in ["root", "deploy:", "usage:write", "invoke:A"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_random_and_carry_their_id() {
        let (id, secret) = generate().unwrap_or_else(|e| panic!("{e}"));
        let (_, other) = generate().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(secret, other);
        assert_eq!(id_of(&secret).unwrap_or_else(|e| panic!("{e}")), id);
        assert_eq!(secret.len(), "kiln_".len() + ID_HEX + 1 + 64);
        let chosen = "some operator chosen secret";
        assert_ne!(
            id_of(chosen).ok(),
            id_of(chosen).ok(),
            "not derived from the secret"
        );
        assert_ne!(hash(&secret), hash(&other));
    }
}
