//! The tract backend: pure-Rust ONNX inference on the CPU, built in and needing nothing
//! installed. Free input dimensions (skl2onnx leaves the batch axis unset) become symbols so
//! the optimized plan accepts any size there; each run gets its own state, so one loaded
//! plan serves concurrent requests without a lock.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, InferenceFact};

use super::backend::{Backend, BackendGraph, Cancel, TensorInfo, from_le, to_le, wasi_dims};
use super::{BackendKind, Device, ElementType, ErrorCode, NnError, Tensor};

/// The tract engine (stateless: all state lives in each loaded graph).
#[derive(Debug, Default)]
pub struct TractBackend;

struct TractGraph {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    memory: u64,
}

impl Backend for TractBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tract
    }

    fn gpu_unavailable(&self) -> Option<String> {
        Some("the tract backend runs on the CPU only".into())
    }

    fn load(&self, model: &[u8], device: Device) -> Result<Box<dyn BackendGraph>, NnError> {
        if device == Device::Gpu {
            return Err(NnError::new(
                ErrorCode::UnsupportedOperation,
                "the tract backend runs on the CPU only",
            ));
        }
        let invalid = |e: TractError| {
            NnError::new(
                ErrorCode::InvalidEncoding,
                format!("tract cannot load this ONNX model: {e:#}"),
            )
        };
        let mut inference = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(model))
            .map_err(invalid)?;
        // Give free dimensions a symbol (one shared batch symbol for axis 0).
        let batch = inference.symbols.sym("batch");
        for ix in 0..inference.inputs.len() {
            let fact = inference.input_fact(ix).map_err(invalid)?.clone();
            let Some(dt) = fact.datum_type.concretize() else {
                continue;
            };
            let mut dims = Vec::new();
            let mut free = false;
            for (axis, d) in fact.shape.dims().enumerate() {
                match d {
                    GenericFactoid::Only(d) => dims.push(d.clone()),
                    GenericFactoid::Any => {
                        free = true;
                        dims.push(if axis == 0 {
                            batch.clone().into()
                        } else {
                            inference.symbols.new_with_prefix("d").into()
                        });
                    }
                }
            }
            if free {
                inference
                    .set_input_fact(ix, InferenceFact::dt_shape(dt, dims))
                    .map_err(invalid)?;
            }
        }
        // The ONNX names, before optimization renames nodes.
        let names = |outlets: &[OutletId]| -> Vec<String> {
            outlets
                .iter()
                .map(|o| {
                    inference
                        .outlet_label(*o)
                        .unwrap_or(&inference.node(o.node).name)
                        .to_string()
                })
                .collect()
        };
        let input_names = names(inference.input_outlets().map_err(invalid)?);
        let output_names = names(inference.output_outlets().map_err(invalid)?);
        let typed = inference.into_optimized().map_err(invalid)?;
        let infos = |outlets: &[OutletId], names: Vec<String>| -> Vec<TensorInfo> {
            outlets
                .iter()
                .zip(names)
                .map(|(o, name)| {
                    let (ty, dims) = match typed.outlet_fact(*o) {
                        Ok(f) => (
                            element_type(f.datum_type),
                            f.shape
                                .iter()
                                .map(|d| d.as_i64().and_then(|v| u64::try_from(v).ok()))
                                .collect(),
                        ),
                        Err(_) => (None, Vec::new()),
                    };
                    TensorInfo { name, ty, dims }
                })
                .collect()
        };
        let inputs = infos(typed.input_outlets().map_err(invalid)?, input_names);
        let outputs = infos(typed.output_outlets().map_err(invalid)?, output_names);
        let plan = typed.into_runnable().map_err(invalid)?;
        Ok(Box::new(TractGraph {
            plan,
            inputs,
            outputs,
            // Weights are repacked for the kernels: count the model twice.
            memory: model.len() as u64 * 2,
        }))
    }
}

impl BackendGraph for TractGraph {
    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>, _cancel: &Cancel) -> Result<Vec<Tensor>, NnError> {
        let values = inputs
            .into_iter()
            .map(|t| to_tract(&t).map(TValue::from))
            .collect::<Result<TVec<_>, _>>()?;
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| NnError::runtime("tract inference failed", e))?;
        outputs.iter().map(from_tract).collect()
    }

    fn memory_bytes(&self) -> u64 {
        self.memory
    }
}

fn element_type(dt: DatumType) -> Option<ElementType> {
    Some(match dt {
        DatumType::F16 => ElementType::F16,
        DatumType::F32 => ElementType::F32,
        DatumType::F64 => ElementType::F64,
        DatumType::U8 => ElementType::U8,
        DatumType::I32 => ElementType::I32,
        // Index outputs (argmax, shapes) come out as TDim and are returned as i64.
        DatumType::I64 | DatumType::TDim => ElementType::I64,
        _ => return None,
    })
}

fn decode<T: Datum + Copy, const N: usize>(
    t: &Tensor,
    shape: &[usize],
    f: fn([u8; N]) -> T,
) -> TractResult<tract_onnx::prelude::Tensor> {
    tract_onnx::prelude::Tensor::from_shape(shape, &from_le(&t.data, f))
}

fn to_tract(t: &Tensor) -> Result<tract_onnx::prelude::Tensor, NnError> {
    let shape: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
    let made = match t.ty {
        ElementType::F32 => decode(t, &shape, f32::from_le_bytes),
        ElementType::F64 => decode(t, &shape, f64::from_le_bytes),
        ElementType::I32 => decode(t, &shape, i32::from_le_bytes),
        ElementType::I64 => decode(t, &shape, i64::from_le_bytes),
        ElementType::U8 => tract_onnx::prelude::Tensor::from_shape(&shape, &t.data),
        other => {
            return Err(NnError::new(
                ErrorCode::UnsupportedOperation,
                format!("the tract backend does not take {other} tensors"),
            ));
        }
    };
    made.map_err(|e| NnError::invalid(format!("tensor does not match its dimensions: {e:#}")))
}

fn from_tract(v: &TValue) -> Result<Tensor, NnError> {
    let dims = wasi_dims(v.shape().iter().copied())?;
    let unsupported = |dt: DatumType| {
        NnError::new(
            ErrorCode::UnsupportedOperation,
            format!("the model produced a {dt:?} tensor, which wasi-nn cannot carry"),
        )
    };
    let dt = v.datum_type();
    let ty = element_type(dt).ok_or_else(|| unsupported(dt))?;
    let data = match dt {
        DatumType::TDim => {
            let cast = v
                .cast_to::<i64>()
                .map_err(|e| NnError::runtime("casting an index output to i64", e))?;
            to_le(slice::<i64>(&cast)?, i64::to_le_bytes)
        }
        DatumType::F32 => to_le(slice::<f32>(v)?, f32::to_le_bytes),
        DatumType::F64 => to_le(slice::<f64>(v)?, f64::to_le_bytes),
        DatumType::I32 => to_le(slice::<i32>(v)?, i32::to_le_bytes),
        DatumType::I64 => to_le(slice::<i64>(v)?, i64::to_le_bytes),
        DatumType::U8 => slice::<u8>(v)?.to_vec(),
        other => return Err(unsupported(other)),
    };
    Ok(Tensor { dims, ty, data })
}

fn slice<T: Datum>(v: &tract_onnx::prelude::Tensor) -> Result<&[T], NnError> {
    v.try_as_plain_ram()
        .and_then(|p| p.as_slice::<T>())
        .map_err(|e| NnError::runtime("reading a tract output", e))
}
