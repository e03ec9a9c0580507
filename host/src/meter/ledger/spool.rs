//! The ledger's buffer on local disk for a database that does not answer (a cluster node's
//! PostgreSQL away): a batch that cannot be committed is written to a file of its own in
//! `<data>/usage-spool/` (one JSON record per line, fsynced, then renamed into place), and
//! counts as kept — a `strict` response is released — because it is on disk. While files
//! wait there, new batches join them, and every [`RETRY_EVERY`] the oldest are committed to
//! the database and deleted, so records arrive in the order they were made. The database
//! skips a record it already has (same start, same request id), so a file committed again
//! after a crash between the commit and the delete counts once.
//!
//! The buffer is bounded (`[metering] spool_mb`): once full, a batch is not kept and the
//! writer retries it, so requests wait (backpressure) rather than lose a record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::Sink;
use crate::meter::Outcome;
use crate::meter::usage::UsageRecord;

/// How often the buffered files are offered to the database again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A sink that keeps on disk what `inner` cannot take.
pub(super) struct Spooled {
    inner: Box<dyn Sink>,
    dir: PathBuf,
    max_bytes: u64,
    /// The files waiting, oldest first, with their sizes.
    files: std::collections::VecDeque<(PathBuf, u64)>,
    next: u64,
    last_try: Instant,
}

/// One record as a line of a spool file.
#[derive(Serialize, Deserialize)]
struct Line {
    request_id: String,
    tenant: String,
    function: String,
    version: u32,
    start_ms: i64,
    wall_us: u64,
    cpu_us: u64,
    memory_peak_bytes: u64,
    inference_cpu_us: u64,
    inference_gpu_us: u64,
    /// Absent from files spooled by an earlier Kiln.
    #[serde(default)]
    batch_rows: u32,
    /// Absent from files spooled by an earlier Kiln.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prediction: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    cold: bool,
    cache: String,
    outcome: String,
    status: u16,
    cost: u64,
}

impl Line {
    fn of(r: &UsageRecord) -> Line {
        Line {
            request_id: r.request_id.clone(),
            tenant: r.tenant.to_string(),
            function: r.function.to_string(),
            version: r.version,
            start_ms: r.start_ms,
            wall_us: r.wall_us,
            cpu_us: r.cpu_us,
            memory_peak_bytes: r.memory_peak_bytes,
            inference_cpu_us: r.inference_cpu_us,
            inference_gpu_us: r.inference_gpu_us,
            batch_rows: r.batch_rows,
            prediction: r.prediction.clone(),
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            cold: r.cold,
            cache: r.cache.to_string(),
            outcome: r.outcome.as_str().to_string(),
            status: r.status,
            cost: r.cost,
        }
    }

    fn record(self) -> anyhow::Result<UsageRecord> {
        let cache = ["hit", "miss", "bypass", "off"]
            .into_iter()
            .find(|c| *c == self.cache)
            .with_context(|| format!("unknown cache status {:?}", self.cache))?;
        let outcome = Outcome::parse(&self.outcome)
            .with_context(|| format!("unknown outcome {:?}", self.outcome))?;
        Ok(UsageRecord {
            request_id: self.request_id,
            tenant: Arc::from(self.tenant),
            function: Arc::from(self.function),
            version: self.version,
            start_ms: self.start_ms,
            wall_us: self.wall_us,
            cpu_us: self.cpu_us,
            memory_peak_bytes: self.memory_peak_bytes,
            inference_cpu_us: self.inference_cpu_us,
            inference_gpu_us: self.inference_gpu_us,
            batch_rows: self.batch_rows,
            prediction: self.prediction,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            cold: self.cold,
            cache,
            outcome,
            status: self.status,
            cost: self.cost,
        })
    }
}

impl Spooled {
    /// `inner` with a buffer in `dir` of at most `max_bytes`; files left there by an
    /// earlier run are sent first.
    pub(super) fn open(inner: Box<dyn Sink>, dir: &Path, max_bytes: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the usage spool {}", dir.display()))?;
        let mut files: Vec<(u64, PathBuf, u64)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            match name
                .strip_suffix(".jsonl")
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(seq) => files.push((seq, path, entry.metadata()?.len())),
                // A file whose write did not finish: its batch was never acknowledged.
                None if name.ends_with(".tmp") => std::fs::remove_file(&path)?,
                None => {}
            }
        }
        files.sort();
        if !files.is_empty() {
            tracing::warn!(
                files = files.len(),
                "usage records left in the spool by an earlier run; sending them to the database"
            );
        }
        let next = files.last().map_or(0, |f| f.0 + 1);
        Ok(Spooled {
            inner,
            dir: dir.to_path_buf(),
            max_bytes,
            files: files.into_iter().map(|(_, p, n)| (p, n)).collect(),
            next,
            last_try: Instant::now() - RETRY_EVERY,
        })
    }

    fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }

    /// Sends the waiting files, oldest first, until one fails.
    fn drain(&mut self) {
        self.last_try = Instant::now();
        while let Some((path, _)) = self.files.front().cloned() {
            let batch = match read(&path) {
                Ok(b) => b,
                Err(e) => {
                    // Kept for a person to look at; never deleted unread.
                    tracing::error!(file = %path.display(), "unreadable usage spool file set aside: {e:#}");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    self.files.pop_front();
                    continue;
                }
            };
            if let Err(e) = self.inner.commit(&batch) {
                tracing::debug!("the database still refuses buffered usage: {e:#}");
                return;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::error!(file = %path.display(), "removing a sent spool file: {e}");
            }
            self.files.pop_front();
            if self.files.is_empty() {
                tracing::info!("buffered usage records all written to the database");
            }
        }
    }

    /// Writes `batch` to a new spool file, durably.
    fn keep(&mut self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        use std::io::Write;
        let mut text = String::new();
        for r in batch {
            text.push_str(&serde_json::to_string(&Line::of(r))?);
            text.push('\n');
        }
        let size = text.len() as u64;
        if self.bytes() + size > self.max_bytes {
            anyhow::bail!(
                "the usage spool is full ({} MiB, [metering] spool_mb)",
                self.max_bytes >> 20
            );
        }
        let path = self.dir.join(format!("{:020}.jsonl", self.next));
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.next += 1;
        self.files.push_back((path, size));
        Ok(())
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<UsageRecord>> {
    std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str::<Line>(l)?.record())
        .collect()
}

impl Sink for Spooled {
    fn commit(&mut self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        if !self.files.is_empty() && self.last_try.elapsed() >= RETRY_EVERY {
            self.drain();
        }
        if self.files.is_empty() {
            match self.inner.commit(batch) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(
                    records = batch.len(),
                    "usage ledger commit failed; buffering on local disk until the database is back: {e:#}"
                ),
            }
        }
        self.keep(batch)
    }

    fn idle(&mut self) {
        if !self.files.is_empty() && self.last_try.elapsed() >= RETRY_EVERY {
            self.drain();
        }
    }
}
