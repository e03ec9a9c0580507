//! What a model saw, in time buckets: per feature, counts per bin of the reference's edges,
//! and counts per predicted class. One-minute buckets for the last two hours and one-hour
//! buckets for the last two days, allocated only for times that saw traffic, so memory per
//! model stays bounded whatever the traffic; a window merges the buckets it covers. No raw
//! value is kept.

use std::collections::BTreeMap;

use super::profile::{MAX_CLASSES, OTHER_CLASS};

/// One-minute buckets kept (windows up to this many minutes read them).
pub const MINUTES: u64 = 120;
/// One-hour buckets kept (longer windows read them, at hour granularity).
pub const HOURS: u64 = 48;

/// Counts over one bucket of time (or a merged window).
#[derive(Debug, Clone, Default)]
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

    fn merge(&mut self, other: &Counts) {
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

struct Ring {
    span_ms: u64,
    slots: Vec<Option<(u64, Counts)>>,
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
        if slot.as_ref().is_none_or(|(t, _)| *t != at) {
            *slot = Some((at, Counts::new(inputs, bins)));
        }
        match slot {
            Some((_, c)) => c,
            None => unreachable!("the slot was just filled"),
        }
    }

    /// Frees the buckets older than the ring keeps.
    fn trim(&mut self, now_ms: u64) {
        let oldest = (now_ms / self.span_ms).saturating_sub(self.slots.len() as u64 - 1);
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|(at, _)| *at < oldest) {
                *slot = None;
            }
        }
    }

    /// Merges the buckets from `since_ms` on.
    fn merge_since(&self, since_ms: u64, into: &mut Counts) {
        let first = since_ms / self.span_ms;
        for (at, c) in self.slots.iter().flatten() {
            if *at >= first {
                into.merge(c);
            }
        }
    }
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

    /// The counts of the `window_ms` before `now_ms`: whole minutes for windows up to
    /// [`MINUTES`] minutes, whole hours beyond (at most [`HOURS`]).
    pub fn window(&self, now_ms: u64, window_ms: u64) -> Counts {
        let mut out = Counts::new(self.inputs, self.bins);
        let since = now_ms.saturating_sub(window_ms.saturating_sub(1));
        if window_ms <= MINUTES * 60_000 {
            self.minutes.merge_since(since, &mut out);
        } else {
            self.hours.merge_since(since, &mut out);
        }
        out
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
    fn classes_beyond_the_bound_count_as_other() {
        let mut live = Live::new(0, 0);
        let many: Vec<i64> = (0..MAX_CLASSES as i64 + 5).collect();
        live.fold(0, &Fold::Classes(&many));
        let c = live.window(0, 60_000);
        assert_eq!(c.classes.len(), MAX_CLASSES + 1);
        assert_eq!(c.classes[&OTHER_CLASS], 5);
    }
}
