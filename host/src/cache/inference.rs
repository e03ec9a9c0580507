//! The inference cache: outputs of `wasi:nn` computes, keyed by the graph's identity (model
//! digest, backend, target), the calling version and every input's name, type, shape and
//! bytes. A hit hands the stored outputs back without calling the backend.

use std::sync::Arc;

use super::{ByteCache, Key, KeyHasher, Placement};
use crate::common::Digest;
use crate::nn::{BackendKind, Target, Tensor, TensorInfo};

/// Outputs of one compute, by the graph's output order.
pub type InferenceCache = ByteCache<Arc<Vec<Tensor>>>;

/// A version's view of the inference cache: the cache and where its entries go.
#[derive(Clone)]
pub struct InferenceScope {
    pub cache: Arc<InferenceCache>,
    pub at: Placement,
}

/// Bytes a set of tensors costs the budget.
pub fn size(tensors: &[Tensor]) -> u64 {
    tensors
        .iter()
        .map(|t| (t.data.len() + t.dims.len() * 4 + 48) as u64)
        .sum()
}

/// The key of one compute: `inputs` are in the graph's input order (`infos`).
pub fn key(
    scope: u64,
    graph: (Digest, BackendKind, Target),
    infos: &[TensorInfo],
    inputs: &[Tensor],
) -> Key {
    let mut h = KeyHasher::new(b"kiln.inference.v1", scope);
    h.field(&graph.0.0)
        .field(graph.1.as_str().as_bytes())
        .field(graph.2.to_string().as_bytes());
    for (info, t) in infos.iter().zip(inputs) {
        let dims: Vec<u8> = t.dims.iter().flat_map(|d| d.to_le_bytes()).collect();
        h.field(info.name.as_bytes())
            .field(t.ty.to_string().as_bytes())
            .field(&dims)
            .field(&t.data);
    }
    h.finish()
}
