//! The ledger's writer on PostgreSQL: the writer thread keeps one connection (made again
//! after any failure) on a runtime of its own, and commits each batch as multi-row
//! `INSERT ... ON CONFLICT DO NOTHING` statements in one transaction, so a replayed record
//! (same start, same request id) counts once across every node.

use tokio_postgres::types::ToSql;

use super::Sink;
use crate::meter::usage::UsageRecord;

/// Columns of a usage row.
const COLUMNS: usize = 20;
/// Rows per INSERT (20 parameters each; PostgreSQL allows 65535).
const ROWS_PER_INSERT: usize = 256;

/// The writer's connection to the cluster's database.
pub(super) struct PgSink {
    url: String,
    rt: tokio::runtime::Runtime,
    client: Option<tokio_postgres::Client>,
}

impl PgSink {
    /// A sink for `url`; the connection is made on the first commit.
    pub(super) fn new(url: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(PgSink {
            url: url.to_string(),
            rt,
            client: None,
        })
    }
}

/// One record's columns, owned: its text columns and its integer ones.
struct Row {
    text: [String; 5],
    ints: [i64; 14],
    prediction: Option<String>,
}

fn row(r: &UsageRecord) -> Row {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    Row {
        text: [
            r.request_id.clone(),
            r.tenant.to_string(),
            r.function.to_string(),
            r.cache.to_string(),
            r.outcome.as_str().to_string(),
        ],
        ints: [
            i64::from(r.version),
            r.start_ms,
            int(r.wall_us),
            int(r.cpu_us),
            int(r.memory_peak_bytes),
            int(r.mem_mib_ms()),
            int(r.inference_cpu_us),
            int(r.inference_gpu_us),
            int(r.bytes_in),
            int(r.bytes_out),
            i64::from(r.cold),
            i64::from(r.status),
            int(r.cost),
            i64::from(r.batch_rows),
        ],
        prediction: r.prediction.clone(),
    }
}

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO usage (request_id, tenant, function, version, start_ms, wall_us, cpu_us,
            memory_peak_bytes, mem_mib_ms, inference_cpu_us, inference_gpu_us, bytes_in,
            bytes_out, cold, cache, outcome, status, cost, batch_rows, prediction) VALUES ",
    );
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        let at = r * COLUMNS;
        let cols: Vec<String> = (1..=COLUMNS).map(|i| format!("${}", at + i)).collect();
        sql.push('(');
        sql.push_str(&cols.join(","));
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (start_ms, request_id) DO NOTHING");
    sql
}

impl Sink for PgSink {
    fn commit(&mut self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        let PgSink { url, rt, client } = self;
        let result = rt.block_on(async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let (config, tls) = crate::store::pg::client_config(url)?;
                let (c, conn) = config.connect(tls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!("usage ledger connection closed: {e}");
                    }
                });
                *client = Some(c);
            }
            let Some(c) = client.as_mut() else {
                anyhow::bail!("no database connection");
            };
            let rows: Vec<Row> = batch.iter().map(row).collect();
            let tx = c.transaction().await?;
            let full = tx.prepare(&insert_sql(ROWS_PER_INSERT)).await?;
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let mut params: Vec<&(dyn ToSql + Sync)> =
                    Vec::with_capacity(chunk.len() * COLUMNS);
                for r in chunk {
                    let [request_id, tenant, function, cache, outcome] = &r.text;
                    let [
                        version,
                        start,
                        wall,
                        cpu,
                        peak,
                        mem,
                        inf_cpu,
                        inf_gpu,
                        bytes_in,
                        bytes_out,
                        cold,
                        status,
                        cost,
                        batch_rows,
                    ] = &r.ints;
                    params.extend_from_slice(&[
                        request_id,
                        tenant,
                        function,
                        version,
                        start,
                        wall,
                        cpu,
                        peak,
                        mem,
                        inf_cpu,
                        inf_gpu,
                        bytes_in,
                        bytes_out,
                        cold,
                        cache,
                        outcome,
                        status,
                        cost,
                        batch_rows,
                        &r.prediction,
                    ]);
                }
                if chunk.len() == ROWS_PER_INSERT {
                    tx.execute(&full, &params).await?;
                } else {
                    tx.execute(insert_sql(chunk.len()).as_str(), &params)
                        .await?;
                }
            }
            tx.commit().await?;
            anyhow::Ok(())
        });
        if result.is_err() {
            // Made again on the next attempt.
            *client = None;
        }
        result
    }
}
