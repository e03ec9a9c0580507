#!/usr/bin/env bash
# Fetches the PP-OCRv4 text-recognition model (10.9 MB) from the `rapidocr-onnxruntime` wheel on
# PyPI into examples/ocr/model/rec.onnx (not committed), and checks its digest.
# Needs python3 with pip. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
version=1.4.4
sha=48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b
if [[ -f rec.onnx ]] && echo "$sha  rec.onnx" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps "rapidocr-onnxruntime==$version" -d "$tmp" >&2
python3 - "$tmp"/rapidocr_onnxruntime-"$version"-*.whl <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
open("rec.onnx.tmp", "wb").write(data)
PY
echo "$sha  rec.onnx.tmp" | sha256sum -c --quiet
mv rec.onnx.tmp rec.onnx
