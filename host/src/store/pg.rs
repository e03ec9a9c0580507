//! PostgreSQL access shared by the stores that live there: one connection pool
//! (`tokio-postgres` under `deadpool`, TLS as the URL's `sslmode` says: `pg_tls.rs`), and
//! versioned schema migrations run once, under an advisory lock, when a node starts.
//!
//! A node refuses a database whose schema is newer than the migrations it knows (a newer
//! Kiln migrated it), naming both versions, rather than writing rows it does not understand.

use std::time::Duration;

use anyhow::{Context, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Timeouts};

/// Connections one node keeps to the database at most.
const POOL_SIZE: usize = 16;
/// How long a call waits for a connection (the database unreachable: a clear error, soon).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a statement may run before the server cancels it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Key of the advisory lock migrations run under (any constant; "kiln" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b_69_6c_6e;

/// The schema, one migration per version: version N is the state after the first N.
/// Append only: a released migration never changes.
pub const MIGRATIONS: &[&str] = &[
    include_str!("schema/postgres_1.sql"),
    include_str!("schema/postgres_2.sql"),
    include_str!("schema/postgres_3.sql"),
    include_str!("schema/postgres_4.sql"),
    include_str!("schema/postgres_5.sql"),
    include_str!("schema/postgres_6.sql"),
    include_str!("schema/postgres_7.sql"),
    include_str!("schema/postgres_8.sql"),
    include_str!("schema/postgres_9.sql"),
];

/// Opens a pool on `url` (`postgres://user[:password]@host[:port]/dbname`) and brings the
/// schema up to date. Fails, naming both versions, on a schema newer than this Kiln's.
pub async fn connect(url: &str) -> anyhow::Result<Pool> {
    let (config, tls) = client_config(url)?;
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(CONNECT_TIMEOUT),
            create: Some(CONNECT_TIMEOUT),
            recycle: Some(CONNECT_TIMEOUT),
        })
        .build()
        .context("building the database pool")?;
    migrate(&pool).await?;
    Ok(pool)
}

/// The channel every committed change is announced on (`NOTIFY`), to wake the other nodes.
pub const CHANGES_CHANNEL: &str = "kiln_changes";

/// Counts one change for the nodes that poll the change counter (`kiln_changes`): the last
/// statement of every writing transaction (always taken last, so every transaction takes
/// its locks in the same order). Its row lock orders the bumps as the commits. It also
/// announces the change on [`CHANGES_CHANNEL`]: PostgreSQL delivers the notification when
/// (and only if) the transaction commits, so listening nodes wake at once instead of at
/// their next poll.
pub async fn bump_changes(tx: &impl deadpool_postgres::GenericClient) -> anyhow::Result<()> {
    tx.batch_execute(
        "UPDATE kiln_changes SET n = n + 1 WHERE id = 1; SELECT pg_notify('kiln_changes', '')",
    )
    .await?;
    Ok(())
}

/// Keeps a connection to `url` listening on [`CHANGES_CHANNEL`] for as long as `wake` has
/// other owners, and wakes it on every notification. Also wakes it after every (re)connect,
/// since a notification sent while the connection was down is lost: the caller then reads
/// the counter and catches up. A lost connection is retried every [`RELISTEN_AFTER`].
pub fn listen_for_changes(
    url: &str,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let (config, tls) = client_config(url)?;
    let wake = std::sync::Arc::downgrade(&wake);
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            if wake.strong_count() == 0 {
                return;
            }
            match listen_once(&config, &tls, &wake, &mut failing).await {
                Ok(()) => return,
                Err(e) => {
                    if !failing {
                        tracing::warn!("listening for changes from other nodes: {e:#}");
                    }
                    failing = true;
                }
            }
            tokio::time::sleep(RELISTEN_AFTER).await;
        }
    });
    Ok(())
}

/// How long a node waits before listening again after its listening connection failed.
pub const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// One listening connection, until it fails (an error) or nobody needs it (`Ok`).
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &super::pg_tls::PgTls,
    wake: &std::sync::Weak<tokio::sync::Notify>,
    failing: &mut bool,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let (client, mut connection) = config.connect(tls.clone()).await?;
    // The connection is driven on its own task, which hands every notification on and
    // ends when the connection does.
    let notify = wake.clone();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = message? {
                match notify.upgrade() {
                    Some(w) => w.notify_one(),
                    None => return Ok(()),
                }
            }
        }
        anyhow::bail!("the database closed the connection")
    });
    let listened = async {
        client
            .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
            .await?;
        if std::mem::take(failing) {
            tracing::info!("listening for changes from other nodes again");
        }
        // Whatever was announced while this node was not listening.
        match wake.upgrade() {
            Some(w) => w.notify_one(),
            None => return Ok(()),
        }
        // A quiet connection is probed now and then, so a dead one is noticed and replaced.
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if wake.strong_count() == 0 {
                return Ok(());
            }
            tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1"))
                .await
                .map_err(|_| anyhow::anyhow!("the listening connection stopped answering"))??;
        }
    };
    let result = tokio::select! {
        r = listened => r,
        r = &mut driver => r.map_err(anyhow::Error::from).and_then(|r| r),
    };
    driver.abort();
    result
}

/// The client settings of every Kiln connection: `url`'s, plus a connect timeout, TCP
/// keepalives and a statement timeout, so a partitioned database fails calls in bounded
/// time instead of hanging them (and the locks they hold).
pub fn client_config(url: &str) -> anyhow::Result<(tokio_postgres::Config, super::pg_tls::PgTls)> {
    let (mut config, tls) = super::pg_tls::parse(url)?;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        // A query on a connection whose packets vanish fails in bounded time too.
        .tcp_user_timeout(Duration::from_secs(20))
        // A node stopped (or frozen) inside a transaction loses it, and the row locks it
        // held, instead of blocking every other node's changes to those rows.
        .options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            STATEMENT_TIMEOUT.as_millis(),
            STATEMENT_TIMEOUT.as_millis()
        ));
    Ok((config, tls))
}

/// Applies the migrations the database lacks, each in its own transaction, while holding
/// the migration lock (so concurrent nodes starting together migrate once).
async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await.context("connecting to the database")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock")?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS kiln_schema (
                     id       INTEGER PRIMARY KEY CHECK (id = 1),
                     version  INTEGER NOT NULL
                 )",
            )
            .await?;
        let row = client
            .query_opt("SELECT version FROM kiln_schema WHERE id = 1", &[])
            .await?;
        let current = row.map_or(0, |r| r.get::<_, i32>(0)) as usize;
        if current > MIGRATIONS.len() {
            bail!(
                "the database schema is at version {current}, newer than this Kiln knows (version {}): upgrade Kiln",
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            let version = (i + 1) as i32;
            let tx = client.transaction().await?;
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("schema migration {version}"))?;
            tx.execute(
                "INSERT INTO kiln_schema (id, version) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                &[&version],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, "database schema migrated");
        }
        anyhow::Ok(())
    }
    .await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked.context("releasing the migration lock")?;
    Ok(())
}

/// A database of its own for one test, on the PostgreSQL the machine runs
/// (`KILN_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/postgres`), dropped
/// when the test ends.
#[cfg(test)]
pub(crate) mod scratch {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio_postgres::NoTls;

    /// A created database; dropped (with its connections) on drop.
    pub(crate) struct ScratchDb {
        admin: String,
        name: String,
        pub(crate) url: String,
    }

    fn admin_url() -> String {
        std::env::var("KILN_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    /// Says that `test` skipped, and why: on stderr and in scripts/test's closing line.
    pub(crate) fn skipped(test: &str, why: &str) {
        eprintln!("skipped: {test}: {why}");
        if let Some(path) = std::env::var_os("KILN_TEST_SKIPS") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{test}: {why}");
            }
        }
    }

    /// A fresh database, or `None` (the test says it skipped) when no PostgreSQL answers;
    /// under `CI=true` a missing PostgreSQL fails the test instead.
    pub(crate) async fn database(test: &str) -> Option<ScratchDb> {
        static N: AtomicU32 = AtomicU32::new(0);
        let admin = admin_url();
        let client = match tokio_postgres::connect(&admin, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                client
            }
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but no PostgreSQL at {admin}: {e}"
                );
                eprintln!("({e})");
                skipped(test, &format!("no PostgreSQL at {admin}"));
                return None;
            }
        };
        let name = format!(
            "kiln_unit_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Some(ScratchDb {
            url: format!("{base}/{name}"),
            admin,
            name,
        })
    }

    impl Drop for ScratchDb {
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            // On a thread of its own: the test's runtime may be shutting down.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok((client, conn)) = tokio_postgres::connect(&admin, NoTls).await {
                        tokio::spawn(conn);
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let Some(db) = scratch::database("pg::migrations").await else {
            return;
        };
        let pool = connect(&db.url).await.expect("first start migrates");
        // A second node starting on the same database finds it migrated.
        connect(&db.url).await.expect("second start");
        let client = pool.get().await.expect("client");
        let version: i32 = client
            .query_one("SELECT version FROM kiln_schema", &[])
            .await
            .expect("version")
            .get(0);
        assert_eq!(version as usize, MIGRATIONS.len());
        client
            .execute("UPDATE kiln_schema SET version = version + 1", &[])
            .await
            .expect("bump");
        drop(client);
        pool.close();
        let err = connect(&db.url).await.expect_err("newer schema");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("version {}", MIGRATIONS.len() + 1))
                && msg.contains(&format!("version {})", MIGRATIONS.len())),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_committed_change_wakes_a_listener_and_a_cut_listener_comes_back() {
        let Some(db) = scratch::database("pg::listen").await else {
            return;
        };
        let pool = connect(&db.url).await.expect("connect");
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        listen_for_changes(&db.url, wake.clone()).expect("listen");
        let woken = |limit: u64| {
            let wake = wake.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(limit), wake.notified())
                    .await
                    .is_ok()
            }
        };
        assert!(woken(5_000).await, "woken once listening (to catch up)");
        let mut client = pool.get().await.expect("client");
        let tx = client.transaction().await.expect("tx");
        bump_changes(&tx).await.expect("bump");
        tx.rollback().await.expect("rollback");
        assert!(!woken(500).await, "a rolled-back change wakes nobody");
        let tx = client.transaction().await.expect("tx");
        bump_changes(&tx).await.expect("bump");
        tx.commit().await.expect("commit");
        assert!(woken(5_000).await, "a committed change wakes the listener");
        // The listening connection cut (a database restart, a proxy): it listens again
        // and wakes its owner to read what it may have missed.
        let cut = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .expect("terminate");
        assert_eq!(cut, 1, "one listening connection");
        assert!(woken(10_000).await, "woken again after listening again");
        let tx = client.transaction().await.expect("tx");
        bump_changes(&tx).await.expect("bump");
        tx.commit().await.expect("commit");
        assert!(woken(5_000).await, "changes wake it after the cut");
    }
}
