//! What a graph's runs cost: `time = fixed + per_row × rows`, fitted by least squares over
//! the runs it made (recent ones weigh more) and, for `batch = "auto"`, over a calibration
//! at 1, 2, 4, 8 and 16 rows when it loads. Two decisions read the fit:
//!
//! - where a run goes: on the server thread that asked when its estimate (for *its* rows)
//!   is short, else on the blocking pool, so a huge input to a quick model never stalls the
//!   async workers or outlives its deadline;
//! - whether merging computes pays (`"auto"`): the throughput of a batch of
//!   [`TYPICAL_DEPTH`] rows against one row at a time must reach [`MIN_GAIN`], and the
//!   limits follow from the fit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Tensor;
use super::backend::{BackendGraph, Cancel};

/// Runs estimated shorter than this stay on the server thread that asked.
pub const INLINE_RUN: Duration = Duration::from_micros(250);
/// Queue depth at which `"auto"` judges the gain of batching.
pub const TYPICAL_DEPTH: f64 = 8.0;
/// Throughput gain at [`TYPICAL_DEPTH`] that turns `"auto"` batching on.
pub const MIN_GAIN: f64 = 1.3;
/// Rows the calibration times.
pub const CALIBRATION_ROWS: [u32; 5] = [1, 2, 4, 8, 16];
/// Size given to a free dimension other than the batch axis when calibrating (a sequence
/// length, say).
const CALIBRATION_FREE_DIM: u32 = 16;
/// Rounds of timed runs over the row counts (the fastest of each counts).
const CALIBRATION_REPEATS: usize = 5;
/// How much the oldest sample still weighs against the newest after ~100 more runs.
const DECAY: f64 = 0.98;
/// Most rows `"auto"` merges into one run.
const AUTO_MAX_ROWS: u32 = 64;
/// Throughput a doubled batch must add for `"auto"` to allow it.
const MIN_DOUBLING_GAIN: f64 = 1.05;
/// Longest `"auto"` waits for a batch to fill.
const AUTO_MAX_WAIT_US: u64 = 2_000;

/// A fitted `time = fixed + per_row × rows`, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    pub fixed_us: f64,
    pub per_row_us: f64,
}

impl Fit {
    /// Estimated time of a run of `rows`.
    pub fn estimate(&self, rows: u32) -> Duration {
        let us = self.fixed_us + self.per_row_us * f64::from(rows);
        Duration::from_secs_f64(us.max(0.0) / 1e6)
    }

    /// Throughput of runs of `depth` rows over runs of one row.
    pub fn gain(&self, depth: f64) -> f64 {
        let one = self.fixed_us + self.per_row_us;
        let batch = self.fixed_us + self.per_row_us * depth;
        if batch <= 0.0 {
            return 1.0;
        }
        depth * one / batch
    }

    /// Least squares over `(rows, µs, weight)` samples; `None` without two distinct row
    /// counts.
    fn of(samples: impl Iterator<Item = (f64, f64, f64)>) -> Option<Fit> {
        let mut s = Sums::default();
        for (x, y, weight) in samples {
            s.w += weight;
            s.sx += weight * x;
            s.sy += weight * y;
            s.sxx += weight * x * x;
            s.sxy += weight * x * y;
        }
        solve(&s)
    }
}

/// Sums for an online weighted least-squares fit, older samples decaying.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// The row counts seen, to tell one from several.
    min_rows: u32,
    max_rows: u32,
    runs: u64,
}

/// The cost of one graph's runs, learnt from the runs themselves: their wall time, for
/// estimates of how long a run will take (where it runs, how long a batch may wait), and
/// the time they kept the backend busy, for the fit `"auto"` decides by (wall time on a
/// shared core grows with whatever else runs, not with the rows).
#[derive(Debug, Default)]
pub struct CostModel {
    wall: Mutex<Sums>,
    busy: Mutex<Sums>,
}

impl Sums {
    fn add(&mut self, rows: u32, took: Duration) {
        let (x, y) = (f64::from(rows.max(1)), took.as_secs_f64() * 1e6);
        let s = self;
        s.w = s.w * DECAY + 1.0;
        s.sx = s.sx * DECAY + x;
        s.sy = s.sy * DECAY + y;
        s.sxx = s.sxx * DECAY + x * x;
        s.sxy = s.sxy * DECAY + x * y;
        s.min_rows = if s.runs == 0 {
            rows
        } else {
            s.min_rows.min(rows)
        };
        s.max_rows = s.max_rows.max(rows);
        s.runs += 1;
    }
}

/// Locks a set of sums: a few float updates, so a poisoned lock holds consistent enough
/// numbers.
fn lock(sums: &Mutex<Sums>) -> std::sync::MutexGuard<'_, Sums> {
    sums.lock().unwrap_or_else(|p| p.into_inner())
}

impl CostModel {
    /// Records a run of `rows` that took `took` and kept the backend busy for `busy`.
    pub fn record(&self, rows: u32, took: Duration, busy: Duration) {
        lock(&self.wall).add(rows, took);
        lock(&self.busy).add(rows, busy);
    }

    /// Runs recorded so far.
    pub fn runs(&self) -> u64 {
        lock(&self.wall).runs
    }

    /// The fit of the runs' busy time so far, once they span two row counts.
    pub fn fit(&self) -> Option<Fit> {
        let s = *lock(&self.busy);
        if s.runs == 0 || s.min_rows == s.max_rows {
            return None;
        }
        solve(&s)
    }

    /// Estimated time of a run of `rows`: from the fit, or from the mean time per row of the
    /// runs so far (which over-estimates a large input to a model whose fixed cost
    /// dominates, the safe side); `None` before any run.
    pub fn estimate(&self, rows: u32) -> Option<Duration> {
        let s = *lock(&self.wall);
        if s.runs == 0 {
            return None;
        }
        if s.min_rows != s.max_rows
            && let Some(fit) = solve(&s)
        {
            return Some(fit.estimate(rows));
        }
        let per_row_us = s.sy / s.sx.max(f64::MIN_POSITIVE);
        Some(Duration::from_secs_f64(
            (per_row_us * f64::from(rows.max(1))).max(0.0) / 1e6,
        ))
    }

    /// Whether a run of `rows` is short enough to do on the server thread that asked.
    pub fn runs_inline(&self, rows: u32) -> bool {
        self.estimate(rows).is_some_and(|d| d < INLINE_RUN)
    }
}

/// Solves the weighted least squares the sums stand for. Negative parts are clamped to
/// zero (noise on a tiny model).
fn solve(s: &Sums) -> Option<Fit> {
    let det = s.w * s.sxx - s.sx * s.sx;
    if s.w <= 0.0 || det.abs() < 1e-9 * s.w * s.w {
        return None;
    }
    let per_row = ((s.w * s.sxy - s.sx * s.sy) / det).max(0.0);
    let fixed = ((s.sy - per_row * s.sx) / s.w).max(0.0);
    Some(Fit {
        fixed_us: fixed,
        per_row_us: per_row,
    })
}

/// What `"auto"` decided for a graph, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub on: bool,
    pub max_rows: u32,
    pub max_wait_us: u64,
    pub reason: String,
}

/// Decides from `fit` whether merging pays and with which limits.
pub fn decide(fit: &Fit) -> Decision {
    let gain = fit.gain(TYPICAL_DEPTH);
    let numbers = format!(
        "fixed {:.1} µs, per row {:.2} µs: {gain:.2}x the throughput at {TYPICAL_DEPTH} rows",
        fit.fixed_us, fit.per_row_us
    );
    if gain < MIN_GAIN {
        return Decision {
            on: false,
            max_rows: 1,
            max_wait_us: 0,
            reason: format!("no gain: per-row cost dominates ({numbers}, under {MIN_GAIN}x)"),
        };
    }
    // Batches grow (in powers of two) while doubling one still adds at least
    // MIN_DOUBLING_GAIN throughput: past that, a bigger batch only makes its requests wait
    // longer for their answers. Batches form only when requests queue, so a quiet request
    // never pays for a large limit.
    let mut max_rows = 2;
    while max_rows * 2 <= AUTO_MAX_ROWS
        && fit.gain(f64::from(max_rows * 2)) >= MIN_DOUBLING_GAIN * fit.gain(f64::from(max_rows))
    {
        max_rows *= 2;
    }
    // Waiting for more rows pays while it costs less than the run it saves.
    let max_wait_us = ((fit.fixed_us / 2.0) as u64).min(AUTO_MAX_WAIT_US);
    Decision {
        on: true,
        max_rows,
        max_wait_us,
        reason: format!("batching pays: {numbers}"),
    }
}

/// Inputs of `rows` rows for `graph`, all zeros, or why the graph cannot batch: every
/// input must have a free leading (batch) dimension and an element type `wasi:nn` carries.
pub fn sample_inputs(graph: &dyn BackendGraph, rows: u32) -> Result<Vec<Tensor>, String> {
    graph
        .inputs()
        .iter()
        .map(|info| {
            let ty = info.ty.ok_or_else(|| {
                format!(
                    "input {:?} has an element type wasi-nn cannot express",
                    info.name
                )
            })?;
            match info.dims.first() {
                Some(None) => {}
                _ => {
                    return Err(format!(
                        "input {:?} has no free leading (batch) dimension: {}",
                        info.name,
                        super::backend::shape_text(&info.dims)
                    ));
                }
            }
            let dims: Vec<u32> = std::iter::once(rows)
                .chain(info.dims[1..].iter().map(|d| match d {
                    Some(n) => u32::try_from(*n).unwrap_or(u32::MAX),
                    None => CALIBRATION_FREE_DIM,
                }))
                .collect();
            let len = dims
                .iter()
                .try_fold(ty.size() as u64, |acc, d| acc.checked_mul(u64::from(*d)))
                .filter(|n| *n <= 1 << 30)
                .ok_or_else(|| format!("input {:?} is too large to calibrate", info.name))?;
            Ok(Tensor {
                dims,
                ty,
                data: vec![0; len as usize],
            })
        })
        .collect()
}

/// Whether timing `graph` needs a real input: it has a free dimension besides the batch
/// axis, whose size changes what a row costs.
pub fn needs_real_input(graph: &dyn BackendGraph) -> bool {
    graph
        .inputs()
        .iter()
        .any(|info| info.dims.iter().skip(1).any(Option::is_none))
}

/// Largest calibration input made from a real one (all inputs, at the most rows timed).
const MAX_CALIBRATION_BYTES: usize = 256 << 20;

/// Bytes of one row of `t` (its leading axis counting at least one).
fn row_bytes(t: &Tensor) -> usize {
    t.data.len() / t.dims.first().map_or(1, |&n| n.max(1) as usize)
}

/// Whether `sample` (a compute's inputs) is small enough to time tiled to the most rows.
pub fn sample_fits(sample: &[Tensor]) -> bool {
    let most = CALIBRATION_ROWS.iter().copied().max().unwrap_or(1) as usize;
    let row: usize = sample.iter().map(row_bytes).sum();
    row.saturating_mul(most) <= MAX_CALIBRATION_BYTES
}

/// `sample`'s first row of each input, repeated `rows` times.
pub fn tiled(sample: &[Tensor], rows: u32) -> Vec<Tensor> {
    sample
        .iter()
        .map(|t| {
            let row = row_bytes(t);
            let mut dims = t.dims.clone();
            if let Some(n) = dims.first_mut() {
                *n = rows;
            }
            Tensor {
                dims,
                ty: t.ty,
                data: t.data[..row].repeat(rows as usize),
            }
        })
        .collect()
}

/// Longest a calibration may take (estimated from its first run): a model too slow to time
/// in this keeps batching off.
const CALIBRATION_BUDGET: Duration = Duration::from_secs(30);

/// Measures how long a run keeps the backend busy: the calling thread's CPU time when the
/// backend computes on it alone, else wall time.
#[derive(Debug, Clone, Copy)]
pub struct Busy {
    cpu: bool,
}

/// Where a [`Busy`] measurement started.
#[derive(Debug, Clone, Copy)]
pub struct BusyStart {
    wall: Instant,
    cpu: Duration,
}

impl Busy {
    /// The measure for `graph` running on `device`: thread CPU time on the CPU when the
    /// backend computes on the calling thread alone, else wall time.
    pub fn of(graph: &dyn BackendGraph, device: super::Device) -> Self {
        Busy {
            cpu: device == super::Device::Cpu && graph.computes_on_caller(),
        }
    }

    pub fn start(&self) -> BusyStart {
        BusyStart {
            wall: Instant::now(),
            cpu: if self.cpu {
                thread_cpu()
            } else {
                Duration::ZERO
            },
        }
    }

    pub fn since(&self, start: BusyStart) -> Duration {
        match self.cpu {
            true => thread_cpu().saturating_sub(start.cpu),
            false => start.wall.elapsed(),
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; the clock id is a constant
    // every Linux supports.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    match rc {
        0 => Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
        _ => Duration::ZERO,
    }
}

/// Calibrations run one at a time: two at once would time each other's contention.
static CALIBRATING: Mutex<()> = Mutex::new(());

/// Times `graph` at [`CALIBRATION_ROWS`] on `sample`'s first row repeated (zeros without
/// one) and fits the cost; fails (batching
/// stays off, with the reason) when the model cannot batch or its outputs do not carry the
/// batch axis. Each row count counts its fastest of a few runs: interference only ever
/// adds time.
pub fn calibrate(
    graph: &dyn BackendGraph,
    sample: Option<&[Tensor]>,
    device: super::Device,
) -> Result<Fit, String> {
    let _one_at_a_time = CALIBRATING.lock().unwrap_or_else(|p| p.into_inner());
    let cancel = Cancel::default();
    let inputs = |rows: u32| match sample {
        Some(sample) => Ok(tiled(sample, rows)),
        None => sample_inputs(graph, rows),
    };
    // Busy time, as the online refit counts it: on the CPU, the thread's CPU time (another
    // run sharing the core, or a wait for a session, does not count); else wall time.
    let measure = Busy::of(graph, device);
    // One untimed run first: the first run of a graph pays for lazy initialisation. It
    // also tells whether timing the model fits in the budget.
    let warm = Instant::now();
    graph
        .run(inputs(1)?, &cancel)
        .map_err(|e| format!("the model failed on a sample input: {}", e.message))?;
    let runs: u32 = CALIBRATION_ROWS.iter().sum::<u32>() * CALIBRATION_REPEATS as u32;
    if warm.elapsed() * runs > CALIBRATION_BUDGET {
        return Err(format!(
            "too slow to time: one row took {:.1} ms, and timing takes {runs} times that (more than {} s)",
            warm.elapsed().as_secs_f64() * 1e3,
            CALIBRATION_BUDGET.as_secs()
        ));
    }
    // Rounds over every row count, so that a slow spell on a shared machine slows all of
    // them alike rather than one.
    let mut fastest = [f64::INFINITY; CALIBRATION_ROWS.len()];
    for _ in 0..CALIBRATION_REPEATS {
        for (i, rows) in CALIBRATION_ROWS.into_iter().enumerate() {
            let inputs = inputs(rows)?;
            let started = measure.start();
            let outputs = graph
                .run(inputs, &cancel)
                .map_err(|e| format!("the model failed on a sample input: {}", e.message))?;
            fastest[i] = fastest[i].min(measure.since(started).as_secs_f64() * 1e6);
            if let Some((info, t)) = graph
                .outputs()
                .iter()
                .zip(&outputs)
                .find(|(_, t)| t.dims.first() != Some(&rows))
            {
                return Err(format!(
                    "output {:?} does not carry the batch axis ({rows} rows gave dimensions {:?})",
                    info.name, t.dims
                ));
            }
        }
    }
    let samples = CALIBRATION_ROWS
        .iter()
        .zip(fastest)
        .map(|(rows, us)| (f64::from(*rows), us, 1.0));
    Fit::of(samples).ok_or_else(|| "the timings did not fit a line".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fit_recovers_the_line_and_decides_by_the_gain() {
        let samples = [1.0, 2.0, 4.0, 8.0, 16.0].map(|x| (x, 100.0 + 2.0 * x, 1.0));
        let fit = Fit::of(samples.into_iter()).unwrap();
        assert!((fit.fixed_us - 100.0).abs() < 1e-6 && (fit.per_row_us - 2.0).abs() < 1e-6);
        let d = decide(&fit);
        assert!(d.on, "{d:?}");
        assert_eq!(d.max_rows, AUTO_MAX_ROWS, "doubling keeps paying: {d:?}");
        assert_eq!(d.max_wait_us, 50);
        // embed's fit on this machine: 8 rows give 1.54x and 16 only 4% more.
        let embed = Fit {
            fixed_us: 1922.8,
            per_row_us: 2875.6,
        };
        assert_eq!(decide(&embed).max_rows, 8, "{:?}", decide(&embed));
        assert!(d.reason.contains("batching pays"), "{}", d.reason);

        // Per-row cost dominates: eight rows cost nearly eight runs.
        let heavy = Fit {
            fixed_us: 2.0,
            per_row_us: 100.0,
        };
        let d = decide(&heavy);
        assert!(!d.on, "{d:?}");
        assert!(
            d.reason.starts_with("no gain: per-row cost dominates"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn the_online_model_estimates_by_rows_and_errs_on_the_slow_side_without_a_fit() {
        let m = CostModel::default();
        assert_eq!(m.estimate(1), None);
        assert!(
            !m.runs_inline(1),
            "unknown models run off the async workers"
        );
        m.record(1, Duration::from_micros(10), Duration::from_micros(10));
        assert!(m.runs_inline(1));
        // One row count only: a large input is priced per row, and goes to the pool.
        assert!(!m.runs_inline(100), "{:?}", m.estimate(100));
        for rows in [1, 2, 4, 8] {
            let took = Duration::from_micros(8 + 2 * u64::from(rows));
            m.record(rows, took, took);
        }
        let fit = m.fit().expect("several row counts");
        assert!(fit.per_row_us > 1.0 && fit.per_row_us < 3.0, "{fit:?}");
        assert!(m.runs_inline(16));
        assert!(!m.runs_inline(10_000), "a huge input to a quick model");

        // Runs on a shared core: wall time that grows with the contention (a lone row
        // waited as long as eight), busy time that grows with the rows. The fit, and so
        // "auto", follows the busy time; estimates of where a run goes, the wall time.
        let shared = CostModel::default();
        for _ in 0..10 {
            for rows in [1u32, 8] {
                let busy = Duration::from_micros(1000 * u64::from(rows));
                shared.record(rows, Duration::from_millis(40), busy);
            }
        }
        let fit = shared.fit().unwrap();
        assert!(
            fit.fixed_us < 100.0 && (fit.per_row_us - 1000.0).abs() < 50.0,
            "{fit:?}"
        );
        assert!(!decide(&fit).on, "no gain when the rows are the cost");
        assert!(shared.estimate(1).unwrap() > Duration::from_millis(30));
    }

    #[test]
    fn a_gain_of_one_when_nothing_is_fixed() {
        let f = Fit {
            fixed_us: 0.0,
            per_row_us: 5.0,
        };
        assert!((f.gain(8.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_real_input_is_timed_as_its_first_row_repeated_within_a_size_bound() {
        let t = |dims: Vec<u32>, data: Vec<u8>| Tensor {
            dims,
            ty: crate::nn::ElementType::U8,
            data,
        };
        let sample = [
            t(vec![2, 3], vec![1, 2, 3, 4, 5, 6]),
            t(vec![2, 1], vec![7, 8]),
        ];
        let four = tiled(&sample, 4);
        assert_eq!(four[0], t(vec![4, 3], [1, 2, 3].repeat(4)));
        assert_eq!(four[1], t(vec![4, 1], vec![7; 4]));
        assert!(sample_fits(&sample));
        let huge = t(vec![1, 32 << 20], vec![0; 32 << 20]);
        assert!(!sample_fits(&[huge]), "16 rows of 32 MiB is over the bound");
    }
}
