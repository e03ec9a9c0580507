//! The suite's PostgreSQL run: with `KILN_TEST_DATABASE` set to an admin URL (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`), every server gets a database of its own
//! (named after its data dir, so a restart finds it again), made and dropped with `psql`.

use std::path::Path;
use std::process::Command;

/// A database of its own for a test that runs several nodes on one database (in both
/// runs of the suite), on `KILN_TEST_POSTGRES` (default: the machine's PostgreSQL on
/// 127.0.0.1:5432); `None`, after recording a skip, when none answers (a failure under
/// `CI=true`). Dropped with the returned guard.
pub fn shared_database(test: &str) -> Option<SharedDb> {
    let admin = std::env::var("KILN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    if let Err(e) = psql(&admin, "SELECT 1") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no PostgreSQL at {admin}: {e}"
        );
        crate::skip(test, &format!("no PostgreSQL at {admin}"));
        return None;
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "kiln_cluster_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    psql(&admin, &format!("CREATE DATABASE {name}")).expect("creating a database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(SharedDb {
        url: format!("{base}/{name}"),
        admin,
        name,
    })
}

/// A database made by [`shared_database`]; dropped with it.
pub struct SharedDb {
    pub url: String,
    admin: String,
    name: String,
}

impl Drop for SharedDb {
    fn drop(&mut self) {
        let _ = psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// The admin URL of the suite's PostgreSQL, when this run uses one.
fn admin_url() -> Option<String> {
    std::env::var("KILN_TEST_DATABASE")
        .ok()
        .filter(|u| !u.is_empty())
}

fn psql(admin: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args([admin, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .map_err(|e| format!("running psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn database_name(data_dir: &Path) -> String {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("kiln_e2e_{clean}")
}

/// The `--database` URL for the server on `data_dir` in the suite's PostgreSQL run (the
/// database made if it is not there yet); `None` in the SQLite run.
pub fn suite_database_url(data_dir: &Path) -> Option<String> {
    let admin = admin_url()?;
    let name = database_name(data_dir);
    if let Err(e) = psql(&admin, &format!("CREATE DATABASE {name}"))
        && !e.contains("already exists")
    {
        panic!("creating database {name}: {e}");
    }
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// Drops the database of the server on `data_dir`, if the run made one.
pub fn drop_suite_database(data_dir: &Path) {
    if let Some(admin) = admin_url() {
        let name = database_name(data_dir);
        let _ = psql(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
    }
}
