#!/usr/bin/env python3
"""Inference bench: for each model and backend, side by side in one run,
  native     the backend called directly (benches/src/bin/nn-native.rs, no wasm, no HTTP)
  python     Python onnxruntime on the same input (onnxruntime rows; one thread, like Kiln's)
  wasi-nn    the same run from inside a guest (examples/nn-probe): tensor in, compute,
             every output read back, as the guest sees it
  http c=N   the real function (examples/digits, examples/ocr) over HTTP with wrk, at
             concurrency 1, 4, 16: requests/s and p50 latency
All inputs are all-zero f32 tensors of the model's real shape (the HTTP rows send real
requests). Server, native and Python runs are pinned to core 0, wrk to core 1.

Usage: python3 benches/nn_load.py [--duration 5] [--rounds 3]
Needs: wrk, the release build, the examples built, ONNX Runtime (scripts/onnxruntime),
the OCR model (examples/ocr/model/fetch.sh) and the onnxruntime + numpy Python packages.
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The admin key every Kiln server here adopts and every request carries (importing
# http_load sets KILN_ADMIN_KEY, KILN_API_KEY and urllib's header).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY  # noqa: E402

REL = os.path.join(ROOT, "target", "release")
WASM = os.path.join(ROOT, "examples", "target", "wasm32-wasip2", "release")
SERVER_CORE, LOAD_CORE = "0", "1"
PORT = 18181
BASE = f"http://127.0.0.1:{PORT}"

DIGITS = os.path.join(ROOT, "examples", "digits", "model", "digits.onnx")
OCR = os.path.join(ROOT, "examples", "ocr", "model", "rec.onnx")
# (label, model file, input name, dims, function example, request body, content type)
CASES = [
    ("digits", DIGITS, "input", [1, 64], "digits", None, "application/json"),
    ("ocr", OCR, "x", [1, 3, 48, 320], "ocr",
     os.path.join(ROOT, "examples", "ocr", "testdata", "Hello_World_2026.png"), "image/png"),
]


def http(method, path, body=None, headers=None):
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read()!r}")


def put_blob(path):
    import hashlib
    data = open(path, "rb").read()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    http("PUT", f"/v1/blobs/{digest}", data)
    return digest


def deploy(name, example, model_name, model_digest, backend):
    component = put_blob(os.path.join(WASM, f"{example}.wasm"))
    manifest = {"component": component, "limits": {"max_concurrency": 1000},
                "models": {model_name: {"digest": model_digest, "backend": backend}}}
    http("POST", f"/v1/functions/{name}/versions", json.dumps(manifest).encode(),
         {"content-type": "application/json"})


def native(model, backend, inp, dims, iters, ort):
    out = subprocess.run(["taskset", "-c", SERVER_CORE, os.path.join(REL, "nn-native"), model, backend,
                          inp, ",".join(map(str, dims)), str(iters)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, ORT_DYLIB_PATH=ort))
    return json.loads(out.stdout)["mean_us"]


def python_ort(model, inp, dims, iters):
    code = f"""
import time, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession({model!r}, o, providers=["CPUExecutionProvider"])
x = {{{inp!r}: np.zeros({dims!r}, dtype=np.float32)}}
s.run(None, x)
t = time.perf_counter()
for _ in range({iters}): s.run(None, x)
print((time.perf_counter() - t) * 1e6 / {iters})
"""
    out = subprocess.run(["taskset", "-c", SERVER_CORE, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def wrk(path, body_file, ctype, conc, duration):
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(f'wrk.method = "POST"\nwrk.headers["content-type"] = "{ctype}"\n'
                  f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-H", f"authorization: Bearer {BENCH_KEY}", "-t1", f"-c{conc}", f"-d{duration}s",
                          "--latency", "-s", lua.name, BASE + path],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(lua.name)
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{path}: error responses\n{out}")
    m = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    p50 = float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), p50


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ort = subprocess.run([os.path.join(ROOT, "scripts", "onnxruntime")], capture_output=True,
                         text=True, check=True).stdout.strip()
    data = tempfile.mkdtemp(prefix="kiln-nn-bench-")
    cfg = os.path.join(data, "kiln.toml")
    with open(cfg, "w") as f:
        f.write(f'[nn]\nonnxruntime_library = "{ort}"\n')
    server = subprocess.Popen(["taskset", "-c", SERVER_CORE, os.path.join(REL, "kiln"), "serve",
                               "--listen", f"127.0.0.1:{PORT}", "--data-dir", data, "--config", cfg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        for _ in range(100):
            try:
                http("GET", "/healthz")
                break
            except Exception:
                time.sleep(0.1)
        digits_body = os.path.join(data, "digits.json")
        heldout = json.load(open(os.path.join(ROOT, "examples", "digits", "model", "heldout.json")))
        with open(digits_body, "w") as f:
            json.dump({"pixels": heldout["inputs"][0]}, f)
        for label, model, inp, dims, example, body, ctype in CASES:
            digest = put_blob(model)
            for backend in ("tract", "onnxruntime"):
                fn = f"{label}-{backend}"
                try:
                    deploy(fn, example, "digits" if label == "digits" else "rec", digest, backend)
                except RuntimeError as e:
                    print(f"{fn}: not deployable: {str(e)[:160]}", file=sys.stderr)
                    continue
                deploy(f"probe-{fn}", "nn_probe", "model", digest, backend)
                iters = 2000 if label == "digits" else 30
                q = f"/fn/probe-{fn}/?model=model&input={inp}&dims={','.join(map(str, dims))}&iters={iters}"
                row = {"case": fn, "native": [], "python": [], "wasi_nn": [], "http": {}}
                for _ in range(args.rounds):
                    row["native"].append(native(model, backend, inp, dims, iters, ort))
                    row["wasi_nn"].append(json.loads(http("GET", q))["mean_us"])
                    if backend == "onnxruntime":
                        row["python"].append(python_ort(model, inp, dims, iters))
                for conc in (1, 4, 16):
                    wrk(f"/fn/{fn}/", body or digits_body, ctype, conc, 1)
                    runs = [wrk(f"/fn/{fn}/", body or digits_body, ctype, conc, args.duration)
                            for _ in range(args.rounds)]
                    row["http"][conc] = (statistics.median(r[0] for r in runs),
                                         statistics.median(r[1] for r in runs))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)

    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print("| model / backend | native µs | wasi-nn µs (guest) | overhead | Python ORT µs | HTTP c=1 req/s (p50 µs) | c=4 | c=16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, w, p = med(r["native"]), med(r["wasi_nn"]), med(r["python"])
        h = r["http"]
        cell = lambda c: f"{h[c][0]:,.0f} ({h[c][1]:,.0f})"
        py = f"{p:,.1f}" if r["python"] else "-"
        print(f"| {r['case']} | {n:,.1f} | {w:,.1f} | {w - n:+,.1f} µs ({(w - n) / n * 100:+.1f}%) | {py} | "
              f"{cell(1)} | {cell(4)} | {cell(16)} |")


if __name__ == "__main__":
    main()
