#!/usr/bin/env python3
"""Writes always_zero.onnx beside this script: a "digits model" with the real one's inputs
and outputs (input f32 [N,64]; label i64 [N], probabilities f32 [N,10]) that answers 0 for
every image. The end-to-end tests deploy it as the broken version that [validate] must
refuse and an accuracy gate must roll back.

Deterministic. Requires: onnx. Run: python3 examples/digits/model/always_zero.py
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))

zeros = numpy_helper.from_array(np.zeros((64, 10), dtype=np.float32), "w")
bias = numpy_helper.from_array(
    np.array([1.0] + [0.0] * 9, dtype=np.float32), "b"
)
nodes = [
    # probabilities = input @ 0 + [1, 0, ..., 0]: class 0 for every row.
    helper.make_node("MatMul", ["input", "w"], ["scores"]),
    helper.make_node("Add", ["scores", "b"], ["probabilities"]),
    helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
]
graph = helper.make_graph(
    nodes,
    "always_zero",
    [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
    [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
    ],
    initializer=[zeros, bias],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
path = os.path.join(HERE, "always_zero.onnx")
with open(path, "wb") as f:
    f.write(model.SerializeToString())
print(f"wrote {path}")
