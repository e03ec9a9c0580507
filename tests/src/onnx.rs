//! Small ONNX models made in the test, as `onnx.helper` makes them in Python: a protobuf
//! encoder for the few messages a graph needs (model, graph, node, tensor, value info), so
//! tests can run models with a known shape of cost or a known failure on both backends
//! without committing binaries.

/// An ONNX element type.
#[derive(Debug, Clone, Copy)]
pub enum Elem {
    F32 = 1,
    I64 = 7,
}

/// A dimension: fixed, or named (free: the batch axis).
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Free(&'static str),
}

/// A graph input or output.
pub struct Value {
    pub name: &'static str,
    pub elem: Elem,
    pub dims: Vec<Dim>,
}

/// A constant tensor (f32, raw little-endian).
pub struct Initializer {
    pub name: &'static str,
    pub dims: Vec<i64>,
    pub values: Vec<f32>,
}

/// One operator.
pub struct Node {
    pub op: &'static str,
    pub inputs: Vec<&'static str>,
    pub outputs: Vec<&'static str>,
}

/// Encodes a model of opset 13 computing `nodes` from `inputs` and `initializers`.
pub fn model(
    inputs: &[Value],
    initializers: &[Initializer],
    nodes: &[Node],
    outputs: &[Value],
) -> Vec<u8> {
    let mut graph = Vec::new();
    for n in nodes {
        let mut node = Vec::new();
        for i in &n.inputs {
            string(&mut node, 1, i);
        }
        for o in &n.outputs {
            string(&mut node, 2, o);
        }
        string(&mut node, 4, n.op);
        message(&mut graph, 1, &node);
    }
    string(&mut graph, 2, "test");
    for init in initializers {
        let mut t = Vec::new();
        for d in &init.dims {
            varint_field(&mut t, 1, *d as u64);
        }
        varint_field(&mut t, 2, Elem::F32 as u64);
        string(&mut t, 8, init.name);
        let raw: Vec<u8> = init.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes(&mut t, 9, &raw);
        message(&mut graph, 5, &t);
    }
    for v in inputs {
        message(&mut graph, 11, &value_info(v));
    }
    for v in outputs {
        message(&mut graph, 12, &value_info(v));
    }
    let mut model = Vec::new();
    varint_field(&mut model, 1, 8);
    string(&mut model, 2, "kiln-tests");
    message(&mut model, 7, &graph);
    let mut opset = Vec::new();
    string(&mut opset, 1, "");
    varint_field(&mut opset, 2, 13);
    message(&mut model, 8, &opset);
    model
}

fn value_info(v: &Value) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in &v.dims {
        let mut dim = Vec::new();
        match d {
            Dim::Fixed(n) => varint_field(&mut dim, 1, *n as u64),
            Dim::Free(name) => string(&mut dim, 2, name),
        }
        message(&mut shape, 1, &dim);
    }
    let mut tensor = Vec::new();
    varint_field(&mut tensor, 1, v.elem as u64);
    message(&mut tensor, 2, &shape);
    let mut ty = Vec::new();
    message(&mut ty, 1, &tensor);
    let mut info = Vec::new();
    string(&mut info, 1, v.name);
    message(&mut info, 2, &ty);
    info
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    varint(out, u64::from(field) << 3);
    varint(out, v);
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    varint(out, (u64::from(field) << 3) | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

fn message(out: &mut Vec<u8>, field: u32, m: &[u8]) {
    bytes(out, field, m);
}

/// `y[n] = table[idx[n]]` over a 4×2 table: an index out of range fails the run (on every
/// backend), so one bad row spoils any batch it joins.
pub fn gather() -> Vec<u8> {
    model(
        &[Value {
            name: "idx",
            elem: Elem::I64,
            dims: vec![Dim::Free("N"), Dim::Fixed(1)],
        }],
        &[Initializer {
            name: "table",
            dims: vec![4, 2],
            values: vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
        }],
        &[Node {
            op: "Gather",
            inputs: vec!["table", "idx"],
            outputs: vec!["y"],
        }],
        &[Value {
            name: "y",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), Dim::Fixed(1), Dim::Fixed(2)],
        }],
    )
}

/// `y = sigmoid(exp(x))` over rows of `width` values: all of its cost grows with the rows.
pub fn per_row(width: i64) -> Vec<u8> {
    per_row_of(Dim::Fixed(width))
}

/// [`per_row`] with rows of any width (a second free dimension, as a text line's width).
pub fn per_row_any_width() -> Vec<u8> {
    per_row_of(Dim::Free("W"))
}

fn per_row_of(width: Dim) -> Vec<u8> {
    model(
        &[Value {
            name: "x",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), width.clone()],
        }],
        &[],
        &[
            Node {
                op: "Exp",
                inputs: vec!["x"],
                outputs: vec!["e"],
            },
            Node {
                op: "Sigmoid",
                inputs: vec!["e"],
                outputs: vec!["y"],
            },
        ],
        &[Value {
            name: "y",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), width],
        }],
    )
}

/// `y = (x · W1) · W2` through a `hidden`-wide layer: much work per row for little input
/// and output.
pub fn two_layer(width: i64, hidden: i64) -> Vec<u8> {
    let weights = |rows: i64, cols: i64| -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i % 89) as f32 - 44.0) / 4400.0)
            .collect()
    };
    model(
        &[Value {
            name: "x",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), Dim::Fixed(width)],
        }],
        &[
            Initializer {
                name: "w1",
                dims: vec![width, hidden],
                values: weights(width, hidden),
            },
            Initializer {
                name: "w2",
                dims: vec![hidden, width],
                values: weights(hidden, width),
            },
        ],
        &[
            Node {
                op: "MatMul",
                inputs: vec!["x", "w1"],
                outputs: vec!["h"],
            },
            Node {
                op: "MatMul",
                inputs: vec!["h", "w2"],
                outputs: vec!["y"],
            },
        ],
        &[Value {
            name: "y",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), Dim::Fixed(width)],
        }],
    )
}

/// `y = x · W` with a `rows_in × cols` weight: one row reads the whole weight, more rows
/// share that read, so most of a run's cost is fixed.
pub fn matmul(rows_in: i64, cols: i64) -> Vec<u8> {
    let n = (rows_in * cols) as usize;
    let values: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 480.0).collect();
    model(
        &[Value {
            name: "x",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), Dim::Fixed(rows_in)],
        }],
        &[Initializer {
            name: "w",
            dims: vec![rows_in, cols],
            values,
        }],
        &[Node {
            op: "MatMul",
            inputs: vec!["x", "w"],
            outputs: vec!["y"],
        }],
        &[Value {
            name: "y",
            elem: Elem::F32,
            dims: vec![Dim::Free("N"), Dim::Fixed(cols)],
        }],
    )
}
