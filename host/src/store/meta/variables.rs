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

#[cfg(test)]
mod tests {
    use super::super::tests::{backends, new};
    use super::VariablesChange;

    #[tokio::test]
    async fn variables_change_in_one_go_with_history_and_go_with_their_function_on_every_backend() {
        for (meta, _db, dir) in backends("variables").await {
            let b = meta.describe();
            let mut declares = new("v");
            declares.variables.insert(
                "greeting".into(),
                crate::deploy::variables::VariableDecl {
                    default: Some("hi".into()),
                    secret: false,
                },
            );
            let (rec, info) = meta.create_version(&declares).await.expect("create");
            assert_eq!(rec.variables, declares.variables, "{b}");
            let stored = meta.state().await.expect("state").versions;
            assert_eq!(stored[0].variables, declares.variables, "{b}: round trip");
            let change = |scope, set: Vec<(&'static str, &[u8], bool)>, unset| VariablesChange {
                scope,
                set: set
                    .into_iter()
                    .map(|(k, v, s)| (k, v.to_vec(), s))
                    .collect(),
                unset,
                actor: Some("key1"),
                created_at: info.created_at,
                owner: "t",
                at_ms: 1_800_000_000_000,
            };
            let made = change(
                "",
                vec![("a", b"1", false), ("s", b"\x00sealed", true)],
                vec![],
            );
            assert!(meta.change_variables("v", &made).await.expect("set"), "{b}");
            let staging = change("staging", vec![("a", b"2", false)], vec![]);
            assert!(
                meta.change_variables("v", &staging).await.expect("alias"),
                "{b}"
            );
            let rows = meta.variables(Some("v")).await.expect("read");
            let flags: Vec<_> = rows.iter().map(|r| (r.key.as_str(), r.secret)).collect();
            assert_eq!(flags, vec![("a", false), ("s", true), ("a", false)], "{b}");
            assert_eq!(rows[1].value, b"\x00sealed", "{b}: the bytes as given");
            let unset = change("", vec![("a", b"3", false)], vec!["s", "absent"]);
            assert!(
                meta.change_variables("v", &unset).await.expect("unset"),
                "{b}"
            );
            let rows = meta.variables(Some("v")).await.expect("read");
            let seen: Vec<_> = rows
                .iter()
                .map(|r| {
                    (
                        r.scope.as_str(),
                        r.key.as_str(),
                        r.value.as_slice(),
                        r.secret,
                    )
                })
                .collect();
            assert_eq!(
                seen,
                vec![
                    ("", "a", &b"3"[..], false),
                    ("staging", "a", &b"2"[..], false)
                ],
                "{b}"
            );
            assert_eq!(rows[0].updated_by.as_deref(), Some("key1"), "{b}");
            assert_eq!(rows[0].updated_ms, 1_800_000_000_000, "{b}");
            assert_eq!(meta.state().await.expect("state").variables, rows, "{b}");
            // The history names keys, never values.
            let history = meta.history("v", 10, None, None).await.expect("history");
            assert_eq!(history.len(), 3, "{b}");
            assert_eq!(history[0]["kind"], "variables", "{b}");
            assert_eq!(
                history[0]["detail"]["unset"],
                serde_json::json!(["s", "absent"]),
                "{b}"
            );
            assert_eq!(history[1]["detail"]["alias"], "staging", "{b}");
            assert!(
                !history.iter().any(|h| h.to_string().contains("sealed")),
                "{b}"
            );
            // A function made again since the caller looked is not changed; a deleted one
            // takes its values with it.
            let mut stale = change("", vec![("b", b"x", false)], vec![]);
            stale.created_at -= 1;
            assert!(
                !meta.change_variables("v", &stale).await.expect("stale"),
                "{b}"
            );
            let mut other_owner = change("", vec![("b", b"x", false)], vec![]);
            other_owner.owner = "u";
            assert!(
                !meta
                    .change_variables("v", &other_owner)
                    .await
                    .expect("owner"),
                "{b}"
            );
            assert!(
                !meta.change_variables("nope", &made).await.expect("absent"),
                "{b}"
            );
            meta.delete_function("v").await.expect("delete");
            assert!(meta.variables(None).await.expect("read").is_empty(), "{b}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
