//! Inference from a function: load a model the version was deployed with, build tensors from
//! typed slices, run, read typed outputs. The tensor work runs natively in the host through
//! `wasi:nn@0.2.0-rc-2024-10-28`; nothing here needs the model's bytes.
//!
//! ```ignore
//! use kiln_guest::nn::{Model, Tensor};
//! let model = Model::load("digits")?;
//! let out = model.run(&[("input", Tensor::f32(&[1, 64], &pixels))])?;
//! let label = out.get("label")?.i64s()?[0];
//! ```

use std::fmt;

mod bindings {
    wit_bindgen::generate!({
        path: "../wit/wasi-nn.wit",
        world: "ml",
        generate_all,
    });
}

use bindings::wasi::nn::{errors, graph, tensor};

pub use errors::ErrorCode;
pub use tensor::TensorType;

/// A `wasi:nn` failure: the host's code and its explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for Error {
    /// `not-found: no model named "x" ...`: the WIT name of the code, then the host's message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::InvalidEncoding => "invalid-encoding",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RuntimeError => "runtime-error",
            ErrorCode::UnsupportedOperation => "unsupported-operation",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Security => "security",
            ErrorCode::Unknown => "unknown",
        };
        write!(f, "{code}: {}", self.message)
    }
}

impl std::error::Error for Error {}

impl From<errors::Error> for Error {
    fn from(e: errors::Error) -> Self {
        Error {
            code: e.code(),
            message: e.data(),
        }
    }
}

impl Error {
    fn guest(message: String) -> Self {
        Error {
            code: ErrorCode::InvalidArgument,
            message,
        }
    }
}

/// A model of this function version, loaded by name (shared with every other request).
pub struct Model {
    graph: graph::Graph,
}

impl Model {
    /// The model deployed under `name` (`[models.<name>]` in `kiln.toml`).
    pub fn load(name: &str) -> Result<Model, Error> {
        Ok(Model {
            graph: graph::load_by_name(name)?,
        })
    }

    /// Loads a model from bytes the function holds itself (only where the function's
    /// manifest enables `[nn] guest_load_max_mb`).
    pub fn from_onnx(bytes: &[u8]) -> Result<Model, Error> {
        Ok(Model {
            graph: graph::load(
                &[bytes.to_vec()],
                graph::GraphEncoding::Onnx,
                graph::ExecutionTarget::Cpu,
            )?,
        })
    }

    /// Runs the model on named inputs and returns every output.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Outputs, Error> {
        let ctx = self.graph.init_execution_context()?;
        let named = inputs
            .iter()
            .map(|(name, t)| {
                (
                    name.to_string(),
                    tensor::Tensor::new(&t.dims, t.ty, &t.data),
                )
            })
            .collect::<Vec<_>>();
        let outputs = ctx.compute(named)?;
        Ok(Outputs(
            outputs
                .into_iter()
                .map(|(name, t)| {
                    (
                        name,
                        Tensor {
                            dims: t.dimensions(),
                            ty: t.ty(),
                            data: t.data(),
                        },
                    )
                })
                .collect(),
        ))
    }
}

/// A tensor: dimensions, element type and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<u32>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

macro_rules! typed {
    ($make:ident, $read:ident, $t:ty, $ty:ident) => {
        /// A tensor of these values with dimensions `dims`.
        pub fn $make(dims: &[u32], values: &[$t]) -> Tensor {
            let mut data = Vec::with_capacity(values.len() * size_of::<$t>());
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            Tensor {
                dims: dims.to_vec(),
                ty: TensorType::$ty,
                data,
            }
        }

        /// The values, if the tensor holds this element type.
        pub fn $read(&self) -> Result<Vec<$t>, Error> {
            if self.ty != TensorType::$ty {
                return Err(Error::guest(format!(
                    "tensor holds {:?}, not {}",
                    self.ty,
                    stringify!($t)
                )));
            }
            Ok(self
                .data
                .chunks_exact(size_of::<$t>())
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect())
        }
    };
}

impl Tensor {
    typed!(f32, f32s, f32, Fp32);
    typed!(f64, f64s, f64, Fp64);
    typed!(i32, i32s, i32, I32);
    typed!(i64, i64s, i64, I64);
    typed!(u8, u8s, u8, U8);
}

/// The outputs of one run, by name.
#[derive(Debug, Clone)]
pub struct Outputs(Vec<(String, Tensor)>);

impl Outputs {
    /// Output `name`, or an error naming the outputs there are.
    pub fn get(&self, name: &str) -> Result<&Tensor, Error> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                let names: Vec<_> = self.0.iter().map(|(n, _)| n.as_str()).collect();
                Error::guest(format!(
                    "no output named {name:?} (outputs: {})",
                    names.join(", ")
                ))
            })
    }

    /// All outputs in the model's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }
}
