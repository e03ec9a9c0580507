//! `kiln store copy`: a single-node installation (the data dir's SQLite files and blob
//! folder) moved into a cluster's PostgreSQL database and bucket, with nothing lost:
//! functions, versions (their ids and numbers), policies, aliases, history, rollouts, model
//! monitors' buckets, references and bins, variables (secrets still sealed: give the
//! cluster's nodes the data dir's `secrets.key` as `KILN_SECRETS_KEY`), blob owners, the sticky-hash secret, API keys, the
//! audit log and the usage ledger, row for row, and every blob. (Not the answers kept for
//! `Idempotency-Key` retries: they live a day, and a retry across the move starts afresh.)
//!
//! Running it again changes nothing: a row the target already holds exactly is skipped. A
//! row whose key the target holds with other values (the target is another installation)
//! stops the copy, naming the table: merging two installations is not a copy (the one
//! exception is a secret a cluster node made before the copy: the single node's replaces it). Each table is
//! copied in one transaction, in an order that keeps every reference valid; the sequences
//! behind ids then continue after the copied ones, and the change counter moves so that
//! running nodes apply what arrived.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rusqlite::types::Value;
use tokio_postgres::types::ToSql;

use super::{BlobStore, BlobsUrl};
use crate::common::Digest;

/// The PostgreSQL type of a copied column.
#[derive(Clone, Copy)]
enum Col {
    Text,
    Int,
    Int4,
    Bool,
    Bytes,
}

/// One table to copy: its SQLite file, name, columns and the sequence behind its id.
struct Table {
    file: &'static str,
    name: &'static str,
    columns: &'static [(&'static str, Col)],
    serial: Option<&'static str>,
    /// The key column of a table whose rows the copy replaces (the target's differ from
    /// the source's only because a cluster node made its own before the copy).
    replace_on: Option<&'static str>,
}

use Col::{Bool, Bytes, Int, Int4, Text};

/// Every table, parents before children.
const TABLES: &[Table] = &[
    Table {
        file: "kiln.db",
        name: "functions",
        columns: &[
            ("name", Text),
            ("created_at", Int),
            ("tenant", Text),
            ("public", Bool),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "version_seq",
        columns: &[("function", Text), ("last", Int), ("last_signed_at", Int)],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "versions",
        columns: &[
            ("id", Int),
            ("function", Text),
            ("version", Int),
            ("digest", Text),
            ("size", Int),
            ("timeout_ms", Int),
            ("memory_mb", Int),
            ("max_concurrency", Int),
            ("created_at", Int),
            ("nn", Text),
            ("cache", Text),
            ("rate", Text),
            ("signer", Text),
            ("outbound", Text),
            ("validation", Text),
            ("variables", Text),
        ],
        serial: Some("id"),
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "variables",
        columns: &[
            ("function", Text),
            ("scope", Text),
            ("key", Text),
            ("value", Bytes),
            ("secret", Bool),
            ("updated_ms", Int),
            ("updated_by", Text),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "traffic",
        columns: &[
            ("function", Text),
            ("policy", Text),
            ("revision", Int),
            ("updated_at", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "aliases",
        columns: &[
            ("function", Text),
            ("alias", Text),
            ("policy", Text),
            ("revision", Int),
            ("updated_at", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "history",
        columns: &[
            ("seq", Int),
            ("function", Text),
            ("at_ms", Int),
            ("actor", Text),
            ("kind", Text),
            ("reason", Text),
            ("detail", Text),
            ("tenant", Text),
        ],
        serial: Some("seq"),
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "rollouts",
        // Not the lease: the cluster's nodes take it afresh.
        columns: &[
            ("function", Text),
            ("rollout", Text),
            ("active", Bool),
            ("updated_at", Int),
            ("epoch", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "monitor_buckets",
        columns: &[
            ("function", Text),
            ("version", Int),
            ("model", Text),
            ("span_ms", Int),
            ("at", Int),
            ("process", Text),
            ("counts", Text),
            ("updated_at", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "monitor_references",
        columns: &[
            ("function", Text),
            ("version", Int),
            ("model", Text),
            ("counts", Text),
            ("window_ms", Int),
            ("set_ms", Int),
            ("set_by", Text),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "monitor_profiles",
        columns: &[
            ("function", Text),
            ("version", Int),
            ("model", Text),
            ("profile", Text),
            ("made_ms", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "kiln.db",
        name: "blob_owners",
        columns: &[("digest", Text), ("tenant", Text)],
        serial: None,
        replace_on: None,
    },
    // The single node's sticky-hash secret: its callers keep their versions in the cluster.
    Table {
        file: "kiln.db",
        name: "secrets",
        columns: &[("name", Text), ("value", Bytes)],
        serial: None,
        replace_on: Some("name"),
    },
    Table {
        file: "kiln.db",
        name: "api_keys",
        columns: &[
            ("id", Text),
            ("hash", Bytes),
            ("tenant", Text),
            ("scopes", Text),
            ("rate", Text),
            ("created_at", Int),
            ("created_by", Text),
            ("revoked_at", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "audit.db",
        name: "audit",
        columns: &[
            ("seq", Int),
            ("at_ms", Int),
            ("key_id", Text),
            ("tenant", Text),
            ("subject_tenant", Text),
            ("action", Text),
            ("target", Text),
            ("outcome", Text),
            ("status", Int4),
            ("detail", Text),
        ],
        serial: Some("seq"),
        replace_on: None,
    },
    Table {
        file: "usage.db",
        name: "usage",
        columns: &[
            ("request_id", Text),
            ("tenant", Text),
            ("function", Text),
            ("version", Int),
            ("start_ms", Int),
            ("wall_us", Int),
            ("cpu_us", Int),
            ("memory_peak_bytes", Int),
            ("mem_mib_ms", Int),
            ("inference_cpu_us", Int),
            ("inference_gpu_us", Int),
            ("bytes_in", Int),
            ("bytes_out", Int),
            ("cold", Int),
            ("cache", Text),
            ("outcome", Text),
            ("status", Int),
            ("cost", Int),
            ("batch_rows", Int),
            ("prediction", Text),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "usage.db",
        name: "feedback",
        columns: &[
            ("request_id", Text),
            ("tenant", Text),
            ("function", Text),
            ("version", Int),
            ("start_ms", Int),
            ("label", Text),
            ("value", Text),
            ("received_ms", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "usage.db",
        name: "budgets",
        columns: &[
            ("tenant", Text),
            ("monthly", Int),
            ("alert_at", Text),
            ("hard", Int),
            ("updated_ms", Int),
        ],
        serial: None,
        replace_on: None,
    },
    Table {
        file: "usage.db",
        name: "budget_alerts",
        columns: &[
            ("tenant", Text),
            ("month", Text),
            ("percent", Int),
            ("at_ms", Int),
        ],
        serial: None,
        replace_on: None,
    },
];

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub table: &'static str,
    /// Rows written now.
    pub new: u64,
    /// Rows the target held already, exactly.
    pub present: u64,
}

/// A value read from SQLite, typed for PostgreSQL.
enum Cell {
    /// NULL, typed as its column is.
    Null(Col),
    Text(String),
    Int(i64),
    Int4(i32),
    Bool(bool),
    Bytes(Vec<u8>),
}

impl Cell {
    fn of(v: Value, col: Col, table: &str, name: &str) -> anyhow::Result<Cell> {
        Ok(match (v, col) {
            (Value::Null, col) => Cell::Null(col),
            (Value::Text(t), Text) => Cell::Text(t),
            (Value::Integer(n), Int) => Cell::Int(n),
            (Value::Integer(n), Int4) => Cell::Int4(i32::try_from(n)?),
            (Value::Integer(n), Bool) => Cell::Bool(n != 0),
            (Value::Blob(b), Bytes) => Cell::Bytes(b),
            (other, _) => bail!("{table}.{name}: unexpected value {other:?}"),
        })
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        const TEXT: Option<String> = None;
        const INT: Option<i64> = None;
        const INT4: Option<i32> = None;
        const BOOL: Option<bool> = None;
        const BYTES: Option<Vec<u8>> = None;
        match self {
            Cell::Null(Text) => &TEXT,
            Cell::Null(Int) => &INT,
            Cell::Null(Int4) => &INT4,
            Cell::Null(Bool) => &BOOL,
            Cell::Null(Bytes) => &BYTES,
            Cell::Text(t) => t,
            Cell::Int(n) => n,
            Cell::Int4(n) => n,
            Cell::Bool(b) => b,
            Cell::Bytes(b) => b,
        }
    }
}

/// Copies the SQLite files of `data_dir` into the PostgreSQL database at `to` (migrating
/// it first); `on_table` hears of each table done.
pub async fn copy_database(
    data_dir: &Path,
    to: &str,
    mut on_table: impl FnMut(&Copied),
) -> anyhow::Result<Vec<Copied>> {
    let kiln_db = data_dir.join("kiln.db");
    if !kiln_db.exists() {
        bail!(
            "{} has no kiln.db: name the single node's data dir with --data-dir",
            data_dir.display()
        );
    }
    // Opened as the server opens them: a data dir of an earlier Kiln gets its newer
    // columns first, so every column read below exists.
    super::SqliteMeta::open(&kiln_db)?;
    crate::auth::KeyStore::sqlite(&kiln_db)?;
    crate::auth::AuditLog::sqlite(&data_dir.join("audit.db"))?;
    let usage_db = data_dir.join("usage.db");
    if usage_db.exists() {
        crate::meter::ledger::upgrade_sqlite(&usage_db)?;
    }
    let pool = super::pg::connect(to).await?;
    let mut client = pool
        .get()
        .await
        .context("connecting to the target database")?;
    let mut done = Vec::new();
    for table in TABLES {
        let path = data_dir.join(table.file);
        if !path.exists() {
            // No usage.db: metering was off; nothing to copy.
            continue;
        }
        let rows = read_rows(&path, table)?;
        let tx = client.transaction().await?;
        let copied = insert_rows(&tx, table, &rows).await?;
        if let Some(id) = table.serial {
            // Ids made in the cluster go on after the copied ones.
            tx.execute(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{id}'),
                         GREATEST((SELECT max({id}) FROM {0}), 1))",
                    table.name
                ),
                &[],
            )
            .await?;
        }
        tx.commit().await?;
        on_table(&copied);
        done.push(copied);
    }
    super::pg::bump_changes(&client).await?;
    Ok(done)
}

fn read_rows(path: &Path, table: &Table) -> anyhow::Result<Vec<Vec<Cell>>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
    let names: Vec<&str> = table.columns.iter().map(|c| c.0).collect();
    let mut stmt = conn.prepare(&format!("SELECT {} FROM {}", names.join(", "), table.name))?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let cells = table
            .columns
            .iter()
            .enumerate()
            .map(|(i, (name, col))| Cell::of(row.get::<_, Value>(i)?, *col, table.name, name))
            .collect::<anyhow::Result<Vec<Cell>>>()?;
        out.push(cells);
    }
    Ok(out)
}

async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &Table,
    rows: &[Vec<Cell>],
) -> anyhow::Result<Copied> {
    let names: Vec<&str> = table.columns.iter().map(|c| c.0).collect();
    let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
    let on_conflict = match table.replace_on {
        // Updated only when different: an unchanged row counts as present.
        Some(key) => {
            let rest: Vec<&str> = names.iter().copied().filter(|n| *n != key).collect();
            format!(
                "ON CONFLICT ({key}) DO UPDATE SET ({}) = ROW({}) WHERE ({}) IS DISTINCT FROM ({})",
                rest.join(", "),
                rest.iter()
                    .map(|n| format!("EXCLUDED.{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                rest.iter()
                    .map(|n| format!("{}.{n}", table.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                rest.iter()
                    .map(|n| format!("EXCLUDED.{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        }
        None => "ON CONFLICT DO NOTHING".to_string(),
    };
    let insert = tx
        .prepare(&format!(
            "INSERT INTO {} ({}) VALUES ({}) {on_conflict}",
            table.name,
            names.join(", "),
            marks.join(", ")
        ))
        .await?;
    // A row skipped must be there exactly (IS NOT DISTINCT FROM: NULLs equal).
    let same: Vec<String> = names
        .iter()
        .zip(&marks)
        .map(|(n, m)| format!("{n} IS NOT DISTINCT FROM {m}"))
        .collect();
    let exact = tx
        .prepare(&format!(
            "SELECT 1 FROM {} WHERE {}",
            table.name,
            same.join(" AND ")
        ))
        .await?;
    let mut copied = Copied {
        table: table.name,
        new: 0,
        present: 0,
    };
    for row in rows {
        let params: Vec<&(dyn ToSql + Sync)> = row.iter().map(Cell::param).collect();
        if tx.execute(&insert, &params).await? == 1 {
            copied.new += 1;
        } else if tx.query_opt(&exact, &params).await?.is_some() {
            copied.present += 1;
        } else {
            bail!(
                "the target's {} table already holds a different row with the same key as one being copied: it belongs to another installation (copy into an empty database)",
                table.name
            );
        }
    }
    Ok(copied)
}

/// What the blob copy did: blobs uploaded, and those the target had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlobsCopied {
    pub new: u64,
    pub present: u64,
}

/// Copies every blob of the folder `from` (a data dir's `blobs/sha256`) into the bucket
/// `to`, each streamed and verified against its digest.
pub async fn copy_blobs(from: &Path, to: &BlobsUrl) -> anyhow::Result<BlobsCopied> {
    if matches!(to, BlobsUrl::Folder) {
        bail!(
            "--blobs-to names the bucket the cluster's nodes share: s3://bucket[/prefix]?endpoint=...&region=..."
        );
    }
    let scratch: PathBuf =
        std::env::temp_dir().join(format!("kiln-store-copy-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let target = BlobStore::open(&scratch, to, 64).context("opening the target bucket")?;
    let mut out = BlobsCopied::default();
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
            continue; // temp files of uploads that never finished
        };
        if target.size(&digest).await?.is_some() {
            out.present += 1;
            continue;
        }
        let mut w = target.writer(Some(digest), u64::MAX)?;
        let mut file = std::fs::File::open(entry.path())?;
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf)?;
            if n == 0 {
                break;
            }
            w.write_chunk(&buf[..n])?;
        }
        target
            .finish(w)
            .await
            .with_context(|| format!("copying blob {digest}"))?;
        out.new += 1;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(out)
}
