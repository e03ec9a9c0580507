//! The usage ledger: every [`UsageRecord`] in SQLite (`<data>/usage.db`, WAL,
//! `synchronous = FULL`) or in the cluster's PostgreSQL database (every node's records in
//! one table), written by one thread with group commit, off the response path.
//!
//! Durability modes:
//! - `batched` (default): a record is queued and committed with the others of its commit
//!   window (`commit_interval_ms`). A crash (even `kill -9`) loses at most the records of
//!   the last window plus the commit in progress; a graceful shutdown loses nothing.
//! - `strict`: the end of a response is released only after its record is committed, so
//!   every answered request is in the ledger.
//!
//! The primary key is (start, request id), so the table is clustered by time (usage queries
//! are time windows) and a replayed record is ignored: it counts once.

mod postgres;
mod spool;

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rusqlite::Connection;
use serde::Deserialize;

use super::metrics::Metrics;
use super::usage::UsageRecord;

/// How long a response waits for its record to be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Records are committed in the background, a window at a time.
    #[default]
    Batched,
    /// A response finishes only once its record is committed.
    Strict,
}

/// Records queued at most before submitters wait (about 10 MB).
const QUEUE: usize = 32_768;
/// Records in one commit at most.
const MAX_BATCH: usize = 8_192;

enum Msg {
    Record(UsageRecord, Option<tokio::sync::oneshot::Sender<()>>),
    /// Commit what is queued now, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    Close,
}

/// The ledger: a writer thread and a reader for queries.
pub struct Ledger {
    tx: SyncSender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Reader,
    durability: Durability,
}

/// Where the ledger lives.
pub enum LedgerStore<'a> {
    /// `<data>/usage.db`.
    Sqlite(&'a std::path::Path),
    /// The cluster's database: the writer connects to `url`, queries use `pool`; what
    /// cannot be committed while the database is away waits in `spool` (at most
    /// `spool_bytes`).
    Postgres {
        url: &'a str,
        pool: Pool,
        spool: &'a std::path::Path,
        spool_bytes: u64,
    },
}

/// How usage queries reach the ledger.
enum Reader {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(Pool),
}

/// A query parameter.
#[derive(Debug, Clone)]
pub enum Arg {
    Int(i64),
    Text(String),
    /// A NULL (of a text column).
    Null,
}

/// A value of a query's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Int(i64),
    Text(String),
    Null,
}

impl Cell {
    /// The value as an integer (0 for text and NULL).
    pub fn int(&self) -> i64 {
        match self {
            Cell::Int(n) => *n,
            _ => 0,
        }
    }

    /// The value as text ("" for integers and NULL).
    pub fn text(&self) -> &str {
        match self {
            Cell::Text(t) => t,
            _ => "",
        }
    }
}

/// Where the writer thread commits batches.
trait Sink: Send {
    /// Commits `batch` in one transaction (records already stored are skipped).
    fn commit(&mut self, batch: &[UsageRecord]) -> anyhow::Result<()>;

    /// Called when no record came for a while (a buffer may be sent then).
    fn idle(&mut self) {}
}

struct SqliteSink(Connection);

impl Sink for SqliteSink {
    fn commit(&mut self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        Ok(commit(&mut self.0, batch)?)
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    request_id        TEXT NOT NULL,
    tenant            TEXT NOT NULL,
    function          TEXT NOT NULL,
    version           INTEGER NOT NULL,
    start_ms          INTEGER NOT NULL,
    wall_us           INTEGER NOT NULL,
    cpu_us            INTEGER NOT NULL,
    memory_peak_bytes INTEGER NOT NULL,
    mem_mib_ms        INTEGER NOT NULL,
    inference_cpu_us  INTEGER NOT NULL,
    inference_gpu_us  INTEGER NOT NULL,
    bytes_in          INTEGER NOT NULL,
    bytes_out         INTEGER NOT NULL,
    cold              INTEGER NOT NULL,
    cache             TEXT NOT NULL,
    outcome           TEXT NOT NULL,
    status            INTEGER NOT NULL,
    cost              INTEGER NOT NULL,
    batch_rows        INTEGER NOT NULL DEFAULT 0,
    prediction        TEXT,
    -- Clustered by time (usage queries are time windows); a replayed record (same request,
    -- same start) is ignored.
    PRIMARY KEY (start_ms, request_id)
) WITHOUT ROWID;
";

/// What [`SCHEMA`] adds once the usage table has its newest columns: the request-id index
/// (feedback finds its request by it), the ground truth posted for requests, and the
/// tenants' budgets with the thresholds each crossed per month.
const FEEDBACK_SCHEMA: &str = "
CREATE INDEX IF NOT EXISTS usage_request_id ON usage (request_id);
CREATE TABLE IF NOT EXISTS feedback (
    request_id  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    function    TEXT NOT NULL,
    version     INTEGER NOT NULL,
    -- The request's start: with request_id, its usage row's primary key.
    start_ms    INTEGER NOT NULL,
    label       TEXT,
    value       TEXT,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_version ON feedback (function, version, start_ms);
CREATE TABLE IF NOT EXISTS budgets (
    tenant      TEXT PRIMARY KEY,
    monthly     INTEGER NOT NULL,
    alert_at    TEXT NOT NULL,
    hard        INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS budget_alerts (
    tenant      TEXT NOT NULL,
    month       TEXT NOT NULL,
    percent     INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    PRIMARY KEY (tenant, month, percent)
);
";

fn open(path: &std::path::Path) -> anyhow::Result<Connection> {
    crate::store::open_sqlite(path, crate::store::Sync::Full, "usage ledger")
}

/// Creates the usage table, or gives one made by an earlier Kiln its newer columns.
fn upgrade(conn: &Connection) -> anyhow::Result<()> {
    conn.execute_batch(SCHEMA)
        .context("creating the usage schema")?;
    let has_batch_rows = conn
        .prepare("SELECT 1 FROM pragma_table_info('usage') WHERE name = 'batch_rows'")?
        .exists([])?;
    if !has_batch_rows {
        conn.execute_batch("ALTER TABLE usage ADD COLUMN batch_rows INTEGER NOT NULL DEFAULT 0")
            .context("adding the usage.batch_rows column")?;
    }
    let has_prediction = conn
        .prepare("SELECT 1 FROM pragma_table_info('usage') WHERE name = 'prediction'")?
        .exists([])?;
    if !has_prediction {
        conn.execute_batch("ALTER TABLE usage ADD COLUMN prediction TEXT")
            .context("adding the usage.prediction column")?;
    }
    conn.execute_batch(FEEDBACK_SCHEMA)
        .context("creating the feedback schema")?;
    Ok(())
}

/// Brings the usage ledger at `path` (an earlier Kiln's, say) up to this one's schema.
pub fn upgrade_sqlite(path: &std::path::Path) -> anyhow::Result<()> {
    upgrade(&open(path)?)
}

impl Ledger {
    /// Opens (creating) the ledger in `store` and starts its writer.
    pub fn open(
        store: LedgerStore<'_>,
        durability: Durability,
        commit_interval: Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> anyhow::Result<Ledger> {
        let (sink, reader): (Box<dyn Sink>, Reader) = match store {
            LedgerStore::Sqlite(path) => {
                let conn = open(path)?;
                upgrade(&conn)?;
                (
                    Box::new(SqliteSink(conn)),
                    Reader::Sqlite(Arc::new(Mutex::new(open(path)?))),
                )
            }
            LedgerStore::Postgres {
                url,
                pool,
                spool,
                spool_bytes,
            } => (
                Box::new(spool::Spooled::open(
                    Box::new(postgres::PgSink::new(url)?),
                    spool,
                    spool_bytes,
                )?),
                Reader::Postgres(pool),
            ),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let interval = match durability {
            Durability::Batched => commit_interval,
            Durability::Strict => Duration::ZERO,
        };
        let writer = std::thread::Builder::new()
            .name("kiln-ledger".into())
            .spawn(move || write_loop(sink, rx, interval, &metrics))
            .context("starting the ledger writer")?;
        Ok(Ledger {
            tx,
            writer: Mutex::new(Some(writer)),
            reader,
            durability,
        })
    }

    /// Queues a record. In `strict` mode the receiver completes once it is committed (and
    /// fails if it could not be); in `batched` mode there is none.
    pub fn submit(&self, record: UsageRecord) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (ack, done) = match self.durability {
            Durability::Strict => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            }
            Durability::Batched => (None, None),
        };
        match self.tx.try_send(Msg::Record(record, ack)) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                // The writer is behind: wait for room (backpressure on this request) rather
                // than drop a billing record or queue without bound.
                tracing::warn!("usage ledger queue full; a request waits for the writer");
                let send = || {
                    if self.tx.send(msg).is_err() {
                        tracing::error!("usage ledger closed; a record was not written");
                    }
                };
                match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                    Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                        tokio::task::block_in_place(send)
                    }
                    _ => send(),
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("usage ledger closed; a record was not written");
            }
        }
        done
    }

    /// Waits until every record queued before this call is committed (what feedback needs
    /// before it can find a request answered a moment ago). Returns at once if the writer
    /// is gone.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = match self.tx.try_send(Msg::Flush(tx)) {
            Ok(()) => true,
            Err(TrySendError::Full(msg)) => {
                let queue = self.tx.clone();
                tokio::task::spawn_blocking(move || queue.send(msg).is_ok())
                    .await
                    .unwrap_or(false)
            }
            Err(TrySendError::Disconnected(_)) => false,
        };
        if sent {
            let _ = rx.await;
        }
    }

    /// Commits everything queued and stops the writer (graceful shutdown).
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Close);
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer
            && w.join().is_err()
        {
            tracing::error!("the usage ledger writer panicked");
        }
    }

    /// How this backend writes the `n`th parameter of a query (`?`, `$n`).
    pub fn marker(&self) -> fn(usize) -> String {
        match self.reader {
            Reader::Sqlite(_) => |_| "?".to_string(),
            Reader::Postgres(_) => |n| format!("${n}"),
        }
    }

    /// `column` ordered byte by byte (PostgreSQL would use the database's collation).
    pub fn binary_order(&self, column: &str) -> String {
        match self.reader {
            Reader::Sqlite(_) => column.to_string(),
            Reader::Postgres(_) => format!("{column} COLLATE \"C\""),
        }
    }

    /// Runs a statement that writes (feedback) and returns the rows it changed; SQLite's
    /// off the async workers, on the query connection (the writer thread keeps its own).
    pub async fn execute(&self, sql: String, args: Vec<Arg>) -> anyhow::Result<u64> {
        match &self.reader {
            Reader::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                    let values: Vec<rusqlite::types::Value> =
                        args.iter().map(sqlite_value).collect();
                    Ok(conn.execute(&sql, rusqlite::params_from_iter(values.iter()))? as u64)
                })
                .await
                .context("ledger write task")?
            }
            Reader::Postgres(pool) => {
                use tokio_postgres::types::ToSql;
                let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(pg_param).collect();
                Ok(pool.get().await?.execute(&sql, &params).await?)
            }
        }
    }

    /// Runs a read query (it sees every committed record); SQLite's off the async workers.
    pub async fn rows(&self, sql: String, args: Vec<Arg>) -> anyhow::Result<Vec<Vec<Cell>>> {
        match &self.reader {
            Reader::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || sqlite_rows(&conn, &sql, &args))
                    .await
                    .context("usage query task")?
            }
            Reader::Postgres(pool) => {
                use tokio_postgres::types::{ToSql, Type};
                let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(pg_param).collect();
                let rows = pool.get().await?.query(&sql, &params).await?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| {
                                let t = r.columns()[i].type_();
                                Ok(if *t == Type::INT8 {
                                    r.try_get::<_, Option<i64>>(i)?
                                        .map_or(Cell::Null, Cell::Int)
                                } else if *t == Type::INT4 {
                                    r.try_get::<_, Option<i32>>(i)?
                                        .map_or(Cell::Null, |n| Cell::Int(n.into()))
                                } else {
                                    r.try_get::<_, Option<String>>(i)?
                                        .map_or(Cell::Null, Cell::Text)
                                })
                            })
                            .collect::<anyhow::Result<Vec<Cell>>>()
                    })
                    .collect()
            }
        }
    }
}

fn pg_param(a: &Arg) -> &(dyn tokio_postgres::types::ToSql + Sync) {
    const NULL: Option<String> = None;
    match a {
        Arg::Int(n) => n,
        Arg::Text(t) => t,
        Arg::Null => &NULL,
    }
}

fn sqlite_value(a: &Arg) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match a {
        Arg::Int(n) => Value::Integer(*n),
        Arg::Text(t) => Value::Text(t.clone()),
        Arg::Null => Value::Null,
    }
}

fn sqlite_rows(
    conn: &Mutex<Connection>,
    sql: &str,
    args: &[Arg],
) -> anyhow::Result<Vec<Vec<Cell>>> {
    use rusqlite::types::Value;
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    let mut stmt = conn.prepare(sql)?;
    let values: Vec<Value> = args.iter().map(sqlite_value).collect();
    let n = stmt.column_count();
    let rows = stmt.query_map(rusqlite::params_from_iter(values.iter()), |r| {
        (0..n)
            .map(|i| {
                Ok(match r.get::<_, Value>(i)? {
                    Value::Integer(v) => Cell::Int(v),
                    Value::Text(t) => Cell::Text(t),
                    _ => Cell::Null,
                })
            })
            .collect::<rusqlite::Result<Vec<Cell>>>()
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn write_loop(mut sink: Box<dyn Sink>, rx: Receiver<Msg>, interval: Duration, metrics: &Metrics) {
    let mut last = Instant::now();
    let mut closing = false;
    let mut backlog = false;
    while !closing {
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        let take = |msg: Msg, batch: &mut Vec<_>, acks: &mut Vec<_>, closing: &mut bool| match msg {
            Msg::Record(r, ack) => {
                batch.push(r);
                acks.extend(ack);
            }
            // Answered with the records taken before it (the queue keeps their order).
            Msg::Flush(ack) => acks.push(ack),
            Msg::Close => *closing = true,
        };
        match rx.recv_timeout(spool::RETRY_EVERY) {
            Ok(m) => take(m, &mut batch, &mut acks, &mut closing),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                sink.idle();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // Batched: let the rest of this commit window queue up (unless the last commit
        // left a backlog). Sleeping rather than waiting on the channel means senders never
        // wake this thread one record at a time.
        // A flush waits for the window like any record (at most one window): posting
        // flushes cannot defeat group commit.
        if !closing
            && !backlog
            && let Some(left) = (last + interval).checked_duration_since(Instant::now())
        {
            std::thread::sleep(left);
        }
        // Everything already queued joins this commit (group commit); on close, everything
        // that is still queued at all.
        while batch.len() < MAX_BATCH || closing {
            match rx.try_recv() {
                Ok(m) => take(m, &mut batch, &mut acks, &mut closing),
                Err(_) => break,
            }
        }
        backlog = batch.len() >= MAX_BATCH;
        if batch.is_empty() {
            for ack in acks {
                let _ = ack.send(());
            }
            continue;
        }
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            match sink.commit(&batch) {
                Ok(()) => break,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    tracing::error!(
                        records = batch.len(),
                        "usage ledger commit failed (retrying): {e:#}"
                    );
                    std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(10))));
                }
                Err(e) => {
                    tracing::error!(
                        records = batch.len(),
                        "usage ledger commit failed; records lost: {e:#}"
                    );
                    acks.clear();
                    break;
                }
            }
        }
        metrics
            .ledger_commit
            .observe(started.elapsed().as_secs_f64());
        metrics.ledger_records.inc_by(batch.len() as u64);
        for ack in acks {
            let _ = ack.send(());
        }
        last = Instant::now();
    }
}

/// Columns of a usage row.
const COLUMNS: usize = 20;
/// Rows per multi-row INSERT (20 parameters each; SQLite allows 32766).
const ROWS_PER_INSERT: usize = 32;

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR IGNORE INTO usage (request_id, tenant, function, version, start_ms,
            wall_us, cpu_us, memory_peak_bytes, mem_mib_ms, inference_cpu_us,
            inference_gpu_us, bytes_in, bytes_out, cold, cache, outcome, status, cost,
            batch_rows, prediction) VALUES ",
    );
    let row = format!("({})", vec!["?"; COLUMNS].join(","));
    sql.push_str(&vec![row; rows].join(","));
    sql
}

fn bind(stmt: &mut rusqlite::Statement<'_>, rows: &[UsageRecord]) -> rusqlite::Result<()> {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for (n, r) in rows.iter().enumerate() {
        let at = n * COLUMNS;
        let (tenant, function): (&str, &str) = (&r.tenant, &r.function);
        let values: [&dyn rusqlite::ToSql; COLUMNS] = [
            &r.request_id,
            &tenant,
            &function,
            &r.version,
            &r.start_ms,
            &int(r.wall_us),
            &int(r.cpu_us),
            &int(r.memory_peak_bytes),
            &int(r.mem_mib_ms()),
            &int(r.inference_cpu_us),
            &int(r.inference_gpu_us),
            &int(r.bytes_in),
            &int(r.bytes_out),
            &r.cold,
            &r.cache,
            &r.outcome.as_str(),
            &r.status,
            &int(r.cost),
            &r.batch_rows,
            &r.prediction,
        ];
        for (i, v) in values.iter().enumerate() {
            stmt.raw_bind_parameter(at + i + 1, v)?;
        }
    }
    stmt.raw_execute()?;
    Ok(())
}

fn commit(conn: &mut Connection, batch: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut chunks = batch.chunks_exact(ROWS_PER_INSERT);
        let mut many = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
        for chunk in chunks.by_ref() {
            bind(&mut many, chunk)?;
        }
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        for r in chunks.remainder() {
            bind(&mut one, std::slice::from_ref(r))?;
        }
    }
    tx.commit()
}
