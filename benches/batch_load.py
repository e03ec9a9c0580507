#!/usr/bin/env python3
"""Dynamic batching bench: each model's function with batching off and with `batch = "auto"`
(and explicit limits), side by side in one run, over HTTP with wrk at concurrency 1, 4, 16
and 64: requests/s, p50/p99 latency, and rows per backend run (from `kiln_nn_batch_rows`).

Models: examples/embed (all-MiniLM-L6-v2, one short sentence a request), examples/digits
(one 8x8 image a request) and examples/ocr (one text line a request; ONNX Runtime only).
The inference cache is off, so every request runs the model. One server, pinned to core 0;
wrk on core 1; the variants of a model interleaved within each round.

Usage: python3 benches/batch_load.py [--duration 5] [--rounds 2] [--conc 1,4,16,64]
                                     [--backend onnxruntime|tract] [--models embed,digits,ocr]
Needs: wrk, the release build, the examples built, ONNX Runtime (scripts/onnxruntime), the
embed and OCR models (examples/*/model/fetch.sh).
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY, REL, ROOT, wait_http  # noqa: E402

WASM = os.path.join(ROOT, "examples", "target", "wasm32-wasip2", "release")
SERVER_CORE, LOAD_CORE = "0", "1"
PORT = 18191
BASE = f"http://127.0.0.1:{PORT}"
VARIANTS = {"off": "off", "auto": "auto", "fixed": {"max_rows": 32, "max_wait_us": 2000}}


def http(method, path, body=None, ctype="application/json"):
    req = urllib.request.Request(BASE + path, data=body, method=method,
                                 headers={"content-type": ctype})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def put_blob(path):
    data = open(path, "rb").read()
    import hashlib
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    http("PUT", f"/v1/blobs/{digest}", data, "application/octet-stream")
    return digest


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} ([\d.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def batch_counts(backend):
    text = http("GET", "/metrics").decode()
    labels = f'{{backend="{backend}",device="cpu"}}'
    return metric(text, f"kiln_nn_batch_rows_sum{labels}"), metric(text, f"kiln_nn_batch_rows_count{labels}")


def lua_string(data):
    """`data` (any bytes: an OCR request is a PNG) as a Lua string literal."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}"
                         for b in data) + '"'


def settle(backend):
    """Waits until the requests wrk left in flight have finished (the batch counters hold
    still), so one cell's tail is not counted in the next."""
    last = batch_counts(backend)
    for _ in range(60):
        time.sleep(0.5)
        now = batch_counts(backend)
        if now == last:
            return
        last = now


def wrk(path, body_file, ctype, conc, duration):
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    body = open(body_file, "rb").read()
    script.write(f'wrk.method = "POST"\nwrk.body = {lua_string(body)}\n'
                 f'wrk.headers["content-type"] = "{ctype}"\n'
                 f'wrk.headers["authorization"] = "Bearer {BENCH_KEY}"\n')
    script.close()
    # A long timeout: a request slower than wrk's default 2 s is still counted.
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conc}", f"-d{duration}s",
                          "--timeout", "30s", "--latency", "-s", script.name, BASE + path],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)

    def lat(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": lat(50), "p99": lat(99), "errors": int(errors.group(1)) if errors else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conc", default="1,4,16,64")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tract"])
    ap.add_argument("--models", default="embed,digits,ocr")
    args = ap.parse_args()
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("-10")
    except OSError:
        pass
    ort = subprocess.run([os.path.join(ROOT, "scripts", "onnxruntime")], capture_output=True,
                         text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="kiln-batch-")
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        if ort:
            f.write(f'[nn]\nonnxruntime_library = "{ort}"\n')
    server = subprocess.Popen(
        ["taskset", "-c", SERVER_CORE, os.path.join(REL, "kiln"), "serve", "--listen",
         f"127.0.0.1:{PORT}", "--data-dir", tmp, "--config", cfg],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "w"))
    try:
        wait_http(f"{BASE}/healthz")
        models = {
            "embed": ("embed", "minilm", os.path.join(ROOT, "examples/embed/model/minilm.onnx"),
                      json.dumps({"text": "A man is eating a piece of bread."}), "application/json"),
            "digits": ("digits", "digits", os.path.join(ROOT, "examples/digits/model/digits.onnx"),
                       json.dumps({"pixels": json.load(open(os.path.join(
                           ROOT, "examples/digits/model/heldout.json")))["inputs"][0]}),
                       "application/json"),
            "ocr": ("ocr", "rec", os.path.join(ROOT, "examples/ocr/model/rec.onnx"),
                    os.path.join(ROOT, "examples/ocr/testdata/Hello_World_2026.png"), "image/png"),
        }
        plan = []
        for key in args.models.split(","):
            example, model_name, model_path, body, ctype = models[key]
            if key == "ocr" and args.backend != "onnxruntime":
                continue
            component = put_blob(os.path.join(WASM, f"{example}.wasm"))
            digest = put_blob(model_path)
            if os.path.exists(body):
                body_file = body
            else:
                body_file = os.path.join(tmp, f"{key}.body")
                open(body_file, "w").write(body)
            for variant, batch in VARIANTS.items():
                name = f"{key}-{variant}"
                http("POST", f"/v1/functions/{name}/versions", json.dumps({
                    "component": component,
                    "models": {model_name: {"digest": digest, "backend": args.backend, "batch": batch}},
                    "cache": {"inference": False},
                    "limits": {"timeout_ms": 60000, "max_concurrency": 256},
                }).encode())
                plan.append((key, variant, name, body_file, ctype))
        time.sleep(2)
        # Let "auto" finish timing each model (it runs once, in the background).
        for key, variant, name, body_file, ctype in plan:
            wrk(f"/fn/{name}/", body_file, ctype, 1, 1)
        for _ in range(600):
            infos = [json.loads(http("GET", f"/v1/functions/{name}/versions/1"))["models"][0]
                     for _, v, name, _, _ in plan if v == "auto"]
            if all("calibrat" not in (i.get("batching") or {}).get("reason", "calibrating") for i in infos):
                break
            time.sleep(0.5)
        decisions = {}
        for key, variant, name, _, _ in plan:
            info = json.loads(http("GET", f"/v1/functions/{name}/versions/1"))["models"][0]
            decisions[(key, variant)] = info.get("batching")
        results = {}
        for conc in [int(c) for c in args.conc.split(",")]:
            for rnd in range(args.rounds):
                for key, variant, name, body_file, ctype in plan:
                    wrk(f"/fn/{name}/", body_file, ctype, conc, 1)  # warm up
                    settle(args.backend)
                    before = batch_counts(args.backend)
                    r = wrk(f"/fn/{name}/", body_file, ctype, conc, args.duration)
                    settle(args.backend)
                    after = batch_counts(args.backend)
                    runs = after[1] - before[1]
                    # "off" never batches: what the counters moved by is a neighbour's tail.
                    r["rows"] = (after[0] - before[0]) / runs if runs and variant != "off" else None
                    results.setdefault((key, variant, conc), []).append(r)
                    print(f"{key} {variant} c={conc} round {rnd}: {r['rps']:.0f} req/s p50 "
                          f"{r['p50']:.2f} ms p99 {r['p99']:.2f} ms rows/run {r['rows']} "
                          f"errors {r['errors']}", file=sys.stderr)
        # "auto" refits from real runs: what it decided by the end.
        for key, variant, name, _, _ in plan:
            if variant == "auto":
                info = json.loads(http("GET", f"/v1/functions/{name}/versions/1"))["models"][0]
                decisions[(key, "auto, at the end")] = info.get("batching")
    finally:
        server.terminate()
        server.wait(20)

    print(f"backend: {args.backend}, {args.rounds} rounds of {args.duration} s, medians\n")
    for (key, variant), info in decisions.items():
        if variant != "off":
            print(f"- {key} {variant}: {json.dumps(info)}")
    print("\n| model | batch | c | req/s | p50 ms | p99 ms | rows per run | vs off (req/s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (key, variant, conc), rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)
        rows = [r["rows"] for r in rs if r["rows"] is not None]
        off = statistics.median(r["rps"] for r in results[(key, "off", conc)])
        errors = sum(r["errors"] for r in rs)
        note = f" ({errors} errors)" if errors else ""
        print(f"| {key} | {variant} | {conc} | {med('rps'):,.0f}{note} | {med('p50'):.2f} | "
              f"{med('p99'):.2f} | {statistics.median(rows):.1f} |" if rows else
              f"| {key} | {variant} | {conc} | {med('rps'):,.0f}{note} | {med('p50'):.2f} | "
              f"{med('p99'):.2f} | - |", end="")
        print(f" {med('rps') / off:.2f}x |")


if __name__ == "__main__":
    main()
