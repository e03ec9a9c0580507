//! Variables and secrets: settings a function's guests read through `wasi:config/store`
//! and, for std programs, as environment variables.
//!
//! A version declares its variables (`[variables]` in kiln.toml: a default, or
//! `secret = true`); values are set on the function, for every request or for the requests
//! that come through one alias (staging, prod), and outlive versions. A request's value is
//! its alias's, else the function's, else the declared default; a guest sees only what its
//! version declares, never the host's environment.
//!
//! Secrets are sealed at rest (ChaCha20-Poly1305 under [`SecretsKey`], bound to function,
//! alias and key) and only ever opened into the memory of the node that serves them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::common::seal;

/// Most variables a version may declare.
pub const MAX_VARIABLES: usize = 64;
/// Longest value (or default), in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// The environment variable that holds the secrets key (64 hex digits, or 32 bytes in
/// base64); every node of a cluster needs the same one.
pub const SECRETS_KEY_ENV: &str = "KILN_SECRETS_KEY";
/// The key file a single node makes in its data dir when [`SECRETS_KEY_ENV`] is unset.
pub const SECRETS_KEY_FILE: &str = "secrets.key";

/// One variable a version declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("not" = {
    "required": ["secret", "default"],
    "properties": {"secret": {"const": true}}
}))]
pub struct VariableDecl {
    /// The value when none is set; never allowed for a secret (kiln.toml is not secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_VALUE_BYTES))]
    pub default: Option<String>,
    /// Sealed at rest and never shown once set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

/// The variables a version declares, by key.
pub type Declared = BTreeMap<String, VariableDecl>;

/// Checks a variable key: 1-64 characters of `a-z`, `0-9` and `_`, starting with a letter
/// (what `wasi:config` keys and, upper-cased, environment variable names allow).
pub fn validate_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.as_bytes()[0].is_ascii_lowercase()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid variable name {:?}: use 1-64 characters of a-z, 0-9 and '_', starting with a letter",
            key.chars().take(80).collect::<String>()
        ))
    }
}

/// Checks a value's size.
pub fn validate_value(key: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "the value of {key:?} is {} bytes; at most {MAX_VALUE_BYTES} are allowed",
            value.len()
        ));
    }
    Ok(())
}

/// Checks a version's declarations.
pub fn validate_declared(declared: &Declared) -> Result<(), String> {
    if declared.len() > MAX_VARIABLES {
        return Err(format!(
            "{} variables declared; at most {MAX_VARIABLES} are allowed",
            declared.len()
        ));
    }
    for (key, decl) in declared {
        validate_key(key)?;
        match &decl.default {
            Some(_) if decl.secret => {
                return Err(format!(
                    "variable {key:?} is secret, so it cannot have a default: set its value with `kiln vars set <function> {key}=... --secret`"
                ));
            }
            Some(d) => validate_value(key, d)?,
            None => {}
        }
    }
    Ok(())
}

/// The environment variable a key is visible as: `api_key` is `API_KEY`.
pub fn env_name(key: &str) -> String {
    key.to_ascii_uppercase()
}

/// The key secrets are sealed with.
#[derive(Clone)]
pub struct SecretsKey([u8; seal::KEY_LEN]);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

impl SecretsKey {
    /// The key from `env` (the value of [`SECRETS_KEY_ENV`]) when set, else, when
    /// `make_file` (one node on its own database), from `<data_dir>/secrets.key`, made on
    /// first start. `None`: no key, so secrets can be neither set nor read (a cluster's
    /// nodes must share one key, and a file per node would not be shared).
    pub fn load(
        env: Option<&str>,
        data_dir: &Path,
        make_file: bool,
    ) -> anyhow::Result<Option<SecretsKey>> {
        let material = match env {
            Some(text) => parse_key(text).with_context(|| {
                format!("{SECRETS_KEY_ENV} is not 64 hex digits or 32 bytes in base64")
            })?,
            None if make_file => read_or_make_key_file(&data_dir.join(SECRETS_KEY_FILE))?,
            None => return Ok(None),
        };
        Ok(Some(SecretsKey(seal::derive_key(
            "kiln variables v1",
            &[&material],
        ))))
    }

    /// Seals `value` for `key` of `function` in `scope` (an alias, or "").
    pub fn seal(
        &self,
        function: &str,
        scope: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<Vec<u8>> {
        seal::seal(&self.0, &aad(function, scope, key), value.as_bytes())
    }

    /// Opens what [`SecretsKey::seal`] made for the same place.
    pub fn open(&self, function: &str, scope: &str, key: &str, sealed: &[u8]) -> Option<String> {
        let plain = seal::open(&self.0, &aad(function, scope, key), sealed).ok()?;
        String::from_utf8(plain).ok()
    }
}

fn aad(function: &str, scope: &str, key: &str) -> Vec<u8> {
    [function, scope, key].join("\0").into_bytes()
}

fn parse_key(text: &str) -> anyhow::Result<[u8; 32]> {
    use base64::Engine as _;
    let text = text.trim();
    let bytes = match hex::decode(text) {
        Ok(b) => b,
        Err(_) => base64::engine::general_purpose::STANDARD.decode(text)?,
    };
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| anyhow::anyhow!("{} bytes, not 32", b.len()))
}

fn read_or_make_key_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            return parse_key(&text)
                .with_context(|| format!("reading the key in {}", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("drawing a secrets key: {e}"))?;
    // A half-written key would seal secrets nobody can open.
    seal::write_private(path, hex::encode(key).as_bytes())?;
    Ok(key)
}

/// One value as a node holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Value {
    /// The value in clear; `None`: a secret this node could not open (no key, or another).
    pub text: Option<Arc<str>>,
    pub secret: bool,
    /// Unix ms.
    pub updated_ms: i64,
    /// The key id that set it.
    pub updated_by: Option<String>,
}

/// Never prints the value: a secret must not reach a log through a `{:?}`.
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Value")
            .field("set", &self.text.is_some())
            .field("secret", &self.secret)
            .field("updated_ms", &self.updated_ms)
            .finish_non_exhaustive()
    }
}

/// One stored value, as the database keeps it (a secret sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    pub function: String,
    /// The alias whose requests it is for; "" for every request.
    pub scope: String,
    pub key: String,
    /// UTF-8 text, or a secret sealed by [`SecretsKey::seal`].
    pub value: Vec<u8>,
    pub secret: bool,
    pub updated_ms: i64,
    pub updated_by: Option<String>,
}

/// A request's variable that cannot be given to its guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a secret variable of this function cannot be opened on this node: its {SECRETS_KEY_ENV} is not the key the value was sealed with (or it has none); the operator sets the same key on every node, or the value is set again"
)]
pub struct Unreadable {
    /// The variable (kept out of the message: callers of a public function see it).
    pub key: String,
}

/// A function's values, by scope ("" or an alias) and key, opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionVariables {
    scopes: BTreeMap<String, BTreeMap<String, Value>>,
}

impl FunctionVariables {
    /// Opens one function's stored values with `key`.
    pub fn open(rows: &[StoredValue], key: Option<&SecretsKey>) -> Self {
        let mut scopes: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for row in rows {
            let text = match row.secret {
                true => key
                    .and_then(|k| k.open(&row.function, &row.scope, &row.key, &row.value))
                    .map(Arc::from),
                false => String::from_utf8(row.value.clone()).ok().map(Arc::from),
            };
            scopes.entry(row.scope.clone()).or_default().insert(
                row.key.clone(),
                Value {
                    text,
                    secret: row.secret,
                    updated_ms: row.updated_ms,
                    updated_by: row.updated_by.clone(),
                },
            );
        }
        FunctionVariables { scopes }
    }

    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// The keys of the secrets this node could not open, as `alias/key` (`key` for the
    /// function's own).
    pub fn unreadable(&self) -> Vec<String> {
        self.iter()
            .filter(|(_, _, v)| v.text.is_none())
            .map(|(s, k, _)| match s {
                "" => k.to_string(),
                s => format!("{s}/{k}"),
            })
            .collect()
    }

    /// These values after one change in `scope`: `set` (key, text, secret) replacing what
    /// was there, `unset` removed, stamped `at_ms` and `by`.
    pub fn changed(
        &self,
        scope: &str,
        set: &[(&str, &str, bool)],
        unset: &[&str],
        at_ms: i64,
        by: Option<&str>,
    ) -> FunctionVariables {
        let mut next = self.clone();
        let keys = next.scopes.entry(scope.to_string()).or_default();
        for (key, text, secret) in set {
            keys.insert(
                key.to_string(),
                Value {
                    text: Some(Arc::from(*text)),
                    secret: *secret,
                    updated_ms: at_ms,
                    updated_by: by.map(str::to_string),
                },
            );
        }
        for key in unset {
            keys.remove(*key);
        }
        if keys.is_empty() {
            next.scopes.remove(scope);
        }
        next
    }

    /// Every value: (scope, key, value), by scope then key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.scopes
            .iter()
            .flat_map(|(s, keys)| keys.iter().map(move |(k, v)| (s.as_str(), k.as_str(), v)))
    }

    /// What a guest of a version declaring `declared` sees on a request through `alias`
    /// (`None` or `default`: the main route, or a pinned version): (key, value) of each
    /// declared variable that has one, the alias's value first, then the function's, then
    /// the default.
    pub fn resolve(
        &self,
        declared: &Declared,
        alias: Option<&str>,
    ) -> Result<Vec<(String, String)>, Unreadable> {
        // The main policy's alias (`default`) has no scope of its own: it is every request's.
        let alias = alias.filter(|a| *a != super::DEFAULT_ALIAS).unwrap_or("");
        let mut out = Vec::with_capacity(declared.len());
        for (key, decl) in declared {
            let set = [alias, ""]
                .into_iter()
                .find_map(|scope| self.scopes.get(scope).and_then(|s| s.get(key)));
            let text = match set {
                Some(Value { text: Some(t), .. }) => t.to_string(),
                Some(Value { text: None, .. }) => return Err(Unreadable { key: key.clone() }),
                None => match &decl.default {
                    Some(d) => d.clone(),
                    None => continue,
                },
            };
            out.push((key.clone(), text));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scope: &str, key: &str, value: &str) -> StoredValue {
        StoredValue {
            function: "f".into(),
            scope: scope.into(),
            key: key.into(),
            value: value.as_bytes().to_vec(),
            secret: false,
            updated_ms: 1,
            updated_by: None,
        }
    }

    fn declared(keys: &[(&str, Option<&str>)]) -> Declared {
        keys.iter()
            .map(|(k, d)| {
                let decl = VariableDecl {
                    default: d.map(str::to_string),
                    secret: false,
                };
                (k.to_string(), decl)
            })
            .collect()
    }

    #[test]
    fn the_alias_value_wins_then_the_function_value_then_the_default() {
        let vars = FunctionVariables::open(
            &[
                row("", "a", "fn"),
                row("staging", "a", "st"),
                row("", "b", "fn-b"),
            ],
            None,
        );
        let decl = declared(&[
            ("a", Some("dflt")),
            ("b", None),
            ("c", Some("c0")),
            ("d", None),
        ]);
        let pairs = |alias| vars.resolve(&decl, alias).unwrap();
        let want = |a: &str| {
            vec![
                ("a".to_string(), a.to_string()),
                ("b".into(), "fn-b".into()),
                ("c".into(), "c0".into()),
            ]
        };
        assert_eq!(pairs(Some("staging")), want("st"));
        assert_eq!(pairs(Some("prod")), want("fn"));
        assert_eq!(pairs(None), want("fn"));
        assert_eq!(pairs(Some("default")), want("fn"));
        // Undeclared values are never given out.
        let only_c = declared(&[("c", None)]);
        assert!(vars.resolve(&only_c, None).unwrap().is_empty());
    }

    #[test]
    fn secrets_open_only_with_their_key_and_place() {
        let dir = std::env::temp_dir().join(format!("kiln-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = SecretsKey::load(None, &dir, true).unwrap().unwrap();
        // The file is kept: the same key again.
        let again = SecretsKey::load(None, &dir, true).unwrap().unwrap();
        let sealed = key.seal("f", "", "api_key", "s3cret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(
            again.open("f", "", "api_key", &sealed).as_deref(),
            Some("s3cret")
        );
        assert_eq!(key.open("g", "", "api_key", &sealed), None);
        assert_eq!(key.open("f", "prod", "api_key", &sealed), None);
        let other = SecretsKey::load(Some(&"ab".repeat(32)), &dir, true)
            .unwrap()
            .unwrap();
        assert_eq!(other.open("f", "", "api_key", &sealed), None);
        assert!(SecretsKey::load(Some("short"), &dir, true).is_err());
        assert!(SecretsKey::load(None, &dir, false).unwrap().is_none());

        let mut stored = row("", "api_key", "");
        stored.value = sealed;
        stored.secret = true;
        let decl = declared(&[("api_key", None)]);
        let opened = FunctionVariables::open(std::slice::from_ref(&stored), Some(&key));
        assert_eq!(
            opened.resolve(&decl, None).unwrap(),
            vec![("api_key".to_string(), "s3cret".to_string())]
        );
        let closed = FunctionVariables::open(&[stored], Some(&other));
        assert_eq!(
            closed.resolve(&decl, None),
            Err(Unreadable {
                key: "api_key".into()
            })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn declarations_are_checked() {
        assert!(validate_key("api_key2").is_ok());
        for bad in ["", "Api", "2x", "a-b", "a.b", &"a".repeat(65)] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
        let secret_default: Declared = [(
            "k".to_string(),
            VariableDecl {
                default: Some("x".into()),
                secret: true,
            },
        )]
        .into();
        assert!(
            validate_declared(&secret_default)
                .unwrap_err()
                .contains("secret")
        );
        assert_eq!(env_name("api_key"), "API_KEY");
    }
}
