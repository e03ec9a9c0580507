//! Dynamic batching: concurrent `compute` calls on one loaded graph, from many isolated
//! instances (and versions sharing the graph), merged into one backend run whose outputs
//! are split back by rows, each request billed its share of the run's time.
//!
//! Only what is safe merges: computes of the same graph whose inputs, already checked
//! against the model, have equal shapes but for the leading (batch) dimension, which the
//! model declares free. A compute that carries more rows than a run may hold runs alone.
//!
//! Scheduling is work-conserving. At most [`BackendGraph::concurrency`] runs are in flight
//! on a graph; a compute that finds nothing running and nothing queued runs at once (no
//! cost at concurrency 1); the others queue, and whenever a run ends, what is queued runs
//! next as one batch of up to `max_rows` rows. A batch may wait up to `max_wait_us` to fill,
//! but only while other runs of the graph are in flight, and never past the earliest
//! deadline in it; a compute whose deadline passes while queued leaves with its timeout.
//! If a merged run fails, its computes run one by one, so only the culprit gets the error.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::backend::Cancel;
use super::graph::LoadedGraph;
use super::{ErrorCode, NnError, Tensor};

/// Most rows `max_rows` may name.
pub const MAX_ROWS: u32 = 1024;
/// Longest `max_wait_us` may name (one second).
pub const MAX_WAIT_US: u64 = 1_000_000;

/// How a model's computes may merge (`[models.<name>] batch`): `"off"` (the default),
/// `"auto"` (measured per model), or explicit limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchSpec {
    #[default]
    Off,
    Auto,
    Fixed(Limits),
}

/// How far one run may grow: rows at most, and the longest a batch waits to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[schemars(range(min = 1, max = MAX_ROWS))]
    pub max_rows: u32,
    #[serde(default)]
    #[schemars(range(max = MAX_WAIT_US))]
    pub max_wait_us: u64,
}

impl BatchSpec {
    /// Whether this is `"off"`.
    pub fn is_off(&self) -> bool {
        *self == BatchSpec::Off
    }

    /// The mode's name in the version info.
    pub fn mode(&self) -> &'static str {
        match self {
            BatchSpec::Off => "off",
            BatchSpec::Auto => "auto",
            BatchSpec::Fixed(_) => "fixed",
        }
    }

    fn check(limits: Limits) -> Result<Limits, String> {
        if !(1..=MAX_ROWS).contains(&limits.max_rows) {
            return Err(format!(
                "batch.max_rows must be between 1 and {MAX_ROWS}, got {}",
                limits.max_rows
            ));
        }
        if limits.max_wait_us > MAX_WAIT_US {
            return Err(format!(
                "batch.max_wait_us must be at most {MAX_WAIT_US}, got {}",
                limits.max_wait_us
            ));
        }
        Ok(limits)
    }
}

impl Serialize for BatchSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSpec::Off => s.serialize_str("off"),
            BatchSpec::Auto => s.serialize_str("auto"),
            BatchSpec::Fixed(l) => l.serialize(s),
        }
    }
}

impl schemars::JsonSchema for BatchSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "BatchSpec".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let limits = generator.subschema_for::<Limits>();
        schemars::json_schema!({
            "description": "How the model's computes merge: \"off\" (default), \"auto\" (measured at load), or { max_rows, max_wait_us }.",
            "oneOf": [{"enum": ["off", "auto"]}, limits]
        })
    }
}

impl<'de> Deserialize<'de> for BatchSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Spec;
        impl<'de> Visitor<'de> for Spec {
            type Value = BatchSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""off", "auto" or { max_rows = N, max_wait_us = N }"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<BatchSpec, E> {
                match v {
                    "off" => Ok(BatchSpec::Off),
                    "auto" => Ok(BatchSpec::Auto),
                    other => Err(E::custom(format!(
                        r#"batch = {other:?}: use "off", "auto" or {{ max_rows = 32, max_wait_us = 2000 }}"#
                    ))),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BatchSpec, A::Error> {
                let limits = Limits::deserialize(de::value::MapAccessDeserializer::new(map))?;
                BatchSpec::check(limits)
                    .map(BatchSpec::Fixed)
                    .map_err(de::Error::custom)
            }
        }
        d.deserialize_any(Spec)
    }
}

/// What one compute got from the batcher.
#[derive(Debug)]
pub struct Served {
    pub outputs: Result<Vec<Tensor>, NnError>,
    /// Its share of the run's time, in nanoseconds (the shares of a run sum to its time).
    pub share_ns: u64,
    /// Rows in the run it shared.
    pub batch_rows: u32,
    /// Time it waited in the queue.
    pub waited: Duration,
    /// The run happened on this compute's own thread (inside its guest's time).
    pub inline: bool,
}

struct Entry {
    id: u64,
    inputs: Vec<Tensor>,
    rows: u32,
    deadline: Instant,
    queued: Instant,
    limits: Limits,
    reply: tokio::sync::oneshot::Sender<Served>,
}

impl Entry {
    /// Whether `other` may share a run with this entry: equal shapes but for the rows.
    fn fits(&self, other: &Entry) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.ty == b.ty && a.dims.get(1..) == b.dims.get(1..))
    }
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Entry>,
    /// Runs in flight, and drivers between runs (each holds one of the graph's sessions).
    running: usize,
    /// Drivers choosing or waiting to fill their next batch.
    looking: usize,
    next_id: u64,
}

/// The batching queue of one loaded graph.
#[derive(Default)]
pub struct Batcher {
    queue: Mutex<Queue>,
    arrived: tokio::sync::Notify,
}

/// The rows a compute carries: the leading dimension of its first input.
pub fn rows_of(inputs: &[Tensor]) -> u32 {
    inputs
        .first()
        .and_then(|t| t.dims.first().copied())
        .unwrap_or(1)
}

/// Whether a compute's inputs can be merged with others' row by row: every input has a
/// leading axis of `rows`, at least one. One whose inputs disagree (a first input of 1
/// row and a second of 8, say) would hand rows of one request to another if merged; empty
/// ones would make runs whose outputs cannot be split (and so turn batching off).
pub fn mergeable(inputs: &[Tensor]) -> bool {
    let rows = rows_of(inputs);
    rows > 0 && inputs.iter().all(|t| t.dims.first() == Some(&rows))
}

impl Batcher {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every update is a few field writes and a queue operation: safe to reuse.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `inputs` (checked against the graph) through `graph`'s batcher under `limits`,
/// answering by `deadline`.
pub async fn submit(
    graph: &Arc<LoadedGraph>,
    inputs: Vec<Tensor>,
    limits: Limits,
    deadline: Instant,
) -> Served {
    let rows = rows_of(&inputs);
    let batcher = &graph.batcher;
    let entered = enter(graph, inputs, rows, limits, deadline);
    let (id, mut receiver) = match entered {
        // Nothing else in flight or queued (or too many rows to share a run): now.
        Enter::Now(inputs) => {
            // The session is given back however this ends (the request may give up).
            let _session = Session(graph);
            return run_alone(graph, inputs, rows, Duration::ZERO, true).await;
        }
        Enter::Queued(id, receiver) => (id, receiver),
    };
    batcher.arrived.notify_waiters();
    match tokio::time::timeout_at(deadline.into(), &mut receiver).await {
        Ok(Ok(served)) => served,
        Ok(Err(_)) => gone(),
        Err(_) => {
            // Its deadline passed: out of the queue, unless a run took it already.
            let left = {
                let mut q = batcher.queue();
                let at = q.waiting.iter().position(|e| e.id == id);
                at.and_then(|at| q.waiting.remove(at)).is_some()
            };
            match left {
                true => timeout_served(),
                false => receiver.await.unwrap_or_else(|_| gone()),
            }
        }
    }
}

/// How a compute entered the batcher.
enum Enter {
    /// It runs now, by itself, holding one of the graph's sessions.
    Now(Vec<Tensor>),
    /// It waits in the queue for its answer.
    Queued(u64, tokio::sync::oneshot::Receiver<Served>),
}

fn enter(
    graph: &Arc<LoadedGraph>,
    inputs: Vec<Tensor>,
    rows: u32,
    limits: Limits,
    deadline: Instant,
) -> Enter {
    let sessions = graph.graph.concurrency().max(1);
    let mut q = graph.batcher.queue();
    if rows >= limits.max_rows || !mergeable(&inputs) || (q.running == 0 && q.waiting.is_empty()) {
        q.running += 1;
        return Enter::Now(inputs);
    }
    let (reply, receiver) = tokio::sync::oneshot::channel();
    let id = q.next_id;
    q.next_id += 1;
    q.waiting.push_back(Entry {
        id,
        inputs,
        rows,
        deadline,
        queued: Instant::now(),
        limits,
        reply,
    });
    if q.running < sessions && q.looking == 0 {
        q.running += 1;
        q.looking += 1;
        tokio::spawn(drive(graph.clone()));
    }
    Enter::Queued(id, receiver)
}

fn gone() -> Served {
    Served {
        outputs: Err(NnError::runtime(
            "batched inference",
            "the run was abandoned",
        )),
        share_ns: 0,
        batch_rows: 0,
        waited: Duration::ZERO,
        inline: false,
    }
}

fn timeout_served() -> Served {
    Served {
        outputs: Err(NnError::new(
            ErrorCode::Timeout,
            "the request's time ran out while its inference waited for a batch",
        )),
        share_ns: 0,
        batch_rows: 0,
        waited: Duration::ZERO,
        inline: false,
    }
}

/// A session of the graph held by a compute running by itself; when it ends, what is
/// queued goes next, on a driver that takes the session over.
struct Session<'a>(&'a Arc<LoadedGraph>);

impl Drop for Session<'_> {
    fn drop(&mut self) {
        finish_run(self.0);
    }
}

fn finish_run(graph: &Arc<LoadedGraph>) {
    let mut q = graph.batcher.queue();
    if q.waiting.is_empty() || q.looking > 0 {
        q.running -= 1;
    } else {
        q.looking += 1;
        tokio::spawn(drive(graph.clone()));
    }
    drop(q);
    // A driver waiting for its batch to fill waits only while other runs are in flight:
    // this one just ended.
    graph.batcher.arrived.notify_waiters();
}

/// Runs batches from the queue until it is empty, on one session of the graph. It starts
/// counted as running and looking (choosing its next batch).
async fn drive(graph: Arc<LoadedGraph>) {
    let batcher = &graph.batcher;
    loop {
        // Armed before the queue is looked at, so no arrival after the look is missed.
        let arrived = batcher.arrived.notified();
        let step = next(
            &mut batcher.queue(),
            graph.unbatchable().is_some(),
            |rows| graph.cost.estimate(rows).unwrap_or_default(),
        );
        match step {
            Next::Done => return,
            Next::Fill(until) => {
                tokio::select! {
                    _ = arrived => {}
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
            Next::Run(batch) => {
                run_batch(&graph, batch).await;
                batcher.queue().looking += 1;
                batcher.arrived.notify_waiters();
            }
        }
    }
}

/// What a driver does next.
enum Next {
    /// The queue is empty: the driver has given its session back.
    Done,
    /// Wait for more rows until then (or an arrival).
    Fill(Instant),
    /// Run this batch.
    Run(Vec<Entry>),
}

/// Chooses a driver's next step, with the queue locked; `estimate` is how long a run of
/// so many rows is expected to take. Once the graph turned out `unbatchable`, what is
/// still queued runs one compute at a time.
fn next(q: &mut Queue, unbatchable: bool, estimate: impl Fn(u32) -> Duration) -> Next {
    let now = Instant::now();
    // Deadlines that passed while queued.
    let mut kept = VecDeque::with_capacity(q.waiting.len());
    for e in q.waiting.drain(..) {
        match e.deadline <= now {
            true => {
                let _ = e.reply.send(timeout_served());
            }
            false => kept.push_back(e),
        }
    }
    q.waiting = kept;
    let Some(head) = q.waiting.front() else {
        q.looking -= 1;
        q.running -= 1;
        return Next::Done;
    };
    if unbatchable {
        q.looking -= 1;
        return Next::Run(q.waiting.pop_front().into_iter().collect());
    }
    let limits = head.limits;
    let (mut rows, mut earliest) = (0u32, head.deadline);
    for e in q.waiting.iter().filter(|e| head.fits(e)) {
        if rows + e.rows > limits.max_rows {
            break;
        }
        rows += e.rows;
        earliest = earliest.min(e.deadline);
    }
    // Wait to fill only while other runs are in flight (drivers looking for a batch run
    // nothing): a batch that waits with the graph idle only adds latency. Stop waiting in
    // time for a full batch to finish before the earliest deadline among its computes.
    let in_flight = q.running - q.looking;
    let fill_until = (head.queued + Duration::from_micros(limits.max_wait_us)).min(
        earliest
            .checked_sub(estimate(limits.max_rows))
            .unwrap_or(now),
    );
    if rows < limits.max_rows && in_flight > 0 && now < fill_until {
        return Next::Fill(fill_until);
    }
    q.looking -= 1;
    Next::Run(take(&mut q.waiting, limits.max_rows))
}

/// Takes the queue's head and every later entry that fits it, up to `max_rows` rows.
fn take(waiting: &mut VecDeque<Entry>, max_rows: u32) -> Vec<Entry> {
    let mut batch: Vec<Entry> = Vec::new();
    let mut rows = 0;
    let mut kept = VecDeque::with_capacity(waiting.len());
    while let Some(e) = waiting.pop_front() {
        let fits = batch.first().is_none_or(|h| h.fits(&e));
        if fits && rows + e.rows <= max_rows {
            rows += e.rows;
            batch.push(e);
        } else {
            kept.push_back(e);
        }
    }
    *waiting = kept;
    batch
}

/// Runs one batch and answers each of its computes.
async fn run_batch(graph: &Arc<LoadedGraph>, batch: Vec<Entry>) {
    let started = Instant::now();
    if batch.len() == 1 {
        if let Some(e) = batch.into_iter().next() {
            let served = run_alone(graph, e.inputs, e.rows, started - e.queued, false).await;
            let _ = e.reply.send(served);
        }
        return;
    }
    let rows: Vec<u32> = batch.iter().map(|e| e.rows).collect();
    let total: u32 = rows.iter().sum();
    let merged = merge(batch.iter().map(|e| &e.inputs));
    let ran = execute(graph, merged, total, false).await;
    let parts = ran.outputs.and_then(|outputs| {
        split(outputs, &rows).inspect_err(|e| {
            // The model's outputs carry no batch axis: no later compute merges either.
            graph.refuse_batching(&e.message);
        })
    });
    match parts {
        Ok(parts) => {
            let shares = shares(ran.took.as_nanos() as u64, &rows);
            graph.metrics_batch(total, batch.iter().map(|e| started - e.queued));
            for ((e, outputs), share_ns) in batch.into_iter().zip(parts).zip(shares) {
                let _ = e.reply.send(Served {
                    outputs: Ok(outputs),
                    share_ns,
                    batch_rows: total,
                    waited: started - e.queued,
                    inline: false,
                });
            }
        }
        // One compute can spoil a merged run: each runs alone, so only it fails.
        Err(e) => {
            tracing::debug!(
                computes = batch.len(),
                "a merged run failed ({}); running its computes one by one",
                e.message
            );
            for e in batch {
                let served = run_alone(graph, e.inputs, e.rows, started - e.queued, false).await;
                let _ = e.reply.send(served);
            }
        }
    }
}

/// Runs one compute by itself.
async fn run_alone(
    graph: &Arc<LoadedGraph>,
    inputs: Vec<Tensor>,
    rows: u32,
    waited: Duration,
    own_thread: bool,
) -> Served {
    let ran = execute(graph, inputs, rows, own_thread).await;
    graph.metrics_batch(rows, std::iter::once(waited));
    Served {
        outputs: ran.outputs,
        share_ns: ran.took.as_nanos() as u64,
        batch_rows: rows,
        waited,
        inline: own_thread && ran.inline,
    }
}

/// One backend run as it went.
pub struct Ran {
    pub outputs: Result<Vec<Tensor>, NnError>,
    pub took: Duration,
    /// It ran on the calling thread (its estimate was short).
    pub inline: bool,
}

/// Runs `inputs` of `rows` rows on `graph`: on this thread when its estimate is short,
/// else on the blocking pool (`cancellable`: stopped if the caller stops waiting).
/// Records the run in the graph's cost model.
pub async fn execute(
    graph: &Arc<LoadedGraph>,
    inputs: Vec<Tensor>,
    rows: u32,
    cancellable: bool,
) -> Ran {
    let started = Instant::now();
    let inline = graph.cost.runs_inline(rows);
    let (outputs, busy) = if inline {
        run_guarded(graph, inputs, &Cancel::default())
    } else {
        let cancel = Cancel::default();
        let mut guard = CancelOnDrop(cancellable.then(|| cancel.clone()));
        let g = graph.clone();
        let out = tokio::task::spawn_blocking(move || run_guarded(&g, inputs, &cancel))
            .await
            .unwrap_or_else(|e| (Err(NnError::runtime("inference task", e)), Duration::ZERO));
        guard.0 = None;
        out
    };
    let took = started.elapsed();
    if outputs.is_ok() {
        graph.ran(rows, took, busy);
    }
    Ran {
        outputs,
        took,
        inline,
    }
}

/// Runs the backend, turning a panic inside it (an engine that indexes out of bounds on
/// a hostile input, say) into an error for this compute alone: the thread, and every
/// other request, carry on. Also says how long the run kept the backend busy, for the
/// cost model: on the CPU, the running thread's CPU time when the backend computes on it
/// alone (tract; ONNX Runtime with its default one intra-op thread), so a run sharing a
/// core with others does not look costlier than it is; elsewhere, its wall time.
fn run_guarded(
    graph: &LoadedGraph,
    inputs: Vec<Tensor>,
    cancel: &Cancel,
) -> (Result<Vec<Tensor>, NnError>, Duration) {
    let measure = super::cost::Busy::of(graph.graph.as_ref(), graph.device);
    let started = measure.start();
    let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        graph.graph.run(inputs, cancel)
    }));
    let busy = measure.since(started);
    let outputs = outputs.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(NnError::runtime(
            &format!("the {} backend failed on this input", graph.backend),
            why,
        ))
    });
    (outputs, busy)
}

/// Cancels an inference if the request stops waiting for it.
struct CancelOnDrop(Option<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

/// One input list out of many, each tensor's rows one after the other (row-major data:
/// the leading dimension's rows are consecutive byte ranges).
fn merge<'a>(mut lists: impl Iterator<Item = &'a Vec<Tensor>>) -> Vec<Tensor> {
    let Some(first) = lists.next() else {
        return Vec::new();
    };
    let mut merged = first.clone();
    for list in lists {
        for (m, t) in merged.iter_mut().zip(list) {
            if let Some(rows) = m.dims.first_mut() {
                *rows += t.dims.first().copied().unwrap_or(0);
            }
            m.data.extend_from_slice(&t.data);
        }
    }
    merged
}

/// Splits a merged run's outputs back by `rows`; fails when an output does not carry the
/// batch axis (its leading dimension is not the run's rows).
fn split(outputs: Vec<Tensor>, rows: &[u32]) -> Result<Vec<Vec<Tensor>>, NnError> {
    let total: u32 = rows.iter().sum();
    let mut parts: Vec<Vec<Tensor>> = rows.iter().map(|_| Vec::new()).collect();
    for out in outputs {
        let row_bytes = match out.dims.first() {
            Some(&n) if n == total && total > 0 && out.data.len() % total as usize == 0 => {
                out.data.len() / total as usize
            }
            _ => {
                return Err(NnError::runtime(
                    "batched inference",
                    format!(
                        "an output of {total} merged rows has dimensions {:?}: it cannot be split back by rows",
                        out.dims
                    ),
                ));
            }
        };
        let mut at = 0;
        for (part, &r) in parts.iter_mut().zip(rows) {
            let len = r as usize * row_bytes;
            let mut dims = out.dims.clone();
            dims[0] = r;
            part.push(Tensor {
                dims,
                ty: out.ty,
                data: out.data[at..at + len].to_vec(),
            });
            at += len;
        }
    }
    Ok(parts)
}

/// Each compute's share of a run of `total_ns`: its rows over the run's rows, in whole
/// nanoseconds that sum to `total_ns` exactly (the remainder goes to the largest
/// fractions, first come first).
pub fn shares(total_ns: u64, rows: &[u32]) -> Vec<u64> {
    let all: u64 = rows.iter().map(|&r| u64::from(r)).sum();
    if all == 0 {
        return rows.iter().map(|_| 0).collect();
    }
    let exact: Vec<(u64, u64)> = rows
        .iter()
        .map(|&r| {
            let n = u128::from(total_ns) * u128::from(r);
            ((n / u128::from(all)) as u64, (n % u128::from(all)) as u64)
        })
        .collect();
    let mut out: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let mut left = total_ns - out.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for i in order {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

#[cfg(test)]
mod tests;
