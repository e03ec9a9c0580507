#!/usr/bin/env python3
"""Trains the digits classifier used by examples/digits and writes, beside this script:

- digits.onnx: an MLP trained on scikit-learn's bundled handwritten digits (8x8 images,
  pixel values 0-16), exported with skl2onnx (zipmap off: outputs `label` i64 [N] and
  `probabilities` f32 [N,10]; input `input` f32 [N,64]).
- heldout.json: the held-out split (inputs and true labels) with onnxruntime's predictions
  on it: the reference the end-to-end tests compare Kiln's answers with.
- reference.npy: the training split's images (uint8 [1347, 64]): the drift monitor's
  reference (`[models.digits.monitor]` in kiln.toml).

Deterministic (fixed seeds). Requires: scikit-learn skl2onnx onnx onnxruntime.
Run: python3 examples/digits/model/train.py
"""
import json
import os

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))

digits = load_digits()
X = digits.data.astype(np.float32)
y = digits.target.astype(np.int64)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.25, random_state=0, stratify=y
)

# The drift monitor's reference: what the model was trained on.
np.save(os.path.join(HERE, "reference.npy"), X_train.astype(np.uint8))

clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0)
clf.fit(X_train / 16.0, y_train)

# The model takes raw 0-16 pixels: scale inside the graph by folding 1/16 into the first layer.
clf.coefs_[0] = clf.coefs_[0] / 16.0
onx = to_onnx(
    clf,
    X_train[:1],
    options={id(clf): {"zipmap": False}},
    target_opset=17,
    final_types=None,
)
onx.graph.input[0].name = "input"
for node in onx.graph.node:
    node.input[:] = ["input" if i == "X" else i for i in node.input]
path = os.path.join(HERE, "digits.onnx")
with open(path, "wb") as f:
    f.write(onx.SerializeToString())

sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
labels, probs = sess.run(None, {"input": X_test})
accuracy = float((labels == y_test).mean())
sk_agree = float((clf.predict(X_test) == labels).mean())
with open(os.path.join(HERE, "heldout.json"), "w") as f:
    json.dump(
        {
            "accuracy": accuracy,
            "inputs": X_test.astype(int).tolist(),
            "labels": y_test.tolist(),
            "predicted": labels.tolist(),
            "probabilities": np.round(probs.astype(np.float64), 7).tolist(),
        },
        f,
    )
print(f"held-out accuracy {accuracy:.4f} on {len(y_test)} images "
      f"(onnxruntime agrees with scikit-learn on {sk_agree:.4f}); wrote {path}")
