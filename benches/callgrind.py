#!/usr/bin/env python3
"""Where a request's instructions go: the whole Kiln server under `valgrind --tool=callgrind`,
counting only while N requests are answered, then the count per request split into the
stages of the request path. Instruction counts repeat run to run on a noisy machine where
timings do not, so this is the tool for before/after comparisons of the request path.

The kernel's share (syscalls, page faults, wake-ups) is invisible to callgrind: the
`http_load.py` bench reports it as the server's system CPU time per request.

Usage: python3 benches/callgrind.py [--requests 2000] [--conc 4]
                                    [--target hello|digits|monitored|cached]
                                    [--bin target/release/kiln] [--keep DIR] [--top 40]
Needs: valgrind, the release build, the examples built for wasm32-wasip2.
"""
import argparse, hashlib, http.client, json, os, re, shutil, signal, subprocess, sys, tempfile
import threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY, REL, ROOT, wait_http

WASM = os.path.join(ROOT, "examples", "target", "wasm32-wasip2", "release")
DIGITS_MODEL = os.path.join(ROOT, "examples", "digits", "model", "digits.onnx")
DIGITS_REFERENCE = os.path.join(ROOT, "examples", "digits", "model", "reference.npy")
PORT = 18401
BASE = f"http://127.0.0.1:{PORT}"

# Stages of the request path, as inclusive costs of the functions that do them. Each row is
# (label, regex over callgrind's function names). Callgrind's call tree is unreliable above a
# fiber switch (guest code runs on wasmtime fibers, and callers there collect more than 100%),
# so the rows name functions at or below the switch, or host code that never crosses one.
# Indented rows are part of the row above; the rows do not add up to the total (tokio, hyper's
# connection plumbing and the allocator make the rest).
STAGES = [
    ("instantiate (ProxyPre::instantiate_async)", r"ProxyPre<_T>::instantiate_async::\{\{closure\}\}$"),
    ("guest handler, its host calls included (Func::call_raw)", r"^wasmtime::runtime::component::func::Func::call_raw$"),
    ("  host calls made by the guest (HostFn::cabi_entrypoint)", r"HostFn::cabi_entrypoint$"),
    ("store drop and slot reset", r"^core::ptr::drop_in_place<wasmtime::runtime::store::StoreInner<"),
    ("store and WASI context (HostState::new)", r"^kiln_host::runtime::state::HostState::new$"),
    ("routing, auth, policy (data_plane::admit)", r"^kiln_host::server::data_plane::admit$"),
    ("  key check (auth::Auth::authenticate)", r"^kiln_host::auth::Auth::authenticate$"),
    ("usage record, stats, metrics (Usage::write)", r"^kiln_host::server::usage::Usage::write$"),
    ("`server-timing` header (set_server_timing)", r"^kiln_host::server::data_plane::set_server_timing$"),
    ("ledger writer task (ledger::write_loop)", r"^kiln_host::meter::ledger::write_loop$"),
    ("HTTP/1 parse (hyper Buffered::parse)", r"^hyper::proto::h1::io::Buffered<T,B>::parse$"),
    ("HTTP/1 encode (hyper Server::encode)", r"^<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode$"),
]
# Exclusive costs summed over function families.
FAMILIES = [
    ("malloc/free/realloc (libc)", r"^(malloc|free|realloc|calloc|_int_malloc|_int_free.*|malloc_consolidate|"
                                   r"_int_realloc|cfree.*|__libc_.*(alloc|free)|"
                                   r"unlink_chunk.*|tcache.*)$"),
    ("memcpy/memmove/memset (libc)", r"^(__)?mem(cpy|move|set).*$"),
    ("JIT-compiled guest code", r"^0x[0-9a-f]+$"),
]


def call(method, path, body=None, headers=None):
    headers = dict(headers or {}, authorization=f"Bearer {BENCH_KEY}")
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()


def deploy(target):
    """Deploys the function under test; returns (method, path, body, headers) of a request."""
    if target == "hello":
        with open(os.path.join(WASM, "hello.wasm"), "rb") as f:
            call("POST", "/v1/functions/hello/versions", f.read(),
                 {"content-type": "application/wasm"})
        return "GET", "/fn/hello/", None, {}
    model = open(DIGITS_MODEL, "rb").read()
    digest = "sha256:" + hashlib.sha256(model).hexdigest()
    call("PUT", f"/v1/blobs/{digest}", model)
    wasm = open(os.path.join(WASM, "digits.wasm"), "rb").read()
    wasm_digest = "sha256:" + hashlib.sha256(wasm).hexdigest()
    call("PUT", f"/v1/blobs/{wasm_digest}", wasm)
    manifest = {"component": wasm_digest,
                "models": {"digits": {"digest": digest, "backend": "tract"}}}
    if target == "cached":
        manifest["cache"] = {"responses": {"ttl": "1h"}}
    if target == "monitored":
        # Drift monitoring of every compute (sample_percent 100) against the reference.
        reference = open(DIGITS_REFERENCE, "rb").read()
        ref_digest = "sha256:" + hashlib.sha256(reference).hexdigest()
        call("PUT", f"/v1/blobs/{ref_digest}", reference)
        manifest["models"]["digits"]["monitor"] = {"reference": ref_digest, "sample_percent": 100}
    call("POST", f"/v1/functions/{target}/versions", json.dumps(manifest).encode(),
         {"content-type": "application/json"})
    heldout = json.load(open(os.path.join(ROOT, "examples", "digits", "model", "heldout.json")))
    pixels = json.dumps({"pixels": heldout["inputs"][0]}).encode()
    return "POST", f"/fn/{target}/", pixels, {"content-type": "application/json"}


def load(n, conc, request):
    """n requests over conc keep-alive connections; fails on any non-200."""
    method, path, body, headers = request
    headers = dict(headers, authorization=f"Bearer {BENCH_KEY}")
    counts = [n // conc + (i < n % conc) for i in range(conc)]
    errors = []

    def worker(k):
        try:
            c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=300)
            for _ in range(k):
                c.request(method, path, body=body, headers=headers)
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
            c.close()
        except Exception as e:  # a lost request would skew the per-request figures
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {sorted(set(map(str, errors)))}")


def annotate(path):
    """(total Ir, {function: inclusive Ir}, {function: exclusive Ir}) from a callgrind file."""
    def table(inclusive):
        out = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                              "--threshold=100", path], capture_output=True, text=True, check=True).stdout
        rows = {}
        total = 0
        for line in out.splitlines():
            m = re.match(r"^\s*([\d,]+) \([^)]*\)\s+(?:[^:\s]*:)?(.+?)(?: \[[^\]]*\])?\s*$", line)
            # `name'2` is a recursive (or fiber-crossing) activation: counted in the first.
            if m and not re.search(r"'\d+$", m.group(2)):
                rows.setdefault(m.group(2), int(m.group(1).replace(",", "")))
            t = re.match(r"^\s*([\d,]+)(?: \([^)]*\))?\s+PROGRAM TOTALS", line)
            if t:
                total = int(t.group(1).replace(",", ""))
        return total, rows
    total, incl = table(True)
    _, excl = table(False)
    if not total:
        sys.exit(f"no PROGRAM TOTALS in callgrind_annotate's output for {path}")
    return total, incl, excl


def run(args):
    """Runs the server under callgrind; returns (callgrind file, seconds, temp dir)."""
    tmp = tempfile.mkdtemp(prefix="kiln-callgrind-")
    out = os.path.join(tmp, "callgrind.out")
    env = dict(os.environ, KILN_ADMIN_KEY=BENCH_KEY)
    config = os.path.join(tmp, "server.toml")
    with open(config, "w") as f:
        f.write("[runtime]\nmax_instances = 6\ndefault_max_concurrency = 6\n")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         args.bin, "serve", "--listen", f"127.0.0.1:{PORT}", "--data-dir", os.path.join(tmp, "data"),
         "--config", config],
        env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "valgrind.log"), "w"))
    try:
        wait_http(f"{BASE}/healthz", timeout=300)
        request = deploy(args.target)
        load(max(200, args.conc * 10), args.conc, request)  # warm: compiled, loaded, caches filled
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        started = time.time()
        load(args.requests, args.conc, request)
        took = time.time() - started
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    files = sorted(f for f in os.listdir(tmp) if f.startswith("callgrind.out"))
    if not files:
        sys.exit(f"no callgrind output; see {tmp}/valgrind.log")
    path = os.path.join(tmp, files[-1])
    if args.keep:
        shutil.copy(path, args.keep)
    return path, took, tmp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, help="requests measured (default 2000; with --from, "
                    "the number the file was recorded with: required)")
    # valgrind refuses the pooling allocator's reservation beyond ~6 instances (4 GiB of address
    # space and a guard per memory), so the server here runs a small pool: few connections.
    ap.add_argument("--conc", type=int, default=4, choices=range(1, 7))
    ap.add_argument("--target", default="hello", choices=["hello", "digits", "monitored", "cached"])
    ap.add_argument("--bin", default=os.path.join(REL, "kiln"))
    ap.add_argument("--keep", help="copy the callgrind file here")
    ap.add_argument("--from", dest="source", help="analyse this callgrind file (from --keep) instead")
    ap.add_argument("--top", type=int, default=30, help="also list the N costliest functions")
    args = ap.parse_args()
    if args.requests is None:
        if args.source:
            ap.error("--from needs --requests: the number of requests the file counted")
        args.requests = 2000

    if args.source:
        path, took, tmp = args.source, 0.0, None
    else:
        path, took, tmp = run(args)
    total, incl, excl = annotate(path)
    n = args.requests
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    what = f"file {args.source}" if args.source else f"{took:.0f} s under callgrind, commit {commit}"
    print(f"{args.target}, {n} requests over {args.conc} connections, {what}\n")
    print("| stage | instructions per request | share |\n|---|---:|---:|")
    print(f"| **whole server (user space)** | {total / n:,.0f} | 100% |")
    for label, pattern in STAGES:
        rx = re.compile(pattern)
        hits = [v for k, v in incl.items() if rx.search(k)]
        cost = max(hits, default=0)
        print(f"| {label} | {cost / n:,.0f} | {100 * cost / total:.1f}% |")
    for label, pattern in FAMILIES:
        rx = re.compile(pattern)
        cost = sum(v for k, v in excl.items() if rx.search(k))
        print(f"| {label} (exclusive) | {cost / n:,.0f} | {100 * cost / total:.1f}% |")
    if args.top:
        print(f"\ncostliest {args.top} functions, exclusive instructions per request:")
        for k, v in sorted(excl.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"{v / n:>10,.0f}  {k}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
