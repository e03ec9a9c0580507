//! The warm-up of a monitor deployed without a reference file: its first sampled computes'
//! inputs are held in memory (bounded, never stored) until there are [`WARMUP_ROWS`] rows,
//! then profiled like a reference file; the profile's bins are stored and shared by every
//! node, and the rows are folded into the buckets and dropped.

use std::collections::BTreeMap;

use super::npy::Array;
use super::profile;
use crate::nn::{Tensor, TensorInfo};

/// Rows a monitor without a reference file holds (in memory, never stored) before its bins
/// are set from them.
pub const WARMUP_ROWS: usize = 500;
/// Most bytes of input those rows may take; wider rows make fewer of them.
pub(super) const WARMUP_BYTES: usize = 16 << 20;

/// The first rows a monitor without a reference file sees, held until they set its bins.
#[derive(Default)]
pub(super) struct Warmup {
    pub computes: Vec<Vec<Tensor>>,
    pub rows: usize,
    pub bytes: usize,
}

impl Warmup {
    pub fn full(&self) -> bool {
        self.rows >= WARMUP_ROWS || self.bytes >= WARMUP_BYTES
    }
}

/// The warm-up's computes as reference arrays, one per model input (by name), in the
/// reference file's layout: rows along the first axis.
pub(super) fn warmup_arrays(
    computes: &[Vec<Tensor>],
    inputs: &[TensorInfo],
) -> Result<BTreeMap<String, Array>, String> {
    let mut arrays = BTreeMap::new();
    for (i, info) in inputs.iter().enumerate() {
        let mut values = Vec::new();
        let mut shape: Option<Vec<usize>> = None;
        let mut rows = 0;
        for inputs in computes {
            let Some(t) = inputs.get(i) else { continue };
            let dims: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
            let (n, tail) = match dims.split_first() {
                Some((n, tail)) => (*n, tail.to_vec()),
                None => (1, Vec::new()),
            };
            match &shape {
                Some(s) if *s != tail => continue,
                Some(_) => {}
                None => shape = Some(tail),
            }
            profile::for_each_value(t.ty, &t.data, |_, v| values.push(v));
            rows += n;
        }
        let Some(tail) = shape else {
            return Err(format!("no rows of input {:?} were held", info.name));
        };
        let mut full = vec![rows];
        full.extend(tail);
        arrays.insert(
            info.name.clone(),
            Array {
                shape: full,
                values,
            },
        );
    }
    Ok(arrays)
}
