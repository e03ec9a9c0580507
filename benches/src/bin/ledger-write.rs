//! Usage ledger write throughput: records per second into a fresh SQLite ledger, in both
//! durability modes, through the same `Ledger` the server uses.
//!
//! `ledger-write [RECORDS] [SUBMITTERS]` writes RECORDS records (default 200,000) in
//! `batched` mode (submitted as fast as possible, then flushed by `close`) and RECORDS/10
//! in `strict` mode from SUBMITTERS concurrent tasks (default 64), each waiting for its
//! record to be durable like a strict response does. Prints one JSON line per mode.
//!
//! With `KILN_BENCH_DATABASE=postgres://...` (a database it may fill and empty), the
//! records go to PostgreSQL instead, as on a cluster node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_host::meter::{Durability, Ledger, LedgerStore, Metrics, Outcome, UsageRecord};

fn record(i: u64) -> UsageRecord {
    UsageRecord {
        request_id: format!("bench-{i:016x}"),
        tenant: "anonymous".into(),
        function: format!("fn{}", i % 8).into(),
        version: 1,
        start_ms: 1_790_000_000_000 + i as i64,
        wall_us: 180,
        cpu_us: 40,
        memory_peak_bytes: 1_179_648,
        inference_cpu_us: 0,
        inference_gpu_us: 0,
        batch_rows: 0,
        bytes_in: 0,
        bytes_out: 6,
        cold: false,
        cache: "off",
        outcome: Outcome::Ok,
        status: 200,
        cost: 2,
        prediction: None,
    }
}

fn open(dir: &std::path::Path, mode: Durability) -> anyhow::Result<Ledger> {
    let path = dir.join("usage.db");
    let store = match std::env::var("KILN_BENCH_DATABASE") {
        Ok(url) => {
            let rt = tokio::runtime::Runtime::new()?;
            let pool = rt.block_on(async {
                let pool = kiln_host::store::pg::connect(&url).await?;
                pool.get().await?.batch_execute("DELETE FROM usage").await?;
                anyhow::Ok(pool)
            })?;
            // The pool's connections live on `rt`: keep it for the process.
            std::mem::forget(rt);
            LedgerStore::Postgres {
                url: Box::leak(url.into_boxed_str()),
                pool,
                spool: Box::leak(dir.join("usage-spool").into_boxed_path()),
                spool_bytes: 1 << 30,
            }
        }
        Err(_) => LedgerStore::Sqlite(&path),
    };
    Ledger::open(
        store,
        mode,
        Duration::from_millis(100),
        Arc::new(Metrics::new()),
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let records = args.first().copied().unwrap_or(200_000);
    let submitters = args.get(1).copied().unwrap_or(64);
    let dir = std::env::temp_dir().join(format!("kiln-ledger-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    std::fs::create_dir_all(dir.join("batched"))?;
    let ledger = open(&dir.join("batched"), Durability::Batched)?;
    let started = Instant::now();
    for i in 0..records {
        ledger.submit(record(i));
    }
    ledger.close();
    let took = started.elapsed().as_secs_f64();
    println!(
        "{{\"mode\": \"batched\", \"records\": {records}, \"seconds\": {took:.3}, \"records_per_s\": {:.0}}}",
        records as f64 / took
    );

    std::fs::create_dir_all(dir.join("strict"))?;
    let ledger = Arc::new(open(&dir.join("strict"), Durability::Strict)?);
    let strict = records / 10;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for s in 0..submitters {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = s;
                while i < strict {
                    if let Some(ack) = ledger.submit(record(records + i)) {
                        let _ = ack.await;
                    }
                    i += submitters;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let took = started.elapsed().as_secs_f64();
    ledger.close();
    println!(
        "{{\"mode\": \"strict\", \"submitters\": {submitters}, \"records\": {strict}, \"seconds\": {took:.3}, \"records_per_s\": {:.0}}}",
        strict as f64 / took
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
