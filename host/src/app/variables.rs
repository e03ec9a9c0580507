//! Setting and removing a function's variable values: checked, secrets sealed with this
//! node's key, stored with a history entry, then applied to the registry at once, so the
//! next request sees them (other nodes as soon as they see the change).

use std::collections::HashMap;
use std::sync::Arc;

use super::{Actor, App};
use crate::deploy::FunctionEntry;
use crate::deploy::variables::{
    self, FunctionVariables, MAX_VARIABLES, SECRETS_KEY_ENV, StoredValue,
};
use crate::store::VariablesChange;

/// Most values one function may hold, over every alias.
pub const MAX_VALUES: usize = 1024;

/// Why a change of variables was refused.
#[derive(Debug, thiserror::Error)]
pub enum VariablesError {
    #[error("function {0:?} does not exist")]
    NoFunction(String),
    #[error("{0}")]
    Invalid(String),
    /// A secret without a key to seal it with.
    #[error(
        "this server has no secrets key, so it cannot keep secrets: start every node with {SECRETS_KEY_ENV} set to the same 32-byte key (64 hex digits)"
    )]
    NoSecretsKey,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// One value to set.
#[derive(Clone)]
pub struct SetValue {
    pub key: String,
    pub value: String,
    /// Asked to be secret; a key declared secret, or already holding a secret, is one anyway.
    pub secret: bool,
}

/// Never prints the value.
impl std::fmt::Debug for SetValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetValue")
            .field("key", &self.key)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Sets `set` and removes `unset` in one change of `name`'s values for the requests
    /// through `alias` (`None` or `default`: every request without an alias of its own).
    pub async fn change_variables(
        &self,
        name: &str,
        alias: Option<&str>,
        set: Vec<SetValue>,
        unset: Vec<String>,
        by: &Actor,
    ) -> Result<(), VariablesError> {
        let _publishing = self.publishing().await;
        let f = self
            .owned(name, by)
            .map_err(|_| VariablesError::NoFunction(name.to_string()))?;
        self.store_variables(&f, alias, set, unset, by.key_id.as_deref())
            .await
    }

    /// [`App::change_variables`] on function `f` as held now; the caller holds the
    /// publishing lock.
    async fn store_variables(
        &self,
        f: &FunctionEntry,
        alias: Option<&str>,
        set: Vec<SetValue>,
        unset: Vec<String>,
        key_id: Option<&str>,
    ) -> Result<(), VariablesError> {
        let name = f.name.as_str();
        let scope = match alias {
            None | Some(crate::deploy::DEFAULT_ALIAS) => "",
            Some(a) => {
                crate::deploy::validate_name(a)
                    .map_err(|e| VariablesError::Invalid(format!("alias: {e}")))?;
                a
            }
        };
        if set.is_empty() && unset.is_empty() {
            return Err(VariablesError::Invalid("nothing to set or unset".into()));
        }
        if set.len() + unset.len() > MAX_VARIABLES {
            return Err(VariablesError::Invalid(format!(
                "{} changes at once; at most {MAX_VARIABLES}",
                set.len() + unset.len()
            )));
        }
        let mut sealed = Vec::with_capacity(set.len());
        for v in &set {
            variables::validate_key(&v.key).map_err(VariablesError::Invalid)?;
            variables::validate_value(&v.key, &v.value).map_err(VariablesError::Invalid)?;
            if unset.contains(&v.key) || set.iter().filter(|o| o.key == v.key).count() > 1 {
                return Err(VariablesError::Invalid(format!(
                    "variable {:?} is named twice in one change",
                    v.key
                )));
            }
            let secret = v.secret || is_secret(f, &v.key);
            let bytes = match secret {
                true => self
                    .secrets_key
                    .as_ref()
                    .ok_or(VariablesError::NoSecretsKey)?
                    .seal(name, scope, &v.key, &v.value)?,
                false => v.value.clone().into_bytes(),
            };
            sealed.push((v.key.as_str(), bytes, secret));
        }
        for key in &unset {
            variables::validate_key(key).map_err(VariablesError::Invalid)?;
        }
        let held = f.variables.iter().count();
        let new = set
            .iter()
            .filter(|v| !f.variables.iter().any(|(s, k, _)| s == scope && k == v.key))
            .count();
        if held + new > MAX_VALUES {
            return Err(VariablesError::Invalid(format!(
                "function {name:?} would hold {} values; at most {MAX_VALUES}",
                held + new
            )));
        }
        let at_ms = crate::unix_ms();
        let unset: Vec<&str> = unset.iter().map(String::as_str).collect();
        // What memory holds next: the change as made, applied to the values as held (read
        // back from the store, a failed read would leave a stored change unapplied here).
        let in_clear: Vec<(&str, &str, bool)> = set
            .iter()
            .zip(&sealed)
            .map(|(v, (_, _, secret))| (v.key.as_str(), v.value.as_str(), *secret))
            .collect();
        let next = f.variables.changed(scope, &in_clear, &unset, at_ms, key_id);
        let change = VariablesChange {
            scope,
            set: sealed,
            unset,
            actor: key_id,
            created_at: f.created_at,
            owner: &f.owner,
            at_ms,
        };
        if !self.meta.change_variables(name, &change).await? {
            return Err(VariablesError::NoFunction(name.to_string()));
        }
        self.registry.set_variables(name, Arc::new(next));
        tracing::info!(
            function = name,
            alias = scope,
            set = set.len(),
            unset = change.unset.len(),
            "variables changed"
        );
        Ok(())
    }

    /// Whether deploying a version that declares `declared` onto `name` needs a secrets
    /// key this node lacks: a key it declares secret holds a value in clear, which the
    /// deploy would have to seal.
    pub(super) fn cannot_seal(&self, name: &str, declared: &variables::Declared) -> bool {
        self.secrets_key.is_none()
            && self.registry.function(name).is_some_and(|f| {
                f.variables
                    .iter()
                    .any(|(_, key, v)| !v.secret && declared.get(key).is_some_and(|d| d.secret))
            })
    }

    /// Seals the values function `name` holds in clear for the keys version `id`, just
    /// deployed by `key_id`, declares secret (set before that version existed): from now
    /// on they are kept and shown as secrets. Under the publishing lock, on the function
    /// as it is then (it is left alone if that version is no longer its own).
    pub(super) async fn seal_declared(
        &self,
        name: &str,
        id: i64,
        declared: &variables::Declared,
        key_id: Option<&str>,
    ) -> Result<(), VariablesError> {
        let _publishing = self.publishing().await;
        let Some(f) = self
            .registry
            .function(name)
            .filter(|f| f.versions.values().any(|v| v.record.id == id))
        else {
            return Ok(());
        };
        let mut by_scope: HashMap<String, Vec<SetValue>> = HashMap::new();
        for (scope, key, v) in f.variables.iter() {
            if let (Some(text), false, Some(d)) = (&v.text, v.secret, declared.get(key))
                && d.secret
            {
                by_scope
                    .entry(scope.to_string())
                    .or_default()
                    .push(SetValue {
                        key: key.to_string(),
                        value: text.to_string(),
                        secret: true,
                    });
            }
        }
        for (scope, set) in by_scope {
            let f = self.registry.function(name).unwrap_or_else(|| f.clone());
            let alias = (!scope.is_empty()).then_some(scope.as_str());
            self.store_variables(&f, alias, set, Vec::new(), key_id)
                .await?;
        }
        Ok(())
    }

    /// Applies the stored values of every function this node holds (at start, and when
    /// another node changed something); the caller holds the publishing lock.
    pub(super) fn apply_variables(&self, rows: Vec<StoredValue>) {
        let mut by_function: HashMap<String, Vec<StoredValue>> = HashMap::new();
        for row in rows {
            by_function
                .entry(row.function.clone())
                .or_default()
                .push(row);
        }
        for f in self.registry.functions() {
            let rows = by_function.remove(&f.name).unwrap_or_default();
            let opened = FunctionVariables::open(&rows, self.secrets_key.as_ref());
            if opened != *f.variables {
                let unreadable = opened.unreadable();
                if !unreadable.is_empty() {
                    tracing::warn!(
                        function = f.name,
                        ?unreadable,
                        "secret variables do not open with this node's secrets key: requests to versions that declare them fail"
                    );
                }
                self.registry.set_variables(&f.name, Arc::new(opened));
            }
        }
    }
}

/// Whether `key` must be kept secret: a version of `f` declares it so, or one of its
/// values (for any alias) is one already (a secret is never turned into plain text by a
/// careless set).
pub fn is_secret(f: &FunctionEntry, key: &str) -> bool {
    f.versions
        .values()
        .any(|v| v.record.variables.get(key).is_some_and(|d| d.secret))
        || f.variables.iter().any(|(_, k, v)| k == key && v.secret)
}
