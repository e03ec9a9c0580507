#!/usr/bin/env python3
"""What a 100% shadow costs the primary: one Kiln server, `plain` (hello, no policy) and
`shadowed` (hello v1 serving everything, hello v2 as a 100% shadow: every request is read
whole, answered, then copied and compared). Interleaved rounds with wrk at two
concurrencies: c=1 (the primary alone, its latency) and c=16 (the core saturated: the copy's
CPU competes with the next requests). req/s, server CPU µs/request and p50, medians, and
ratios. Server pinned to core 0, wrk to core 1.

    python3 benches/shadow_load.py [--duration 4] [--rounds 3]

Needs: wrk, the release build and the examples built.
"""
import argparse, json, os, statistics, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY, HELLO, REL, Server, measure, wait_http


def call(method, url, body=None, content_type="application/json"):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"content-type": content_type,
                                          "authorization": f"Bearer {BENCH_KEY}"})
    return urllib.request.urlopen(req).read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = 18392
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="kiln-shadow-bench-")

    def setup():
        wait_http(f"{base}/healthz")
        with open(HELLO, "rb") as f:
            wasm = f.read()
        for name in ("plain", "shadowed", "shadowed"):
            call("POST", f"{base}/v1/functions/{name}/versions?max_concurrency=1000", wasm,
                 "application/wasm")
        policy = {"weights": {"1": 100}, "shadow": {"version": 2, "percent": 100}}
        call("PUT", f"{base}/v1/functions/shadowed/traffic", json.dumps(policy).encode())

    server = Server("kiln", [os.path.join(REL, "kiln"), "serve", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", data], f"{base}/fn/plain/", setup)
    server.start()
    runs = {(name, c): [] for name in ("plain", "shadowed") for c in (1, 16)}
    copies = {1: [0, 0], 16: [0, 0]}  # compared, skipped

    def shadow_counts():
        s = json.loads(call("GET", f"{base}/v1/functions/shadowed/versions/2/stats?window=10m"))
        return s["shadow"]["compared"], s["shadow"]["skipped"], s["shadow"]["mismatches"]

    try:
        for _ in range(args.rounds):
            for (name, c), out in runs.items():
                before = shadow_counts()
                out.append(measure(server, c, args.duration, f"{base}/fn/{name}/"))
                if name == "shadowed":
                    time.sleep(1)  # let the last copies finish
                    after = shadow_counts()
                    copies[c][0] += after[0] - before[0]
                    copies[c][1] += after[1] - before[1]
        mismatches = shadow_counts()[2]
    finally:
        server.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "cpu_us", "p50")}
           for k, v in runs.items()}
    for (name, c), m in med.items():
        print(f"{name:9} c={c:<3} {m['rps']:8.0f} req/s  {m['cpu_us']:6.1f} µs CPU/req  "
              f"p50 {m['p50']:.0f} µs")
    for c in (1, 16):
        s, p = med[("shadowed", c)], med[("plain", c)]
        print(f"c={c}: shadowed/plain req/s {s['rps'] / p['rps']:.3f}, "
              f"CPU/req {s['cpu_us'] / p['cpu_us']:.3f}, p50 {s['p50'] / p['p50']:.3f}")
    for c, (compared, skipped) in copies.items():
        print(f"c={c}: copies compared {compared}, skipped {skipped} "
              f"({100 * compared / max(1, compared + skipped):.0f}% of the requests shadowed)")
    print(f"mismatches: {mismatches}")


if __name__ == "__main__":
    main()
