#!/usr/bin/env python3
"""Cold start of a version on a node that never saw it: the compiled artifact fetched from
the shared bucket and mapped (`fetch`), against the same node mapping its local artifact
(`map`, a restart) and a node with the component but no artifact for its engine
(`compile`, the peer a cluster without shared artifacts would pay). hello and digits, the
time `server-timing: cold;dur=..;desc=..` reports for the first request, medians over
rounds. The bucket is a real moto S3 server on loopback.

    python3 benches/cold_fetch.py [--rounds 7]

Needs: moto_server (pip install 'moto[server]'), the release build and the examples built.
"""
import argparse, contextlib, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY, HELLO, REL, ROOT, wait_http

DIGITS = os.path.join(ROOT, "examples", "target", "wasm32-wasip2", "release", "digits.wasm")
MODEL = os.path.join(ROOT, "examples", "digits", "model", "digits.onnx")
FAKE_SIG = ("AWS4-HMAC-SHA256 Credential=kiln-bench/20261202/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=0")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def moto_bucket(bucket="kiln-bench"):
    """A moto S3 server on a loopback port holding an empty `bucket`; yields its endpoint."""
    port = free_port()
    moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/")
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT",
                                                      headers={"authorization": FAKE_SIG}))
        yield endpoint
    finally:
        moto.terminate()


@contextlib.contextmanager
def scratch_database():
    """A fresh database on the PostgreSQL at KILN_BENCH_POSTGRES (default the local one),
    dropped afterwards; yields its URL."""
    admin = os.environ.get("KILN_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
    db = f"kiln_bench_{os.getpid()}"
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {db}"], check=True)
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{db}"
    finally:
        subprocess.run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"])


def call(method, url, body=None, content_type="application/json"):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"content-type": content_type,
                                          "authorization": f"Bearer {BENCH_KEY}"})
    with urllib.request.urlopen(req) as r:
        return r.read(), r.headers


def digest(data):
    import hashlib
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Node:
    def __init__(self, data, args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID="kiln-bench", AWS_SECRET_ACCESS_KEY="x",
                   KILN_LOG="warn")
        self.proc = subprocess.Popen([os.path.join(REL, "kiln"), "serve", "--listen",
                                      f"127.0.0.1:{self.port}", "--data-dir", data] + args,
                                     env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_http(f"{self.base}/healthz")

    def cold(self, method, path, body=b""):
        _, headers = call(method, f"{self.base}{path}", body or None)
        m = re.search(r'cold;dur=([\d.]+);desc="(\w+)"', headers.get("server-timing", ""))
        if not m:
            raise SystemExit(f"{path}: not a cold start: {headers.get('server-timing')}")
        return float(m.group(1)), m.group(2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


def databases_only(src, dst, blobs=False):
    os.makedirs(dst)
    for name in os.listdir(src):
        if ".db" in name:
            shutil.copy(os.path.join(src, name), dst)
    if blobs:
        shutil.copytree(os.path.join(src, "blobs"), os.path.join(dst, "blobs"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kiln-cold-bench-")
    with moto_bucket() as endpoint:
        try:
            run(args, work, endpoint)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work, endpoint):
    """Every round of the benchmark, with a bucket at `endpoint` and scratch space in `work`."""
    blobs = ["--blobs", f"s3://kiln-bench/c?endpoint={endpoint}&region=us-east-1"]
    origin = os.path.join(work, "origin")
    a = Node(origin, blobs)
    with open(HELLO, "rb") as f:
        call("POST", f"{a.base}/v1/functions/hello/versions", f.read(), "application/wasm")
    with open(MODEL, "rb") as f:
        model = f.read()
    with open(DIGITS, "rb") as f:
        component = f.read()
    for blob in (model, component):
        call("PUT", f"{a.base}/v1/blobs/{digest(blob)}", blob, "application/octet-stream")
    manifest = {"component": digest(component),
                "models": {"digits": {"digest": digest(model), "backend": "tract"}}}
    call("POST", f"{a.base}/v1/functions/digits/versions", json.dumps(manifest).encode())
    a.stop()
    pixels = json.dumps({"pixels": [0.0] * 64}).encode()
    calls = {"hello": ("GET", "/fn/hello/", b""), "digits": ("POST", "/fn/digits/", pixels)}
    times = {(f, how): [] for f in calls for how in ("fetch", "map", "compile")}
    for r in range(args.rounds):
        # A new node of the cluster: the database only.
        d = os.path.join(work, f"fetch-{r}")
        databases_only(origin, d)
        node = Node(d, blobs)
        for f, c in calls.items():
            times[(f, "fetch")].append(node.cold(*c))
        node.stop()
        # The same node again: its artifacts are local now.
        node = Node(d, blobs)
        for f, c in calls.items():
            times[(f, "map")].append(node.cold(*c))
        node.stop()
        # One node, the components but no compiled artifacts (no bucket to fetch from).
        d = os.path.join(work, f"compile-{r}")
        databases_only(origin, d, blobs=True)
        node = Node(d, [])
        for f, c in calls.items():
            times[(f, "compile")].append(node.cold(*c))
        node.stop()
    for (f, how), runs in times.items():
        descs = {d for _, d in runs}
        if descs != {how}:
            raise SystemExit(f"{f} {how}: server-timing said {descs}")
    for f in calls:
        med = {how: statistics.median(t for t, _ in times[(f, how)])
               for how in ("fetch", "map", "compile")}
        spread = {how: (min(t for t, _ in times[(f, how)]), max(t for t, _ in times[(f, how)]))
                  for how in med}
        print(f"{f:6} " + "  ".join(
            f"{how} {med[how]:7.2f} ms ({spread[how][0]:.2f}-{spread[how][1]:.2f})"
            for how in med)
              + f"  fetch/map {med['fetch'] / med['map']:.1f}x"
              + f"  compile/fetch {med['compile'] / med['fetch']:.1f}x")


if __name__ == "__main__":
    main()
