#!/usr/bin/env python3
"""What authentication costs per request: one Kiln server, the hello component deployed
twice, `hello` private (every request carries an API key: parse, SHA-256, key lookup) and
`hello-pub` public (no key). Interleaved rounds at c=16 with wrk; req/s and server CPU
µs/request, medians, and their ratio. Server pinned to core 0, wrk to core 1.

    python3 benches/auth_load.py [--duration 4] [--rounds 5]

Needs: wrk, the release build and the examples built.
"""
import argparse, os, statistics, sys, tempfile, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import HELLO, REL, Server, measure, wait_http


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conc", type=int, default=16)
    args = ap.parse_args()
    port = 18391
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="kiln-auth-bench-")

    def setup():
        wait_http(f"{base}/healthz")
        for name, query in (("hello", ""), ("hello-pub", "&public=true")):
            with open(HELLO, "rb") as f:
                req = urllib.request.Request(
                    f"{base}/v1/functions/{name}/versions?max_concurrency=1000{query}",
                    data=f.read(), headers={"content-type": "application/wasm"})
            urllib.request.urlopen(req).read()

    server = Server("kiln", [os.path.join(REL, "kiln"), "serve", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", data], f"{base}/fn/hello/", setup)
    server.start()
    runs = {"key": [], "public": []}
    try:
        for _ in range(args.rounds):
            runs["key"].append(measure(server, args.conc, args.duration, f"{base}/fn/hello/", auth=True))
            runs["public"].append(measure(server, args.conc, args.duration, f"{base}/fn/hello-pub/", auth=False))
    finally:
        server.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "cpu_us", "p50")} for k, v in runs.items()}
    for k, m in med.items():
        rounds = ", ".join("%.0f" % r["rps"] for r in runs[k])
        print(f"{k:7} {m['rps']:9.0f} req/s  {m['cpu_us']:6.1f} µs CPU/req  p50 {m['p50']:.0f} µs   "
              f"rounds: {rounds}")
    print(f"key/public: req/s {med['key']['rps'] / med['public']['rps']:.3f}, "
          f"CPU/req {med['key']['cpu_us'] / med['public']['cpu_us']:.3f}")


if __name__ == "__main__":
    main()
