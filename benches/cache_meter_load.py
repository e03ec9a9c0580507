#!/usr/bin/env python3
"""Prediction caches and metering, measured over real HTTP in one run.

Part 1, caches (one server; ONNX Runtime for the OCR model). The same request body is sent
over and over, so every cacheable request after the first is a hit:
  hello            the reference: a fresh instance, no model, no cache
  X-nocache        inference cache off, no response cache: every request runs the model
  X-nncache        inference cache on (the default): the instance runs, compute is a hit
  X-respcache      [cache] responses: a hit answers without any instance
for X = digits (tract) and ocr (onnxruntime): req/s, p50 µs and server CPU µs per request
at c=1 and c=16.

Part 2, metering overhead: two servers with the hello function, `[metering] enabled = true`
(batched ledger) and `false`, interleaved rounds at c=16: req/s and server CPU µs/request.

Part 3, ledger write throughput: target/release/ledger-write (batched and strict).

Server pinned to core 0, wrk to core 1. Medians of --rounds rounds.
Usage: python3 benches/cache_meter_load.py [--duration 5] [--rounds 3]
Needs: wrk, the release build, the examples built, ONNX Runtime (scripts/onnxruntime) and
the OCR model (examples/ocr/model/fetch.sh).
"""
import argparse, hashlib, json, os, statistics, subprocess, sys, tempfile, time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import (BENCH_KEY, REL, ROOT, SERVER_CORE, LOAD_CORE, TICKS, HELLO, Server, cpu_ticks,
                       wait_http)
import re

WASM = os.path.join(ROOT, "examples", "target", "wasm32-wasip2", "release")
DIGITS = os.path.join(ROOT, "examples", "digits", "model", "digits.onnx")
OCR = os.path.join(ROOT, "examples", "ocr", "model", "rec.onnx")
OCR_PNG = os.path.join(ROOT, "examples", "ocr", "testdata", "Hello_World_2026.png")


def call(base, method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read()!r}")


def blob(base, path):
    data = open(path, "rb").read()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    call(base, "PUT", f"/v1/blobs/{digest}", data)
    return digest


def deploy(base, name, example, models, cache):
    manifest = {"component": blob(base, os.path.join(WASM, f"{example}.wasm")),
                "limits": {"max_concurrency": 1000}, "models": models, "cache": cache}
    call(base, "POST", f"/v1/functions/{name}/versions", json.dumps(manifest).encode(),
         {"content-type": "application/json"})


def wrk(url, conc, duration, body_file=None, ctype=None):
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-H", f"authorization: Bearer {BENCH_KEY}", "-t1", f"-c{conc}", f"-d{duration}s", "--latency"]
    lua = None
    if body_file:
        lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        lua.write(f'wrk.method = "POST"\nwrk.headers["content-type"] = "{ctype}"\n'
                  f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
        lua.close()
        argv += ["-s", lua.name]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    if lua:
        os.unlink(lua.name)
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{url}: error responses\n{out}")
    m = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)],
            "reqs": int(re.search(r"(\d+) requests in", out).group(1))}


def measure(pid, url, conc, duration, body_file=None, ctype=None):
    wrk(url, conc, 1, body_file, ctype)
    t0 = cpu_ticks(pid)
    r = wrk(url, conc, duration, body_file, ctype)
    r["cpu_us"] = (cpu_ticks(pid) - t0) / TICKS * 1e6 / r["reqs"]
    return r


def start(port, data, config):
    cfg = os.path.join(data, "server.toml")
    with open(cfg, "w") as f:
        f.write(config)
    s = Server("kiln", [os.path.join(REL, "kiln"), "serve", "--listen", f"127.0.0.1:{port}",
                        "--data-dir", data, "--config", cfg], f"http://127.0.0.1:{port}/healthz")
    s.start()
    return s


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def caches(args, ort):
    data = tempfile.mkdtemp(prefix="kiln-cache-bench-")
    port = 18191
    base = f"http://127.0.0.1:{port}"
    server = start(port, data, f'[nn]\nonnxruntime_library = "{ort}"\n')
    try:
        call(base, "POST", "/v1/functions/hello/versions?max_concurrency=1000",
             open(HELLO, "rb").read(), {"content-type": "application/wasm"})
        digits_body = os.path.join(data, "digits.json")
        heldout = json.load(open(os.path.join(ROOT, "examples", "digits", "model", "heldout.json")))
        with open(digits_body, "w") as f:
            json.dump({"pixels": heldout["inputs"][0]}, f)
        cases = [("hello", None, None)]
        for label, model, name, backend, body, ctype in (
                ("digits", DIGITS, "digits", "tract", digits_body, "application/json"),
                ("ocr", OCR, "rec", "onnxruntime", OCR_PNG, "image/png")):
            models = {name: {"digest": blob(base, model), "backend": backend}}
            deploy(base, f"{label}-nocache", label, models, {"inference": False})
            deploy(base, f"{label}-nncache", label, models, {})
            deploy(base, f"{label}-respcache", label, models,
                   {"responses": {"ttl": "1h"}})
            cases += [(f"{label}-{k}", body, ctype) for k in ("nocache", "nncache", "respcache")]
        results = {}
        for conc in (1, 16):
            for fn, body, ctype in cases:
                runs = [measure(server.proc.pid, f"{base}/fn/{fn}/", conc, args.duration, body, ctype)
                        for _ in range(args.rounds)]
                results[(fn, conc)] = {k: med(runs, k) for k in ("rps", "p50", "cpu_us")}
                print(fn, conc, results[(fn, conc)], file=sys.stderr)
    finally:
        server.stop()
    print("| function | c=1 req/s | c=1 p50 µs | c=1 CPU µs/req | c=16 req/s | c=16 p50 µs | c=16 CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fn, _, _ in cases:
        a, b = results[(fn, 1)], results[(fn, 16)]
        print(f"| {fn} | {a['rps']:,.0f} | {a['p50']:,.0f} | {a['cpu_us']:,.1f} | "
              f"{b['rps']:,.0f} | {b['p50']:,.0f} | {b['cpu_us']:,.1f} |")


def metering(args):
    servers = {}
    for i, enabled in enumerate(("true", "false")):
        data = tempfile.mkdtemp(prefix="kiln-meter-bench-")
        port = 18192 + i
        s = start(port, data, f"[metering]\nenabled = {enabled}\n")
        call(f"http://127.0.0.1:{port}", "POST", "/v1/functions/hello/versions?max_concurrency=1000",
             open(HELLO, "rb").read(), {"content-type": "application/wasm"})
        s.stop()  # restarted per round, interleaved below
        servers[enabled] = s
    rows = {"true": [], "false": []}
    try:
        for _ in range(args.rounds):
            for enabled, s in servers.items():
                s.start()
                url = s.url.replace("/healthz", "/fn/hello/")
                rows[enabled].append(measure(s.proc.pid, url, 16, args.duration))
                s.stop()
                print("metering", enabled, rows[enabled][-1], file=sys.stderr)
    finally:
        for s in servers.values():
            s.stop()
    on, off = rows["true"], rows["false"]
    print("| hello c=16 | req/s | CPU µs/req |")
    print("|---|---:|---:|")
    print(f"| metering on (batched) | {med(on, 'rps'):,.0f} | {med(on, 'cpu_us'):.1f} |")
    print(f"| metering off | {med(off, 'rps'):,.0f} | {med(off, 'cpu_us'):.1f} |")
    print(f"| on/off | {med(on, 'rps') / med(off, 'rps'):.3f} | "
          f"{med(on, 'cpu_us') / med(off, 'cpu_us'):.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("caches", "metering", "ledger"))
    args = ap.parse_args()
    if args.only in (None, "caches"):
        ort = subprocess.run([os.path.join(ROOT, "scripts", "onnxruntime")], capture_output=True,
                             text=True, check=True).stdout.strip()
        caches(args, ort)
    if args.only in (None, "metering"):
        metering(args)
    if args.only in (None, "ledger"):
        print(subprocess.run(["taskset", "-c", SERVER_CORE, os.path.join(REL, "ledger-write")],
                             capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    main()
