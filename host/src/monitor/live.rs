//! What a model saw, in time buckets: per feature, counts per bin of the reference's edges,
//! and counts per predicted class. One-minute buckets for the last two hours and one-hour
//! buckets for the last two days, allocated only for times that saw traffic, so memory per
//! model stays bounded whatever the traffic; a window merges the buckets it covers. No raw
//! value is kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::profile::{MAX_CLASSES, OTHER_CLASS};

/// One-minute buckets kept (windows up to this many minutes read them).
pub const MINUTES: u64 = 120;
/// One-hour buckets kept (longer windows read them, at hour granularity).
pub const HOURS: u64 = 48;

/// Counts over one bucket of time (or a merged window); JSON when published for the other
/// nodes (see [`Live::take_dirty`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Rows summarised per monitored input (by the profile's input order).
    pub rows: Vec<u64>,
    /// Per bin of every feature of every input, flat (the profile's offsets).
    pub bins: Vec<u64>,
    /// Rows per predicted class.
    pub classes: BTreeMap<i64, u64>,
    /// Rows whose input did not match the reference's layout (not summarised).
    pub mismatched: u64,
}

impl Counts {
    fn new(inputs: usize, bins: usize) -> Self {
        Counts {
            rows: vec![0; inputs],
            bins: vec![0; bins],
            classes: BTreeMap::new(),
            mismatched: 0,
        }
    }

    /// Adds `other`'s counts; counts of another shape (another profile) are skipped and
    /// answered `false`.
    pub fn merge(&mut self, other: &Counts) -> bool {
        if other.rows.len() != self.rows.len() || other.bins.len() != self.bins.len() {
            return false;
        }
        for (a, b) in self.rows.iter_mut().zip(&other.rows) {
            *a += b;
        }
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
        for (c, n) in &other.classes {
            *self.classes.entry(*c).or_default() += n;
        }
        self.mismatched += other.mismatched;
        true
    }

    /// Rows seen: the most of any monitored input.
    pub fn max_rows(&self) -> u64 {
        self.rows.iter().copied().max().unwrap_or(0)
    }

    /// Rows predicted, over all classes.
    pub fn predictions(&self) -> u64 {
        self.classes.values().sum()
    }
}

/// Folds into a bucket: what one compute added.
pub enum Fold<'a> {
    /// Rows of input `input`, as flat bin indexes (one per feature per row).
    Bins {
        input: usize,
        rows: u64,
        bins: &'a [u32],
    },
    /// Rows of an input that did not match the reference.
    Mismatched(u64),
    /// Predicted classes, one per row.
    Classes(&'a [i64]),
}

/// A bucket: its index (time / span), its counts, and whether they changed since they
/// were last published.
struct Slot {
    at: u64,
    counts: Counts,
    dirty: bool,
}

struct Ring {
    span_ms: u64,
    slots: Vec<Option<Slot>>,
}

impl Ring {
    fn new(len: u64, span_ms: u64) -> Self {
        Ring {
            span_ms,
            slots: (0..len).map(|_| None).collect(),
        }
    }

    fn bucket(&mut self, now_ms: u64, inputs: usize, bins: usize) -> &mut Counts {
        let at = now_ms / self.span_ms;
        let len = self.slots.len() as u64;
        let slot = &mut self.slots[(at % len) as usize];
        if slot.as_ref().is_none_or(|s| s.at != at) {
            *slot = Some(Slot {
                at,
                counts: Counts::new(inputs, bins),
                dirty: false,
            });
        }
        match slot {
            Some(s) => {
                s.dirty = true;
                &mut s.counts
            }
            None => unreachable!("the slot was just filled"),
        }
    }

    /// Frees the buckets older than the ring keeps.
    fn trim(&mut self, now_ms: u64) {
        let oldest = (now_ms / self.span_ms).saturating_sub(self.slots.len() as u64 - 1);
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|s| s.at < oldest) {
                *slot = None;
            }
        }
    }

    /// Merges the buckets from `since_ms` on.
    fn merge_since(&self, since_ms: u64, into: &mut Counts) {
        let first = since_ms / self.span_ms;
        for s in self.slots.iter().flatten() {
            if s.at >= first {
                into.merge(&s.counts);
            }
        }
    }

    fn take_dirty(&mut self, out: &mut Vec<Bucket>) {
        for s in self.slots.iter_mut().flatten() {
            if std::mem::take(&mut s.dirty) {
                out.push(Bucket {
                    span_ms: self.span_ms,
                    at: s.at,
                    counts: s.counts.clone(),
                });
            }
        }
    }

    fn mark_dirty(&mut self, at: u64) {
        let len = self.slots.len() as u64;
        if let Some(s) = &mut self.slots[(at % len) as usize]
            && s.at == at
        {
            s.dirty = true;
        }
    }
}

/// A bucket's counts as of now, to publish: `at` is its start divided by `span_ms`.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub span_ms: u64,
    pub at: u64,
    pub counts: Counts,
}

/// Which buckets a window reads (`span_ms`) and the first of them (`from`): whole minutes
/// for windows up to [`MINUTES`] minutes, whole hours beyond (at most [`HOURS`]).
pub fn window_buckets(now_ms: u64, window_ms: u64) -> (u64, u64) {
    let since = now_ms.saturating_sub(window_ms.saturating_sub(1));
    let (span_ms, kept) = if window_ms <= MINUTES * 60_000 {
        (60_000, MINUTES)
    } else {
        (3_600_000, HOURS)
    };
    // No older than the ring keeps: another node's stored buckets cover the same times.
    let oldest = (now_ms / span_ms).saturating_sub(kept - 1);
    (span_ms, (since / span_ms).max(oldest))
}

/// A model's buckets.
pub struct Live {
    inputs: usize,
    bins: usize,
    minutes: Ring,
    hours: Ring,
}

impl Live {
    /// Empty buckets for a profile of `inputs` inputs and `bins` bins in all.
    pub fn new(inputs: usize, bins: usize) -> Self {
        Live {
            inputs,
            bins,
            minutes: Ring::new(MINUTES, 60_000),
            hours: Ring::new(HOURS, 3_600_000),
        }
    }

    /// Adds `fold` to the buckets of `now_ms`.
    pub fn fold(&mut self, now_ms: u64, fold: &Fold<'_>) {
        let (inputs, bins) = (self.inputs, self.bins);
        for counts in [
            self.minutes.bucket(now_ms, inputs, bins),
            self.hours.bucket(now_ms, inputs, bins),
        ] {
            match fold {
                Fold::Bins { input, rows, bins } => {
                    if let Some(r) = counts.rows.get_mut(*input) {
                        *r += rows;
                    }
                    for &b in *bins {
                        if let Some(n) = counts.bins.get_mut(b as usize) {
                            *n += 1;
                        }
                    }
                }
                Fold::Mismatched(rows) => counts.mismatched += rows,
                Fold::Classes(classes) => {
                    for &c in *classes {
                        let key = if counts.classes.len() >= MAX_CLASSES
                            && !counts.classes.contains_key(&c)
                        {
                            OTHER_CLASS
                        } else {
                            c
                        };
                        *counts.classes.entry(key).or_default() += 1;
                    }
                }
            }
        }
    }

    /// Frees the buckets of times the rings no longer keep (a version whose traffic
    /// stopped holds no counts for long).
    pub fn trim(&mut self, now_ms: u64) {
        self.minutes.trim(now_ms);
        self.hours.trim(now_ms);
    }

    /// The counts of the `window_ms` before `now_ms` (the buckets [`window_buckets`]
    /// names).
    pub fn window(&self, now_ms: u64, window_ms: u64) -> Counts {
        let mut out = self.empty();
        let (span_ms, from) = window_buckets(now_ms, window_ms);
        let ring = if span_ms == self.minutes.span_ms {
            &self.minutes
        } else {
            &self.hours
        };
        ring.merge_since(from * span_ms, &mut out);
        out
    }

    /// Zero counts of this shape.
    pub fn empty(&self) -> Counts {
        Counts::new(self.inputs, self.bins)
    }

    /// The buckets that changed since the last call, to publish.
    pub fn take_dirty(&mut self) -> Vec<Bucket> {
        let mut out = Vec::new();
        self.minutes.take_dirty(&mut out);
        self.hours.take_dirty(&mut out);
        out
    }

    /// Marks buckets taken by [`Live::take_dirty`] as changed again (publishing failed).
    pub fn mark_dirty(&mut self, buckets: &[Bucket]) {
        for b in buckets {
            if b.span_ms == self.minutes.span_ms {
                self.minutes.mark_dirty(b.at);
            } else {
                self.hours.mark_dirty(b.at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_merge_only_the_buckets_they_cover() {
        let mut live = Live::new(1, 4);
        let minute = 60_000;
        let t0 = 1_000 * minute;
        live.fold(
            t0,
            &Fold::Bins {
                input: 0,
                rows: 1,
                bins: &[0, 3],
            },
        );
        live.fold(t0 + 5 * minute, &Fold::Classes(&[2, 2, 7]));
        live.fold(
            t0 + 5 * minute,
            &Fold::Bins {
                input: 0,
                rows: 1,
                bins: &[1, 3],
            },
        );
        let now = t0 + 5 * minute + 10;
        let last = live.window(now, minute);
        assert_eq!((last.rows[0], last.bins.clone()), (1, vec![0, 1, 0, 1]));
        assert_eq!(last.predictions(), 3);
        let all = live.window(now, 10 * minute);
        assert_eq!((all.rows[0], all.bins), (2, vec![1, 1, 0, 2]));
        let day = live.window(now, 24 * 60 * minute);
        assert_eq!(day.rows[0], 2);
        // A slot reused two hours later starts from zero.
        live.fold(
            t0 + MINUTES * minute,
            &Fold::Bins {
                input: 0,
                rows: 1,
                bins: &[2],
            },
        );
        let later = live.window(t0 + MINUTES * minute, minute);
        assert_eq!(later.bins, [0, 0, 1, 0]);
    }

    #[test]
    fn changed_buckets_are_taken_once_and_given_back_when_publishing_fails() {
        let mut live = Live::new(1, 2);
        let minute = 60_000;
        live.fold(
            7 * minute,
            &Fold::Bins {
                input: 0,
                rows: 1,
                bins: &[1],
            },
        );
        let taken = live.take_dirty();
        let spans: Vec<(u64, u64)> = taken.iter().map(|b| (b.span_ms, b.at)).collect();
        assert_eq!(spans, [(minute, 7), (3_600_000, 0)]);
        assert_eq!(taken[0].counts.bins, [0, 1]);
        assert!(live.take_dirty().is_empty(), "nothing changed since");
        live.mark_dirty(&taken[..1]);
        assert_eq!(live.take_dirty().len(), 1);
        // Counts serialise and merge back only into counts of the same shape.
        let json = serde_json::to_string(&taken[0].counts).unwrap();
        let back: Counts = serde_json::from_str(&json).unwrap();
        let mut sum = live.empty();
        assert!(sum.merge(&back) && sum.merge(&back));
        assert_eq!(sum.bins, [0, 2]);
        assert!(!sum.merge(&Counts::new(1, 3)));
    }

    #[test]
    fn classes_beyond_the_bound_count_as_other() {
        let mut live = Live::new(0, 0);
        let many: Vec<i64> = (0..MAX_CLASSES as i64 + 5).collect();
        live.fold(0, &Fold::Classes(&many));
        let c = live.window(0, 60_000);
        assert_eq!(c.classes.len(), MAX_CLASSES + 1);
        assert_eq!(c.classes[&OTHER_CLASS], 5);
    }
}
