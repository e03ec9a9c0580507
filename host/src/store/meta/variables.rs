//! Functions' variable values (`kiln vars`), on both backends: one row per (function,
//! scope, key), the scope an alias or "" for every request, a secret's value sealed by the
//! caller (the store never sees it in clear). A change and its history entry commit
//! together; rows go with their function.

use rusqlite::{OptionalExtension, params};

use deadpool_postgres::GenericClient;

use super::{MetaStore, PgMeta, SqliteMeta};
use crate::deploy::variables::StoredValue;

/// One change to a function's values in one scope, as [`MetaStore::change_variables`]
/// stores it.
#[derive(Debug, Clone)]
pub struct VariablesChange<'a> {
    /// The alias whose requests the values are for; "" for every request.
    pub scope: &'a str,
    /// (key, value bytes, secret): set, replacing what was there.
    pub set: Vec<(&'a str, Vec<u8>, bool)>,
    /// Keys to remove.
    pub unset: Vec<&'a str>,
    /// The key id that made the change.
    pub actor: Option<&'a str>,
    /// When the function was made (unix seconds) and by which tenant: a function deleted
    /// and made again since the caller looked is not changed.
    pub created_at: i64,
    pub owner: &'a str,
    /// When the change is made (unix ms): the values' `updated_ms`.
    pub at_ms: i64,
}

impl VariablesChange<'_> {
    /// The history entry's detail: names and flags, never values.
    fn detail(&self) -> serde_json::Value {
        let set: Vec<_> = self
            .set
            .iter()
            .map(|(k, _, secret)| serde_json::json!({"key": k, "secret": secret}))
            .collect();
        let mut detail = serde_json::json!({"set": set, "unset": self.unset});
        if !self.scope.is_empty() {
            detail["alias"] = self.scope.into();
        }
        detail
    }
}

impl MetaStore {
    /// Applies `change` to `function`'s values with its history entry, in one transaction;
    /// false (and nothing changed) when the function is not the one `change.owner` made
    /// at `change.created_at`.
    pub async fn change_variables(
        &self,
        function: &str,
        change: &VariablesChange<'_>,
    ) -> anyhow::Result<bool> {
        on_backend!(self.change_variables(function, change))
    }

    /// Every stored value of `function`, or of every function.
    pub async fn variables(&self, function: Option<&str>) -> anyhow::Result<Vec<StoredValue>> {
        on_backend!(self.variables(function))
    }
}

const SELECT: &str =
    "SELECT function, scope, key, value, secret, updated_ms, updated_by FROM variables";

impl SqliteMeta {
    pub fn change_variables(
        &self,
        function: &str,
        change: &VariablesChange<'_>,
    ) -> anyhow::Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let made: Option<(i64, String)> = tx
            .query_row(
                "SELECT created_at, tenant FROM functions WHERE name = ?1",
                [function],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if made != Some((change.created_at, change.owner.to_string())) {
            return Ok(false);
        }
        let now = change.at_ms;
        for (key, value, secret) in &change.set {
            tx.execute(
                "INSERT INTO variables (function, scope, key, value, secret, updated_ms, updated_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(function, scope, key) DO UPDATE SET value = excluded.value,
                     secret = excluded.secret, updated_ms = excluded.updated_ms,
                     updated_by = excluded.updated_by",
                params![function, change.scope, key, value, secret, now, change.actor],
            )?;
        }
        for key in &change.unset {
            tx.execute(
                "DELETE FROM variables WHERE function = ?1 AND scope = ?2 AND key = ?3",
                params![function, change.scope, key],
            )?;
        }
        super::sqlite_traffic::insert_history(
            &tx,
            function,
            now,
            change.actor,
            "variables",
            "",
            &change.detail(),
        )?;
        tx.commit()?;
        Ok(true)
    }

    pub fn variables(&self, function: Option<&str>) -> anyhow::Result<Vec<StoredValue>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SELECT} WHERE ?1 IS NULL OR function = ?1 ORDER BY function, scope, key"
        ))?;
        let rows = stmt.query_map([function], |r| {
            Ok(StoredValue {
                function: r.get(0)?,
                scope: r.get(1)?,
                key: r.get(2)?,
                value: r.get(3)?,
                secret: r.get(4)?,
                updated_ms: r.get(5)?,
                updated_by: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl PgMeta {
    pub async fn change_variables(
        &self,
        function: &str,
        change: &VariablesChange<'_>,
    ) -> anyhow::Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The function's row lock orders this change with deletes and deploys.
        let made: Option<(i64, String)> = tx
            .query_opt(
                "SELECT created_at, tenant FROM functions WHERE name = $1 FOR UPDATE",
                &[&function],
            )
            .await?
            .map(|r| (r.get(0), r.get(1)));
        if made != Some((change.created_at, change.owner.to_string())) {
            return Ok(false);
        }
        let now = change.at_ms;
        for (key, value, secret) in &change.set {
            tx.execute(
                "INSERT INTO variables (function, scope, key, value, secret, updated_ms, updated_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (function, scope, key) DO UPDATE SET value = excluded.value,
                     secret = excluded.secret, updated_ms = excluded.updated_ms,
                     updated_by = excluded.updated_by",
                &[&function, &change.scope, key, value, secret, &now, &change.actor],
            )
            .await?;
        }
        for key in &change.unset {
            tx.execute(
                "DELETE FROM variables WHERE function = $1 AND scope = $2 AND key = $3",
                &[&function, &change.scope, key],
            )
            .await?;
        }
        super::postgres::insert_history(
            &tx,
            function,
            now,
            change.actor,
            "variables",
            "",
            &change.detail(),
        )
        .await?;
        crate::store::pg::bump_changes(&tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn variables(&self, function: Option<&str>) -> anyhow::Result<Vec<StoredValue>> {
        let client = self.client().await?;
        variables_on(&client, function).await
    }
}

/// The values of `function` (or all), on a PostgreSQL connection or transaction.
pub(super) async fn variables_on(
    c: &impl GenericClient,
    function: Option<&str>,
) -> anyhow::Result<Vec<StoredValue>> {
    let rows = c
        .query(
            &format!(
                "{SELECT} WHERE $1::TEXT IS NULL OR function = $1 ORDER BY function, scope, key"
            ),
            &[&function],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StoredValue {
            function: r.get(0),
            scope: r.get(1),
            key: r.get(2),
            value: r.get(3),
            secret: r.get(4),
            updated_ms: r.get(5),
            updated_by: r.get(6),
        })
        .collect())
}
