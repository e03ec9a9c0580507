//! The interface between Kiln and an inference engine, and the tensor checks every engine
//! relies on: a backend only ever sees inputs whose names, types, shapes and byte lengths
//! match what the model declares, so a malformed tensor is a guest error, never a host panic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::{BackendKind, Device, ElementType, NnError, Tensor};

/// One model input or output as the model declares it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// `None`: an element type `wasi:nn` cannot carry (string, bool...).
    #[serde(rename = "type")]
    pub ty: Option<ElementType>,
    /// `None` for a dimension the model leaves free (a batch axis, say).
    pub dims: Vec<Option<u64>>,
}

/// An inference engine that turns model bytes into runnable graphs.
pub trait Backend: Send + Sync {
    /// Which engine this is.
    fn kind(&self) -> BackendKind;
    /// Why this backend cannot run models on a GPU on this host; `None` when it can.
    fn gpu_unavailable(&self) -> Option<String>;
    /// Loads a model for `device`. Costly: called at deploy or first use, never per request.
    fn load(&self, model: &[u8], device: Device) -> Result<Box<dyn BackendGraph>, NnError>;
}

/// A loaded model, shared by every request of every version that uses it.
pub trait BackendGraph: Send + Sync {
    /// The model's inputs, in its order.
    fn inputs(&self) -> &[TensorInfo];
    /// The model's outputs, in its order.
    fn outputs(&self) -> &[TensorInfo];
    /// Runs the model on `inputs` (checked by [`check_inputs`], in input order) and returns
    /// one tensor per output, in output order. Runs on the calling thread; a backend that
    /// can stop a running inference registers that with `cancel`.
    fn run(&self, inputs: Vec<Tensor>, cancel: &Cancel) -> Result<Vec<Tensor>, NnError>;
    /// Approximate host memory the loaded graph holds, in bytes (for the model budget).
    fn memory_bytes(&self) -> u64;
    /// Runs that can make progress at once (ONNX Runtime: its sessions; the default: one
    /// per core). The batching queue keeps at most this many in flight and merges the rest.
    fn concurrency(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
    /// Whether a run computes on the thread that calls [`run`](Self::run) alone (tract;
    /// ONNX Runtime with one intra-op thread), so that thread's CPU time is the run's cost.
    fn computes_on_caller(&self) -> bool {
        true
    }
}

/// A cancellation signal for one inference: set when the request gave up (timeout, client
/// gone). Backends that can interrupt a run register a hook.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

type CancelHook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    hook: Mutex<Option<CancelHook>>,
}

impl Cancel {
    /// Signals cancellation and runs the registered hook, if any.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let hook = self.0.hook.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hook.as_ref() {
            h();
        }
    }

    /// True once [`cancel`](Self::cancel) ran.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Registers the action that stops a running inference (run at once if already cancelled).
    pub fn on_cancel(&self, hook: CancelHook) {
        let mut slot = self.0.hook.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_cancelled() {
            hook();
        }
        *slot = Some(hook);
    }
}

/// Matches guest tensors to the model's inputs and checks each one: known name, element
/// type, rank, fixed dimensions and byte length. Returns the tensors in the model's input
/// order. An empty name stands for the model's only input.
pub fn check_inputs(
    infos: &[TensorInfo],
    given: Vec<(String, Tensor)>,
) -> Result<Vec<Tensor>, NnError> {
    let mut slots: Vec<Option<Tensor>> = vec![None; infos.len()];
    let names = || {
        infos
            .iter()
            .map(|i| format!("{:?}", i.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, tensor) in given {
        let index = if name.is_empty() && infos.len() == 1 {
            0
        } else {
            infos.iter().position(|i| i.name == name).ok_or_else(|| {
                NnError::invalid(format!(
                    "the model has no input named {name:?} (inputs: {})",
                    names()
                ))
            })?
        };
        let info = &infos[index];
        check_tensor(info, &tensor)?;
        if slots[index].replace(tensor).is_some() {
            return Err(NnError::invalid(format!(
                "input {:?} was given twice",
                info.name
            )));
        }
    }
    let missing: Vec<_> = infos
        .iter()
        .zip(&slots)
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{:?}", i.name))
        .collect();
    if !missing.is_empty() {
        return Err(NnError::invalid(format!(
            "missing model input(s): {}",
            missing.join(", ")
        )));
    }
    Ok(slots.into_iter().flatten().collect())
}

fn check_tensor(info: &TensorInfo, t: &Tensor) -> Result<(), NnError> {
    let name = &info.name;
    match info.ty {
        Some(ty) if ty == t.ty => {}
        Some(ty) => {
            return Err(NnError::invalid(format!(
                "input {name:?} takes {ty} elements, got {}",
                t.ty
            )));
        }
        None => {
            return Err(NnError::new(
                super::ErrorCode::UnsupportedOperation,
                format!("input {name:?} has an element type wasi-nn cannot express"),
            ));
        }
    }
    if t.dims.len() != info.dims.len() {
        return Err(NnError::invalid(format!(
            "input {name:?} has rank {} ({}), got dimensions {:?}",
            info.dims.len(),
            shape_text(&info.dims),
            t.dims
        )));
    }
    for (axis, (want, got)) in info.dims.iter().zip(&t.dims).enumerate() {
        if let Some(w) = want
            && *w != u64::from(*got)
        {
            return Err(NnError::invalid(format!(
                "input {name:?} dimension {axis} must be {w} ({}), got dimensions {:?}",
                shape_text(&info.dims),
                t.dims
            )));
        }
    }
    let expected = t
        .dims
        .iter()
        .try_fold(t.ty.size() as u64, |acc, d| acc.checked_mul(u64::from(*d)));
    match expected {
        Some(n) if n == t.data.len() as u64 => Ok(()),
        Some(n) => Err(NnError::invalid(format!(
            "input {name:?}: dimensions {:?} of {} need {n} bytes, got {}",
            t.dims,
            t.ty,
            t.data.len()
        ))),
        None => Err(NnError::invalid(format!(
            "input {name:?}: dimensions {:?} overflow",
            t.dims
        ))),
    }
}

/// Decodes little-endian tensor bytes into values (`f32::from_le_bytes`...). Copies: the
/// guest's bytes carry no alignment guarantee.
pub fn from_le<T, const N: usize>(data: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            f(b)
        })
        .collect()
}

/// Encodes values as little-endian tensor bytes (`f32::to_le_bytes`...).
pub fn to_le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    // Fixed-size chunks of a zeroed buffer: the loop vectorizes (a push per element did not).
    let mut out = vec![0u8; values.len() * N];
    for (chunk, v) in out.chunks_exact_mut(N).zip(values) {
        chunk.copy_from_slice(&f(*v));
    }
    out
}

/// `[?, 64]`-style text for a declared shape.
pub fn shape_text(dims: &[Option<u64>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Converts a backend's dimension list to `wasi:nn` dims, failing on values that do not fit.
pub fn wasi_dims(dims: impl IntoIterator<Item = usize>) -> Result<Vec<u32>, NnError> {
    dims.into_iter()
        .map(|d| {
            u32::try_from(d).map_err(|_| {
                NnError::new(
                    super::ErrorCode::TooLarge,
                    format!("output dimension {d} does not fit wasi-nn's u32"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> Vec<TensorInfo> {
        vec![TensorInfo {
            name: "input".into(),
            ty: Some(ElementType::F32),
            dims: vec![None, Some(64)],
        }]
    }

    fn tensor(dims: Vec<u32>, ty: ElementType, bytes: usize) -> Tensor {
        Tensor {
            dims,
            ty,
            data: vec![0; bytes],
        }
    }

    fn err(given: Vec<(String, Tensor)>) -> String {
        match check_inputs(&info(), given) {
            Ok(_) => panic!("accepted"),
            Err(e) => {
                assert_eq!(e.code, super::super::ErrorCode::InvalidArgument, "{e}");
                e.message
            }
        }
    }

    #[test]
    fn well_formed_inputs_pass_in_model_order() {
        let ok = check_inputs(
            &info(),
            vec![(
                "input".into(),
                tensor(vec![3, 64], ElementType::F32, 3 * 64 * 4),
            )],
        );
        assert_eq!(ok.map(|v| v.len()), Ok(1));
        // An empty name means the only input.
        let ok = check_inputs(
            &info(),
            vec![(String::new(), tensor(vec![1, 64], ElementType::F32, 256))],
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn malformed_inputs_are_invalid_arguments_that_say_why() {
        let t = |d, ty, b| tensor(d, ty, b);
        assert!(
            err(vec![("x".into(), t(vec![1, 64], ElementType::F32, 256))])
                .contains("no input named \"x\"")
        );
        assert!(
            err(vec![(
                "input".into(),
                t(vec![1, 64], ElementType::I64, 512)
            )])
            .contains("takes f32 elements, got i64")
        );
        assert!(err(vec![("input".into(), t(vec![64], ElementType::F32, 256))]).contains("rank 2"));
        assert!(
            err(vec![(
                "input".into(),
                t(vec![1, 63], ElementType::F32, 252)
            )])
            .contains("dimension 1 must be 64")
        );
        assert!(
            err(vec![(
                "input".into(),
                t(vec![2, 64], ElementType::F32, 256)
            )])
            .contains("need 512 bytes, got 256")
        );
        assert!(
            err(vec![(
                "input".into(),
                t(vec![u32::MAX, 64], ElementType::F32, 0)
            )])
            .contains("need")
        );
        assert!(err(vec![]).contains("missing model input"));
    }
}
