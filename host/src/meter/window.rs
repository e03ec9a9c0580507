//! Recent statistics of one version: requests, errors (5xx and traps), latency
//! percentiles, cold starts and cache hits over a sliding window of the last minutes, kept
//! in one-second buckets in memory. What `GET .../versions/{v}/stats` shows and what
//! rollout health gates compare.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest window kept.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);

/// Latency buckets: four per power of two of microseconds (about 19% apart), up to ~2^40 µs.
const SUB: u32 = 4;
const SLOTS: usize = 41 * SUB as usize;

fn slot(us: u64) -> usize {
    let us = us.max(1);
    let octave = 63 - us.leading_zeros();
    // The two bits after the leading one: which quarter of the octave.
    let fraction = if octave >= 2 {
        ((us >> (octave - 2)) & (u64::from(SUB) - 1)) as u32
    } else {
        (((us << 2) >> octave) & (u64::from(SUB) - 1)) as u32
    };
    ((octave * SUB + fraction) as usize).min(SLOTS - 1)
}

/// The upper bound of a slot, in microseconds.
fn slot_upper_us(i: usize) -> f64 {
    let octave = (i as u32) / SUB;
    let fraction = (i as u32) % SUB;
    2f64.powi(octave as i32) * (1.0 + f64::from(fraction + 1) / f64::from(SUB))
}

/// The instant every window counts its seconds from, so that the seconds of two versions
/// line up (a gate compares them over the same seconds).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_second() -> u64 {
    epoch().elapsed().as_secs()
}

/// The whole seconds that began at most `ago` ago and have ended (not the current one),
/// the last [`MAX_WINDOW`] of them at most: what a rollout step is judged on, the same
/// range for every version.
pub fn ended_seconds(ago: Duration) -> Range<u64> {
    let now = epoch().elapsed();
    let since = now.saturating_sub(ago);
    let to = now.as_secs();
    let from = (since.as_secs() + u64::from(since.subsec_nanos() > 0))
        .max(to.saturating_sub(MAX_WINDOW.as_secs()))
        .min(to);
    from..to
}

/// One-second buckets over the last [`MAX_WINDOW`], oldest first: the shape every
/// recent statistic here shares.
struct Ring<B> {
    buckets: Mutex<VecDeque<(u64, B)>>,
}

impl<B: Default> Default for Ring<B> {
    fn default() -> Self {
        Ring {
            buckets: Mutex::new(VecDeque::new()),
        }
    }
}

impl<B: Default> Ring<B> {
    /// Updates the bucket of the current second (dropping those past the window).
    fn record(&self, f: impl FnOnce(&mut B)) {
        let second = now_second();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.back().is_none_or(|b| b.0 != second) {
            buckets.push_back((second, B::default()));
            while buckets
                .front()
                .is_some_and(|b| b.0 + MAX_WINDOW.as_secs() < second)
            {
                buckets.pop_front();
            }
        }
        if let Some(b) = buckets.back_mut() {
            f(&mut b.1);
        }
    }

    /// The seconds of the last `window` (1 s to [`MAX_WINDOW`], returned with them): the
    /// current one and the whole seconds before it.
    fn last(window: Duration) -> (Range<u64>, u64) {
        let window = window.min(MAX_WINDOW).max(Duration::from_secs(1)).as_secs();
        let now = now_second();
        (now.saturating_sub(window - 1)..now + 1, window)
    }

    fn visit(&self, seconds: &Range<u64>, mut f: impl FnMut(&B)) {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for (_, b) in buckets.iter().filter(|b| seconds.contains(&b.0)) {
            f(b);
        }
    }
}

struct Bucket {
    requests: u64,
    errors: u64,
    cold: u64,
    cache_hits: u64,
    latency: Box<[u32; SLOTS]>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            requests: 0,
            errors: 0,
            cold: 0,
            cache_hits: 0,
            latency: Box::new([0; SLOTS]),
        }
    }
}

/// One version's recent requests.
#[derive(Default)]
pub struct Window {
    ring: Ring<Bucket>,
}

/// What a window shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub window_s: u64,
    pub requests: u64,
    pub errors: u64,
    /// errors / requests (0 without requests).
    pub error_rate: f64,
    /// Latency percentiles in milliseconds (bucket upper bounds, ~19% resolution);
    /// `None` without requests.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub cold_starts: u64,
    pub cache_hits: u64,
    /// cache_hits / requests.
    pub cache_hit_ratio: f64,
}

impl Window {
    /// Records one finished request.
    pub fn record(&self, took: Duration, error: bool, cold: bool, cache_hit: bool) {
        self.ring.record(|b| {
            b.requests += 1;
            b.errors += u64::from(error);
            b.cold += u64::from(cold);
            b.cache_hits += u64::from(cache_hit);
            b.latency[slot(took.as_micros() as u64)] += 1;
        });
    }

    /// The statistics of the last `window` (at most [`MAX_WINDOW`]) over `windows` taken
    /// together (a version's requests are split between two: routed and others).
    pub fn combined(windows: &[&Window], window: Duration) -> Stats {
        let (seconds, window_s) = Ring::<Bucket>::last(window);
        let mut sum = Aggregate::default();
        for w in windows {
            w.ring.visit(&seconds, |b| sum.add(b));
        }
        sum.stats(window_s)
    }

    /// The statistics of the last `window` (at most [`MAX_WINDOW`]).
    pub fn stats(&self, window: Duration) -> Stats {
        Window::combined(&[self], window)
    }

    /// The statistics of the seconds `seconds` (from [`ended_seconds`]).
    pub fn stats_in(&self, seconds: &Range<u64>) -> Stats {
        self.aggregate_in(seconds)
            .stats(seconds.end.saturating_sub(seconds.start))
    }

    /// The numbers of the seconds `seconds` (from [`ended_seconds`]), to be added to other
    /// processes' numbers of the same seconds.
    pub fn aggregate_in(&self, seconds: &Range<u64>) -> Aggregate {
        let mut sum = Aggregate::default();
        self.ring.visit(seconds, |b| sum.add(b));
        sum
    }
}

/// Buckets added up: what one process counted of a version over some seconds, in a form
/// that adds up across processes (counts and latency buckets, not percentiles), so a
/// rollout's driver can judge the numbers of every node together.
#[derive(Clone, PartialEq)]
pub struct Aggregate {
    requests: u64,
    errors: u64,
    cold: u64,
    hits: u64,
    latency: [u64; SLOTS],
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate {
            requests: 0,
            errors: 0,
            cold: 0,
            hits: 0,
            latency: [0; SLOTS],
        }
    }
}

impl std::fmt::Debug for Aggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregate")
            .field("requests", &self.requests)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

/// An [`Aggregate`] as stored: the latency buckets that are not empty, by index.
#[derive(Serialize, Deserialize)]
struct AggregateWire {
    requests: u64,
    errors: u64,
    cold: u64,
    hits: u64,
    latency: Vec<(usize, u64)>,
}

impl Serialize for Aggregate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        AggregateWire {
            requests: self.requests,
            errors: self.errors,
            cold: self.cold,
            hits: self.hits,
            latency: (self.latency.iter().enumerate())
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (i, *n))
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Aggregate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = AggregateWire::deserialize(d)?;
        let mut a = Aggregate {
            requests: w.requests,
            errors: w.errors,
            cold: w.cold,
            hits: w.hits,
            ..Aggregate::default()
        };
        for (i, n) in w.latency {
            let slot = a.latency.get_mut(i).ok_or_else(|| {
                serde::de::Error::custom(format!("latency bucket {i} out of range"))
            })?;
            *slot += n;
        }
        Ok(a)
    }
}

impl Aggregate {
    fn add(&mut self, b: &Bucket) {
        self.requests += b.requests;
        self.errors += b.errors;
        self.cold += b.cold;
        self.hits += b.cache_hits;
        for (sum, n) in self.latency.iter_mut().zip(b.latency.iter()) {
            *sum += u64::from(*n);
        }
    }

    /// Adds another process's numbers of the same seconds.
    pub fn merge(&mut self, other: &Aggregate) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.cold += other.cold;
        self.hits += other.hits;
        for (sum, n) in self.latency.iter_mut().zip(other.latency.iter()) {
            *sum += n;
        }
    }

    /// The statistics of these numbers, over a window of `window_s` seconds.
    pub fn stats(&self, window_s: u64) -> Stats {
        let Aggregate {
            requests,
            errors,
            cold,
            hits,
            ref latency,
        } = *self;
        let percentile = |p: f64| -> Option<f64> {
            if requests == 0 {
                return None;
            }
            let rank = ((p * requests as f64).ceil() as u64).max(1);
            let mut seen = 0;
            latency.iter().enumerate().find_map(|(i, n)| {
                seen += n;
                (seen >= rank).then(|| slot_upper_us(i) / 1000.0)
            })
        };
        let ratio = |n: u64| {
            if requests == 0 {
                0.0
            } else {
                n as f64 / requests as f64
            }
        };
        Stats {
            window_s,
            requests,
            errors,
            error_rate: ratio(errors),
            p50_ms: percentile(0.50),
            p95_ms: percentile(0.95),
            p99_ms: percentile(0.99),
            cold_starts: cold,
            cache_hits: hits,
            cache_hit_ratio: ratio(hits),
        }
    }
}

/// Comparisons of one shadow version with the primaries it shadowed, over the same
/// sliding window as [`Window`] (counters only).
#[derive(Default)]
pub struct ShadowWindow {
    ring: Ring<ShadowBucket>,
}

#[derive(Clone, Copy, Default)]
struct ShadowBucket {
    compared: u64,
    mismatches: u64,
    errors: u64,
    skipped: u64,
    primary_us: u64,
    shadow_us: u64,
}

/// What a shadow window shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShadowStats {
    pub window_s: u64,
    /// Copies answered and compared with their primary.
    pub compared: u64,
    /// Compared copies whose status or body (blake3) differed from the primary's.
    pub mismatches: u64,
    /// mismatches / compared.
    pub mismatch_rate: f64,
    /// Compared copies that failed (5xx, trap, timeout).
    pub errors: u64,
    /// Copies not sent: the shadow was at its concurrency limit, or the primary's
    /// answer was cut short.
    pub skipped: u64,
    /// Mean latency of the compared requests on each side, and shadow minus primary.
    pub primary_mean_ms: Option<f64>,
    pub shadow_mean_ms: Option<f64>,
    pub latency_diff_ms: Option<f64>,
}

impl ShadowWindow {
    /// Records one compared copy.
    pub fn compared(&self, matched: bool, error: bool, primary: Duration, shadow: Duration) {
        self.ring.record(|b| {
            b.compared += 1;
            b.mismatches += u64::from(!matched);
            b.errors += u64::from(error);
            b.primary_us += primary.as_micros() as u64;
            b.shadow_us += shadow.as_micros() as u64;
        });
    }

    /// Records a copy that was not sent.
    pub fn skipped(&self) {
        self.ring.record(|b| b.skipped += 1);
    }

    /// The comparisons of the last `window` (at most [`MAX_WINDOW`]).
    pub fn stats(&self, window: Duration) -> ShadowStats {
        let mut t = ShadowBucket::default();
        let (seconds, window_s) = Ring::<ShadowBucket>::last(window);
        self.ring.visit(&seconds, |b| {
            t.compared += b.compared;
            t.mismatches += b.mismatches;
            t.errors += b.errors;
            t.skipped += b.skipped;
            t.primary_us += b.primary_us;
            t.shadow_us += b.shadow_us;
        });
        let window = Duration::from_secs(window_s);
        let mean = |us: u64| (t.compared > 0).then(|| us as f64 / t.compared as f64 / 1000.0);
        ShadowStats {
            window_s: window.as_secs(),
            compared: t.compared,
            mismatches: t.mismatches,
            mismatch_rate: match t.compared {
                0 => 0.0,
                n => t.mismatches as f64 / n as f64,
            },
            errors: t.errors,
            skipped: t.skipped,
            primary_mean_ms: mean(t.primary_us),
            shadow_mean_ms: mean(t.shadow_us),
            latency_diff_ms: mean(t.shadow_us)
                .zip(mean(t.primary_us))
                .map(|(s, p)| s - p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_grow_with_latency_and_bound_it() {
        let mut last = 0;
        for us in [1, 2, 3, 5, 8, 100, 1_000, 10_000, 1_000_000] {
            let s = slot(us);
            assert!(s >= last, "{us}");
            assert!(
                slot_upper_us(s) >= us as f64,
                "{us} -> {}",
                slot_upper_us(s)
            );
            assert!(
                slot_upper_us(s) <= us as f64 * 1.5 + 1.0,
                "{us} -> {}",
                slot_upper_us(s)
            );
            last = s;
        }
    }

    #[test]
    fn aggregates_of_two_processes_add_up_through_their_stored_form() {
        let (a, b) = (Window::default(), Window::default());
        for _ in 0..90 {
            a.record(Duration::from_millis(1), false, false, false);
        }
        for _ in 0..10 {
            b.record(Duration::from_millis(200), true, false, false);
        }
        let seconds = 0..now_second() + 1;
        let stored = serde_json::to_string(&b.aggregate_in(&seconds)).expect("json");
        let mut total = a.aggregate_in(&seconds);
        total.merge(&serde_json::from_str(&stored).expect("parse"));
        let stats = total.stats(1);
        assert_eq!((stats.requests, stats.errors), (100, 10));
        // The slow node's latency sets the merged p99, as if one process had seen it all.
        assert!(stats.p99_ms.is_some_and(|p| p >= 200.0), "{stats:?}");
        assert!(stats.p50_ms.is_some_and(|p| p < 2.0), "{stats:?}");
        assert!(
            serde_json::from_str::<Aggregate>(
                r#"{"requests":1,"errors":0,"cold":0,"hits":0,"latency":[[9999,1]]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_window_counts_errors_and_ranks_latencies() {
        let w = Window::default();
        for i in 0..100u64 {
            w.record(
                Duration::from_millis(if i < 98 { 1 } else { 100 }),
                i % 10 == 0,
                i == 0,
                i % 4 == 0,
            );
        }
        let s = w.stats(Duration::from_secs(60));
        assert_eq!(
            (s.requests, s.errors, s.cold_starts, s.cache_hits),
            (100, 10, 1, 25)
        );
        assert!((s.error_rate - 0.1).abs() < 1e-9);
        let p50 = s.p50_ms.unwrap_or_default();
        let p99 = s.p99_ms.unwrap_or_default();
        assert!((1.0..1.3).contains(&p50), "{p50}");
        assert!((100.0..130.0).contains(&p99), "{p99}");
        assert_eq!(Window::default().stats(Duration::from_secs(5)).p99_ms, None);
    }

    #[test]
    fn ended_seconds_hold_whole_seconds_only_and_at_most_the_window() {
        let r = ended_seconds(Duration::from_secs(3600));
        assert!(r.end - r.start <= MAX_WINDOW.as_secs());
        let r = ended_seconds(Duration::ZERO);
        assert!(r.is_empty());
        let w = Window::default();
        w.record(Duration::from_millis(1), false, false, false);
        // The current second has not ended: nothing counted yet.
        assert_eq!(
            w.stats_in(&ended_seconds(Duration::from_secs(5))).requests,
            0
        );
        assert_eq!(w.stats(Duration::from_secs(5)).requests, 1);
        assert_eq!(
            Window::combined(&[&w, &w], Duration::from_secs(5)).requests,
            2
        );
    }

    #[test]
    fn a_shadow_window_counts_mismatches_and_latency_difference() {
        let w = ShadowWindow::default();
        let ms = Duration::from_millis;
        w.compared(true, false, ms(10), ms(12));
        w.compared(false, true, ms(10), ms(30));
        w.skipped();
        let s = w.stats(Duration::from_secs(60));
        assert_eq!(
            (s.compared, s.mismatches, s.errors, s.skipped),
            (2, 1, 1, 1)
        );
        assert!((s.mismatch_rate - 0.5).abs() < 1e-9);
        assert_eq!(s.latency_diff_ms, Some(11.0));
        assert_eq!(
            ShadowWindow::default().stats(ms(5000)).latency_diff_ms,
            None
        );
    }
}
