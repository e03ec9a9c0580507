#!/usr/bin/env python3
"""Propagation of a traffic change across a cluster: three nodes on one PostgreSQL database
and one moto bucket; each round pins `hello` to the other version with PUT /traffic on node
2 and times, from the moment that call answered, how long nodes 1 and 3 take to route a
request to the new version (`x-kiln-version` of their answers, each node polled as fast as
one client thread can). Prints p50/p99/max over all rounds and both other nodes.

    python3 benches/propagation.py [--rounds 200]

Needs: moto_server (pip install 'moto[server]'), psql and a PostgreSQL on 127.0.0.1:5432
(KILN_BENCH_POSTGRES for another), the release build and the examples built.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY, HELLO, REL, wait_http
from cold_fetch import call, free_port, moto_bucket, scratch_database


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="kiln-bench", AWS_SECRET_ACCESS_KEY="x",
               KILN_LOG="warn", KILN_ADMIN_KEY=BENCH_KEY)
    nodes = []
    with scratch_database() as database, moto_bucket() as endpoint:
        try:
            measure(args, database, endpoint, env, nodes)
        finally:
            for _, proc in nodes:
                proc.terminate()
            for _, proc in nodes:
                proc.wait(20)


def measure(args, database, endpoint, env, nodes):
    """Starts three nodes (into `nodes`) on `database` and the bucket, and times the rounds."""
    shared = ["--database", database,
              "--blobs", f"s3://kiln-bench/p?endpoint={endpoint}&region=us-east-1"]
    for i in range(3):
        port = free_port()
        argv = [os.path.join(REL, "kiln"), "serve", "--listen", f"127.0.0.1:{port}",
                "--data-dir", tempfile.mkdtemp(prefix="kiln-propagation-"),
                "--node-id", f"node-{i + 1}"] + shared
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        nodes.append((f"http://127.0.0.1:{port}", proc))
        wait_http(f"http://127.0.0.1:{port}/healthz")
    first, second, third = (base for base, _ in nodes)
    with open(HELLO, "rb") as f:
        wasm = f.read()
    for _ in range(2):
        call("POST", f"{first}/v1/functions/hello/versions", wasm, "application/wasm")

    def served(base):
        _, headers = call("GET", f"{base}/fn/hello/")
        return headers.get("x-kiln-version")

    def wait_routed(base, want, started, out):
        while served(base) != want:
            if time.monotonic() - started > 10:
                raise SystemExit(f"{base} did not route v{want} within 10 s")
        out.append((time.monotonic() - started) * 1000)

    # Every node has both versions loaded before the rounds begin.
    for base in (first, second, third):
        deadline = time.monotonic() + 10
        while call("GET", f"{base}/v1/functions/hello")[0].count(b'"version"') < 2:
            if time.monotonic() > deadline:
                raise SystemExit(f"{base} never saw both versions")
            time.sleep(0.05)
    times = []
    for r in range(args.rounds):
        want = str(1 + (r % 2))
        body = json.dumps({"weights": {want: 100}}).encode()
        call("PUT", f"{second}/v1/functions/hello/traffic", body)
        started = time.monotonic()
        threads = [threading.Thread(target=wait_routed, args=(b, want, started, times))
                   for b in (first, third)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.05)
    print(f"traffic change on node 2 -> routed on nodes 1 and 3: {len(times)} samples, "
          f"p50 {statistics.median(times):.1f} ms, p99 {percentile(times, 99):.1f} ms, "
          f"max {max(times):.1f} ms")


if __name__ == "__main__":
    main()
