#!/usr/bin/env python3
"""Server CPU per request for hello on the cluster backends (PostgreSQL for the database
and the usage ledger, a moto S3 bucket for blobs) against the embedded default (SQLite and
the blobs folder): the data plane reads neither per request, so the difference is what
each backend's ledger writer costs. Interleaved rounds with wrk at c=16, medians, ratios.
Server pinned to core 0, wrk to core 1.

    python3 benches/backend_load.py [--duration 4] [--rounds 5]

Needs: wrk, moto_server, psql and a PostgreSQL on 127.0.0.1:5432 (KILN_BENCH_POSTGRES for
another admin URL), the release build and the examples built.
"""
import argparse, os, statistics, subprocess, sys, tempfile, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cold_fetch import free_port, moto_bucket, scratch_database
from http_load import BENCH_KEY, HELLO, REL, Server, measure, wait_http


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    servers = {}
    with scratch_database() as database, moto_bucket() as endpoint:
        try:
            os.environ.update(AWS_ACCESS_KEY_ID="kiln-bench", AWS_SECRET_ACCESS_KEY="x")
            measure_both(args, database, endpoint, servers)
        finally:
            for s in servers.values():
                s.stop()


def measure_both(args, database, endpoint, servers):
    """Starts both servers (into `servers`) and measures them in interleaved rounds."""
    cluster = ["--database", database,
               "--blobs", f"s3://kiln-bench/b?endpoint={endpoint}&region=us-east-1"]
    for name, extra in (("sqlite+folder", []), ("postgres+s3", cluster)):
        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def setup(base=base):
            wait_http(f"{base}/healthz")
            with open(HELLO, "rb") as f:
                req = urllib.request.Request(
                    f"{base}/v1/functions/hello/versions?max_concurrency=1000", data=f.read(),
                    headers={"content-type": "application/wasm",
                             "authorization": f"Bearer {BENCH_KEY}"})
            urllib.request.urlopen(req).read()

        argv = [os.path.join(REL, "kiln"), "serve", "--listen", f"127.0.0.1:{port}",
                "--data-dir", tempfile.mkdtemp(prefix="kiln-backend-bench-")] + extra
        servers[name] = Server(name, argv, f"{base}/fn/hello/", setup)
    for s in servers.values():
        s.start()
    runs = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, s in servers.items():
            runs[name].append(measure(s, 16, args.duration))
    med = {n: {m: statistics.median(r[m] for r in v) for m in ("rps", "cpu_us", "p50")}
           for n, v in runs.items()}
    for n, m in med.items():
        spread = (min(r["cpu_us"] for r in runs[n]), max(r["cpu_us"] for r in runs[n]))
        print(f"{n:14} {m['rps']:8.0f} req/s  {m['cpu_us']:6.1f} µs CPU/req "
              f"({spread[0]:.1f}-{spread[1]:.1f})  p50 {m['p50']:.0f} µs")
    a, b = med["postgres+s3"], med["sqlite+folder"]
    print(f"postgres+s3 / sqlite+folder: CPU/req {a['cpu_us'] / b['cpu_us']:.3f}, "
          f"req/s {a['rps'] / b['rps']:.3f}")


if __name__ == "__main__":
    main()
