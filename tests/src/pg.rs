//! The suite's PostgreSQL run: with `KILN_TEST_DATABASE` set to an admin URL (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`), every server gets a database of its own
//! (named after its data dir, so a restart finds it again), made and dropped with `psql`.

use std::path::Path;
use std::process::Command;

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
