#!/usr/bin/env python3
"""Soak: one Kiln server at saturation for --minutes (default 10) with a mixed load, and the
checks a long run must pass.

Load (all at once, wrk on core 1, the server on core 0):
  hello       GET  /fn/hello/          wrk -c8
  digits      POST /fn/digits/         wrk -c4, a held-out digit (tract, inference cache on)
  cached      POST /fn/cached/         wrk -c4, digits with a response cache: hits
  hostile     GET  /fn/hostile/loop, /fn/hostile/hog   wrk -c4 (timeouts, memory traps)
  hang-ups    a client that sends a request to hello-hangup and leaves before the answer,
              and one that declares a body for digits-hangup and leaves halfway through it

Checks (the run fails on any):
  - zero 5xx answered by hello, digits and cached (wrk's count and the ledger's);
  - RSS and open file descriptors flat: after the warm-up (--warmup, 60 s), every sample
    (the floor of ten reads over a second) within 10% of the first one taken after it;
  - usage totals equal requests answered: for each healthy function the ledger's request
    count matches wrk's completed requests, within the connections wrk cuts at its end.

Usage: python3 benches/soak.py [--minutes 10] [--warmup 60]
Needs: wrk (apt-get install wrk), the release build, the examples built for wasm32-wasip2.
Not run in CI (it takes the machine for ten minutes); results go in BENCHMARKS.md.
"""
import argparse, hashlib, json, os, re, socket, subprocess, sys, tempfile, threading, time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import BENCH_KEY, LOAD_CORE, REL, ROOT, Server

WASM = os.path.join(ROOT, "examples", "target", "wasm32-wasip2", "release")
DIGITS = os.path.join(ROOT, "examples", "digits", "model", "digits.onnx")
PORT = 18301
BASE = f"http://127.0.0.1:{PORT}"
HEALTHY = ("hello", "digits", "cached")


def call(method, path, body=None, headers=None):
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def blob(path):
    data = open(path, "rb").read()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    call("PUT", f"/v1/blobs/{digest}", data)
    return digest


def deploy(name, example, **manifest):
    manifest["component"] = blob(os.path.join(WASM, f"{example}.wasm"))
    manifest["public"] = True
    call("POST", f"/v1/functions/{name}/versions", json.dumps(manifest).encode(),
         {"content-type": "application/json"})


def lua_script(directory, name, body):
    path = os.path.join(directory, f"{name}.lua")
    with open(path, "w") as f:
        if name == "hostile":
            # Alternate an endless loop (504 at the timeout, or a fast 503 once it sheds)
            # and a memory hog (500: a trap at the cap).
            f.write('local n = 0\nrequest = function()\n  n = n + 1\n'
                    '  local p = (n % 2 == 0) and "/fn/hostile/loop" or "/fn/hostile/hog"\n'
                    '  return wrk.format("GET", p)\nend\n')
        else:
            f.write(f'wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n'
                    f'wrk.body = {json.dumps(body)}\n')
    return path


def wrk(url, conc, seconds, script=None):
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conc}", f"-d{seconds}s",
            "--timeout", "10s"]
    if script:
        argv += ["-s", script]
    return subprocess.Popen(argv + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def parse_wrk(out):
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


def hang_ups(stop, counts, body):
    """Clients that leave: a request whose answer is never read, and a body cut short."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
                s.sendall(b"GET /fn/hello-hangup/ HTTP/1.1\r\nhost: x\r\n\r\n")
            counts["head"] += 1
            with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
                s.sendall(b"POST /fn/digits-hangup/ HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          + f"content-length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            counts["body"] += 1
        except OSError:
            counts["errors"] += 1
        time.sleep(0.05)


def sample(pid):
    """RSS (KiB) and open files, each the floor of ten reads over a second: hostile guests
    hold up to their memory cap and connections come and go from one instant to the next;
    a leak raises the floor."""
    reads = []
    for _ in range(10):
        status = open(f"/proc/{pid}/status").read()
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
        reads.append((rss, len(os.listdir(f"/proc/{pid}/fd"))))
        time.sleep(0.1)
    return min(r[0] for r in reads), min(r[1] for r in reads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup", type=int, default=60)
    args = ap.parse_args()
    seconds = int(args.minutes * 60)
    data = tempfile.mkdtemp(prefix="kiln-soak-")
    cfg = os.path.join(data, "server.toml")
    with open(cfg, "w") as f:
        f.write('[metering]\nenabled = true\n')
    server = Server("kiln", [os.path.join(REL, "kiln"), "serve", "--listen", f"127.0.0.1:{PORT}",
                             "--data-dir", data, "--config", cfg], f"{BASE}/healthz")
    os.environ["KILN_ADMIN_KEY"] = BENCH_KEY
    server.start()
    failures = []
    try:
        heldout = json.load(open(os.path.join(ROOT, "examples", "digits", "model", "heldout.json")))
        body = json.dumps({"pixels": heldout["inputs"][0]})
        model = {"digits": {"digest": blob(DIGITS), "backend": "tract"}}
        deploy("hello", "hello", limits={"max_concurrency": 64})
        deploy("hello-hangup", "hello")
        deploy("digits", "digits", models=model, limits={"max_concurrency": 64})
        deploy("digits-hangup", "digits", models=model)
        deploy("cached", "digits", models=model, cache={"responses": {"ttl": "1h"}},
               limits={"max_concurrency": 64})
        deploy("hostile", "hostile", limits={"timeout_ms": 200, "memory_mb": 32,
                                             "max_concurrency": 2})
        pid = server.proc.pid
        runs = {
            "hello": wrk(f"{BASE}/fn/hello/", 8, seconds),
            "digits": wrk(f"{BASE}/fn/digits/", 4, seconds, lua_script(data, "digits", body)),
            "cached": wrk(f"{BASE}/fn/cached/", 4, seconds, lua_script(data, "cached", body)),
            "hostile": wrk(f"{BASE}/fn/hostile/", 4, seconds, lua_script(data, "hostile", None)),
        }
        stop, counts = threading.Event(), {"head": 0, "body": 0, "errors": 0}
        leaver = threading.Thread(target=hang_ups, args=(stop, counts, body.encode()), daemon=True)
        leaver.start()
        samples, t0 = [], time.time()
        while any(p.poll() is None for p in runs.values()):
            rss, fds = sample(pid)
            samples.append((round(time.time() - t0), rss, fds))
            print(f"t={samples[-1][0]:>4}s rss={rss / 1024:.1f} MiB fds={fds}", file=sys.stderr)
            time.sleep(15)
        stop.set()
        leaver.join()
        results = {name: parse_wrk(p.communicate()[0]) for name, p in runs.items()}
        time.sleep(3)  # the ledger's last group commit
        usage = json.loads(call("GET", "/v1/usage?group_by=function"))
        by_fn = {g["key"]: g for g in usage["groups"]}
        metrics = call("GET", "/metrics").decode()
    finally:
        server.stop()

    steady = [s for s in samples if s[0] >= args.warmup]
    base_rss, base_fds = steady[0][1], steady[0][2]
    worst_rss = max(abs(s[1] - base_rss) / base_rss for s in steady)
    worst_fds = max(abs(s[2] - base_fds) / base_fds for s in steady)
    if worst_rss > 0.10:
        failures.append(f"RSS moved {worst_rss:.1%} after the warm-up")
    if worst_fds > 0.10:
        failures.append(f"open files moved {worst_fds:.1%} after the warm-up")
    print(f"## soak: {args.minutes:g} min, {len(samples)} samples, warm-up {args.warmup} s\n")
    print("| function | wrk c | req/s | answered (wrk) | non-2xx (wrk) | ledger requests | ledger errors (5xx) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    conns = {"hello": 8, "digits": 4, "cached": 4, "hostile": 4}
    for name, r in results.items():
        g = by_fn.get(name, {})
        print(f"| {name} | {conns[name]} | {r['rps']:,.0f} | {r['requests']:,} | {r['non2xx']:,} | "
              f"{g.get('requests', 0):,} | {g.get('errors', 0):,} |")
        if name in HEALTHY:
            if r["non2xx"] or g.get("errors", 0):
                failures.append(f"{name}: {r['non2xx']} non-2xx (wrk), {g.get('errors')} errors (ledger)")
            # wrk cuts the requests in flight when its time is up: at most one per connection.
            if abs(g.get("requests", 0) - r["requests"]) > conns[name]:
                failures.append(f"{name}: ledger {g.get('requests')} requests, wrk answered {r['requests']}")
    print(f"\nhang-ups: {counts['head']:,} requests left unread, {counts['body']:,} bodies cut "
          f"short, {counts['errors']} connect errors; their records by outcome (metrics):")
    for fn in ("hello-hangup", "digits-hangup"):
        outcomes = re.findall(rf'kiln_faas_invocations_total\{{function="{fn}",version="1",outcome="(\w+)"\}} (\S+)', metrics)
        print(f"  {fn}: " + ", ".join(f"{o} {float(n):,.0f}" for o, n in outcomes if float(n)))
    print(f"RSS after the warm-up: {base_rss / 1024:.1f} MiB first, "
          f"{min(s[1] for s in steady) / 1024:.1f}..{max(s[1] for s in steady) / 1024:.1f} MiB "
          f"(worst {worst_rss:.1%}); open files {base_fds} first, "
          f"{min(s[2] for s in steady)}..{max(s[2] for s in steady)} (worst {worst_fds:.1%})")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
