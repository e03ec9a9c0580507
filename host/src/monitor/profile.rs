//! A model's reference profile: for each monitored input, its features and their bin edges
//! (from the reference's quantiles) with the reference's counts per bin, and the shares of
//! the classes the model predicts on the reference. Live traffic is binned with the same
//! edges, so a window's counts and the reference's compare bin for bin.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::npy::Array;
use crate::nn::{ElementType, Tensor, TensorInfo};

/// Bins per feature (at most; equal quantiles of discrete data merge).
pub const BINS: usize = 10;
/// Most distinct classes a prediction profile tells apart; the rest count as `other`.
pub const MAX_CLASSES: usize = 1000;
/// The class key that collects everything beyond [`MAX_CLASSES`].
pub const OTHER_CLASS: i64 = i64::MIN;

/// How an input's rows become features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureMode {
    /// One feature per value of a row (rows of at most `max_features` values).
    Elements,
    /// Four features per row: its mean, standard deviation, minimum and maximum.
    Rows,
}

/// The names of the per-row features, by index.
pub const ROW_FEATURES: [&str; 4] = ["mean", "std", "min", "max"];

/// One feature: its bin edges and the reference's count per bin. Bin 0 holds values below
/// the reference's minimum (`lower`); bin `i + 1` holds `edges[i-1] < v <= edges[i]`; the
/// last, values above the last edge. So a shift below the reference's range shows as much
/// as one above it, even for a feature the reference held constant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    /// The reference's minimum; `null` in JSON when the reference held no finite value.
    #[serde(with = "lower_bound")]
    pub lower: f64,
    pub edges: Vec<f64>,
    pub reference: Vec<u64>,
    /// Where its first bin sits in a bucket's flat counts.
    pub start: usize,
}

impl Feature {
    /// The bin of `v` (NaN counts in the last bin).
    pub fn bin(&self, v: f64) -> usize {
        if v.is_nan() {
            return self.edges.len() + 1;
        }
        if v < self.lower {
            return 0;
        }
        1 + self.edges.partition_point(|&e| e < v)
    }
}

/// One monitored input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputProfile {
    pub name: String,
    /// Its position among the model's inputs.
    pub position: usize,
    /// Values per row.
    pub width: usize,
    pub mode: FeatureMode,
    pub features: Vec<Feature>,
    /// Where this input's first bin sits in a bucket's flat counts.
    pub offset: usize,
}

/// How a model's prediction is read from its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictionKind {
    /// An integer output with one value per row: the class label.
    Label,
    /// A float output of `[rows, classes]`: the class is the row's argmax.
    Argmax,
}

/// Which output holds the prediction.
#[derive(Debug, Clone, Serialize)]
pub struct PredictionSource {
    pub output: String,
    #[serde(skip)]
    pub position: usize,
    pub kind: PredictionKind,
}

/// A model's reference profile. Stored as JSON when it comes from a version's first rows
/// (every node adopts the same bins); the prediction source is found again from the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub inputs: Vec<InputProfile>,
    /// Rows in the reference.
    pub rows: u64,
    /// Bins over all features of all inputs.
    pub total_bins: usize,
    #[serde(skip)]
    pub prediction: Option<PredictionSource>,
    /// Class counts the model predicted on the reference (empty without a prediction).
    pub reference_classes: BTreeMap<i64, u64>,
}

/// The first output that carries a class: an integer output with one value per row, else
/// a float output of `[rows, classes]` with 2 to [`MAX_CLASSES`] classes.
pub fn prediction_source(outputs: &[TensorInfo]) -> Option<PredictionSource> {
    let int = |t: Option<ElementType>| {
        matches!(
            t,
            Some(ElementType::I64 | ElementType::I32 | ElementType::U8)
        )
    };
    let float = |t: Option<ElementType>| {
        matches!(
            t,
            Some(ElementType::F32 | ElementType::F64 | ElementType::F16 | ElementType::Bf16)
        )
    };
    let label = outputs.iter().position(|o| {
        int(o.ty) && (o.dims.len() == 1 || (o.dims.len() == 2 && o.dims[1] == Some(1)))
    });
    let argmax = || {
        outputs.iter().position(|o| {
            float(o.ty)
                && o.dims.len() == 2
                && o.dims[1].is_some_and(|c| (2..=MAX_CLASSES as u64).contains(&c))
        })
    };
    let (position, kind) = match label {
        Some(p) => (p, PredictionKind::Label),
        None => (argmax()?, PredictionKind::Argmax),
    };
    Some(PredictionSource {
        output: outputs[position].name.clone(),
        position,
        kind,
    })
}

impl PredictionSource {
    /// Calls `f` once with the first row's class, if the outputs have a row.
    pub fn first_class(&self, outputs: &[Tensor], f: impl FnOnce(i64)) {
        let Some(t) = outputs.get(self.position) else {
            return;
        };
        let classes = t.dims.get(1).copied().unwrap_or(0) as usize;
        let row = match self.kind {
            PredictionKind::Label => 1,
            PredictionKind::Argmax => classes,
        };
        let first = t.data.get(..row * t.ty.size()).unwrap_or_default();
        let mut f = Some(f);
        self.classes_in(t.ty, first, classes, |c| {
            if let Some(f) = f.take() {
                f(c)
            }
        });
    }

    /// Calls `f` with each row's class from the model's `outputs`.
    pub fn classes(&self, outputs: &[Tensor], f: impl FnMut(i64)) {
        if let Some(t) = outputs.get(self.position) {
            let classes = t.dims.get(1).copied().unwrap_or(0) as usize;
            self.classes_in(t.ty, &t.data, classes, f);
        }
    }

    /// Calls `f` with each row's class in `data` (values of `ty`, rows of `classes` scores
    /// for an argmax output), the prediction output's bytes.
    fn classes_in(&self, ty: ElementType, data: &[u8], classes: usize, mut f: impl FnMut(i64)) {
        match self.kind {
            PredictionKind::Label => for_each_value(ty, data, |_, v| f(v as i64)),
            PredictionKind::Argmax => {
                if classes == 0 {
                    return;
                }
                let mut best = (0usize, f64::NEG_INFINITY);
                for_each_value(ty, data, |i, v| {
                    let c = i % classes;
                    if c == 0 || v > best.1 {
                        best = (c, v);
                    }
                    if c == classes - 1 {
                        f(best.0 as i64);
                    }
                });
            }
        }
    }
}

/// Calls `f(index, value)` for every element of `data` (little-endian values of `ty`),
/// as `f64`.
pub fn for_each_value(ty: ElementType, data: &[u8], mut f: impl FnMut(usize, f64)) {
    macro_rules! each {
        ($n:expr, $conv:expr) => {
            for (i, b) in data.chunks_exact($n).enumerate() {
                f(i, $conv(b));
            }
        };
    }
    match ty {
        ElementType::F32 => each!(4, |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            as f64),
        ElementType::F64 => each!(8, |b: &[u8]| f64::from_le_bytes(
            b.try_into().unwrap_or_default()
        )),
        ElementType::I32 => each!(4, |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]])
            as f64),
        ElementType::I64 => each!(
            8,
            |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        ),
        ElementType::U8 => each!(1, |b: &[u8]| b[0] as f64),
        ElementType::Bf16 => each!(2, |b: &[u8]| f32::from_bits(
            (u16::from_le_bytes([b[0], b[1]]) as u32) << 16
        ) as f64),
        ElementType::F16 => each!(2, |b: &[u8]| f16_to_f64(u16::from_le_bytes([b[0], b[1]]))),
    }
}

/// IEEE half precision to `f64`.
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Rows of `t` (its leading axis) and values per row. A vector is rows of one value when
/// the reference's rows are (`width` 1: a `(n,)` reference), else one row.
pub fn rows_of(t: &Tensor, width: usize) -> (usize, usize) {
    match t.dims.split_first() {
        Some((&rows, rest)) if !rest.is_empty() => {
            (rows as usize, rest.iter().map(|&d| d as usize).product())
        }
        Some((&n, _)) if width == 1 => (n as usize, 1),
        _ => (1, t.dims.first().map_or(1, |&d| d as usize)),
    }
}

/// Calls `f(feature, value)` for each feature of one row of `width` values.
pub fn row_features(mode: FeatureMode, row: &[f64], mut f: impl FnMut(usize, f64)) {
    match mode {
        FeatureMode::Elements => {
            for (i, &v) in row.iter().enumerate() {
                f(i, v);
            }
        }
        FeatureMode::Rows => {
            let n = row.len().max(1) as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let min = row.iter().copied().fold(f64::INFINITY, f64::min);
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for (i, v) in [mean, var.sqrt(), min, max].into_iter().enumerate() {
                f(i, v);
            }
        }
    }
}

/// Bin edges at the deciles of `values` (sorted in place), equal ones merged.
fn edges(values: &mut [f64]) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let mut edges: Vec<f64> = Vec::with_capacity(BINS - 1);
    if finite.is_empty() {
        return edges;
    }
    for k in 1..BINS {
        let at = (k * (finite.len() - 1)) / BINS;
        let e = finite[at];
        if edges.last() != Some(&e) {
            edges.push(e);
        }
    }
    edges
}

impl Profile {
    /// Whether its inputs are positions and widths `inputs` has, and its bins add up (a
    /// stored profile is checked before it is used).
    pub fn fits(&self, inputs: &[TensorInfo]) -> bool {
        let mut at = 0;
        for p in &self.inputs {
            let declared = inputs.get(p.position).map(|i| {
                i.dims
                    .get(1..)
                    .unwrap_or_default()
                    .iter()
                    .try_fold(1u64, |a, d| d.map(|d| a * d))
            });
            match declared {
                None => return false,
                Some(Some(w)) if w as usize != p.width => return false,
                Some(_) => {}
            }
            let features = match p.mode {
                FeatureMode::Elements => p.width,
                FeatureMode::Rows => ROW_FEATURES.len(),
            };
            if p.offset != at
                || p.width == 0
                || p.features.len() != features
                || features > super::MAX_FEATURES as usize
            {
                return false;
            }
            for f in &p.features {
                if f.start != at || f.edges.len() >= BINS || f.reference.len() != f.edges.len() + 2
                {
                    return false;
                }
                at += f.reference.len();
            }
        }
        at == self.total_bins
    }

    /// Whether counts binned with `other` line up with counts binned with this one.
    pub fn same_bins(&self, other: &Profile) -> bool {
        self.total_bins == other.total_bins
            && self.inputs.len() == other.inputs.len()
            && self.inputs.iter().zip(&other.inputs).all(|(a, b)| {
                a.position == b.position
                    && a.width == b.width
                    && a.mode == b.mode
                    && a.features.len() == b.features.len()
                    && a.features
                        .iter()
                        .zip(&b.features)
                        .all(|(f, g)| f.lower.to_bits() == g.lower.to_bits() && f.edges == g.edges)
            })
    }

    /// Builds a profile from reference `arrays` (by input name; an unnamed array stands for
    /// the model's first input) for a model with `inputs` and `outputs`.
    pub fn build(
        arrays: &BTreeMap<String, Array>,
        inputs: &[TensorInfo],
        outputs: &[TensorInfo],
        max_features: usize,
    ) -> Result<Profile, String> {
        let mut profiles = Vec::new();
        let mut offset = 0;
        let mut rows_seen: Option<usize> = None;
        for (key, array) in arrays {
            let position = if key.is_empty() {
                0
            } else {
                inputs.iter().position(|i| i.name == *key).ok_or_else(|| {
                    format!(
                        "the reference has an array {key:?}, but the model has no input of that name (inputs: {})",
                        inputs.iter().map(|i| format!("{:?}", i.name)).collect::<Vec<_>>().join(", ")
                    )
                })?
            };
            let info = inputs
                .get(position)
                .ok_or("the model has no inputs to compare a reference with")?;
            let (rows, width) = array.rows();
            if rows == 0 || width == 0 {
                return Err(format!("the reference for input {:?} is empty", info.name));
            }
            if let Some(prev) = rows_seen
                && prev != rows
            {
                return Err(format!(
                    "the reference's arrays have different numbers of rows ({prev} and {rows})"
                ));
            }
            rows_seen = Some(rows);
            let declared: Option<u64> = info
                .dims
                .get(1..)
                .filter(|d| !d.is_empty())
                .and_then(|d| d.iter().try_fold(1u64, |a, d| d.map(|d| a * d)));
            if let Some(w) = declared
                && w as usize != width
            {
                return Err(format!(
                    "the reference's rows for input {:?} have {width} values; the model takes {w}",
                    info.name
                ));
            }
            let mode = if width <= max_features {
                FeatureMode::Elements
            } else {
                FeatureMode::Rows
            };
            let count = match mode {
                FeatureMode::Elements => width,
                FeatureMode::Rows => ROW_FEATURES.len(),
            };
            let mut columns = vec![Vec::with_capacity(rows); count];
            for row in array.values.chunks_exact(width) {
                row_features(mode, row, |i, v| columns[i].push(v));
            }
            let mut features = Vec::with_capacity(count);
            let start = offset;
            for column in &mut columns {
                let edges = edges(column);
                let lower = column
                    .iter()
                    .copied()
                    .filter(|v| v.is_finite())
                    .fold(f64::INFINITY, f64::min);
                let mut feature = Feature {
                    lower: if lower.is_finite() {
                        lower
                    } else {
                        f64::NEG_INFINITY
                    },
                    edges,
                    reference: Vec::new(),
                    start: offset,
                };
                feature.reference = vec![0; feature.edges.len() + 2];
                for &v in column.iter() {
                    let bin = feature.bin(v);
                    feature.reference[bin] += 1;
                }
                offset += feature.reference.len();
                features.push(feature);
            }
            profiles.push(InputProfile {
                name: info.name.clone(),
                position,
                width,
                mode,
                features,
                offset: start,
            });
        }
        profiles.sort_by_key(|p| p.position);
        Ok(Profile {
            inputs: profiles,
            rows: rows_seen.unwrap_or(0) as u64,
            total_bins: offset,
            prediction: prediction_source(outputs),
            reference_classes: BTreeMap::new(),
        })
    }

    /// The reference rows as model inputs (in the model's types), `chunk` rows at a time,
    /// for the reference predictions; `None` when the reference lacks one of the inputs.
    pub fn reference_batches(
        arrays: &BTreeMap<String, Array>,
        inputs: &[TensorInfo],
        chunk: usize,
    ) -> Option<Vec<Vec<Tensor>>> {
        let mut per_input = Vec::with_capacity(inputs.len());
        for (i, info) in inputs.iter().enumerate() {
            let array = arrays.get(&info.name).or_else(|| {
                (i == 0 && arrays.len() == 1)
                    .then(|| arrays.get(""))
                    .flatten()
            })?;
            per_input.push((info, array));
        }
        let rows = per_input.first()?.1.rows().0;
        let mut batches = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = chunk.min(rows - start);
            let mut tensors = Vec::with_capacity(per_input.len());
            for (info, array) in &per_input {
                let width = array.rows().1;
                let values = &array.values[start * width..(start + n) * width];
                let mut dims = vec![n as u32];
                dims.extend(array.shape.iter().skip(1).map(|&d| d as u32));
                tensors.push(encode(info.ty?, dims, values)?);
            }
            batches.push(tensors);
            start += n;
        }
        Some(batches)
    }
}

/// `values` as a tensor of `ty` (`None` for half-precision types, which a reference
/// cannot feed).
fn encode(ty: ElementType, dims: Vec<u32>, values: &[f64]) -> Option<Tensor> {
    let mut data = Vec::with_capacity(values.len() * ty.size());
    for &v in values {
        match ty {
            ElementType::F32 => data.extend((v as f32).to_le_bytes()),
            ElementType::F64 => data.extend(v.to_le_bytes()),
            ElementType::I32 => data.extend((v as i32).to_le_bytes()),
            ElementType::I64 => data.extend((v as i64).to_le_bytes()),
            ElementType::U8 => data.push(v as u8),
            ElementType::F16 | ElementType::Bf16 => return None,
        }
    }
    Some(Tensor { dims, ty, data })
}

/// A feature's lower bound in JSON: a number, or `null` for minus infinity (JSON has no
/// infinities).
mod lower_bound {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, ty: ElementType, dims: &[Option<u64>]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            ty: Some(ty),
            dims: dims.to_vec(),
        }
    }

    #[test]
    fn edges_are_deciles_with_equal_ones_merged() {
        let mut v: Vec<f64> = (0..100).map(f64::from).collect();
        let e = edges(&mut v);
        assert_eq!(e.len(), 9);
        assert_eq!(e[0], 9.0);
        let mut zeros = vec![0.0; 50];
        assert_eq!(edges(&mut zeros), [0.0]);
        let f = Feature {
            lower: 0.0,
            edges: vec![0.0, 3.0],
            reference: vec![0; 4],
            start: 0,
        };
        assert_eq!(
            (f.bin(-1.0), f.bin(0.0), f.bin(2.0), f.bin(3.0), f.bin(9.0)),
            (0, 1, 2, 2, 3)
        );
    }

    #[test]
    fn profile_checks_the_reference_against_the_model() {
        let array = Array {
            shape: vec![3, 2],
            values: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        };
        let arrays = BTreeMap::from([(String::new(), array)]);
        let inputs = [info("x", ElementType::F32, &[None, Some(2)])];
        let outputs = [
            info("probs", ElementType::F32, &[None, Some(3)]),
            info("label", ElementType::I64, &[None]),
        ];
        let p = Profile::build(&arrays, &inputs, &outputs, 64).expect("profile");
        assert_eq!(p.rows, 3);
        assert_eq!(p.inputs[0].mode, FeatureMode::Elements);
        assert_eq!(p.inputs[0].features.len(), 2);
        let pred = p.prediction.expect("prediction");
        assert_eq!(
            (pred.output.as_str(), pred.kind),
            ("label", PredictionKind::Label)
        );
        let wide = Profile::build(&arrays, &inputs, &outputs, 1).expect("rows mode");
        assert_eq!(wide.inputs[0].mode, FeatureMode::Rows);
        assert_eq!(wide.inputs[0].features.len(), 4);
        let narrow = [info("x", ElementType::F32, &[None, Some(3)])];
        let err = Profile::build(&arrays, &narrow, &outputs, 64).expect_err("width");
        assert!(err.contains("have 2 values; the model takes 3"), "{err}");
        let named = BTreeMap::from([("y".to_string(), arrays[""].clone())]);
        let err = Profile::build(&named, &inputs, &outputs, 64).expect_err("name");
        assert!(err.contains("\"y\""), "{err}");
        let batches = Profile::reference_batches(&arrays, &inputs, 2).expect("batches");
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0][0].dims, [2, 2]);
        assert_eq!(batches[1][0].dims, [1, 2]);
    }

    #[test]
    fn predictions_read_labels_or_the_argmax() {
        let probs = [info("p", ElementType::F32, &[None, Some(3)])];
        let src = prediction_source(&probs).expect("argmax");
        let t = Tensor {
            dims: vec![2, 3],
            ty: ElementType::F32,
            data: [0.1f32, 0.7, 0.2, 0.5, 0.1, 0.4]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        let mut got = Vec::new();
        src.classes(std::slice::from_ref(&t), |c| got.push(c));
        assert_eq!(got, [1, 0]);
        // The first row's class, with the scores as the second output.
        let two = [
            info("e", ElementType::F32, &[None, Some(4)]),
            probs[0].clone(),
        ];
        let src = prediction_source(&two[1..]).expect("argmax");
        let at_1 = PredictionSource { position: 1, ..src };
        let mut first = None;
        at_1.first_class(&[t.clone(), t], |c| first = Some(c));
        assert_eq!(first, Some(1));
        assert!(prediction_source(&[info("e", ElementType::F32, &[None, Some(384)])]).is_some());
        assert!(
            prediction_source(&[info("e", ElementType::F32, &[None, None, Some(3)])]).is_none()
        );
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
    }
}
