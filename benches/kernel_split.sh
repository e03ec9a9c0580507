#!/bin/bash
# User and kernel CPU per request, and page faults per request, of one kiln binary serving
# hello under several server configs, interleaved: each config in turn on core 0, wrk on
# core 1 (-t1 -c16, keep-alive, admin key on every request), 5 s after a 1 s warm-up, for
# ROUNDS rounds. Read from /proc/<pid>/stat (utime, stime, minflt) over the measured window.
#
# Usage: bash benches/kernel_split.sh BIN 'TOML A' 'TOML B' ...   (ROUNDS=3 by default)
# e.g.:  bash benches/kernel_split.sh target/release/kiln \
#          $'[runtime]\nmemory_keep_resident_bytes = 0' ''
set -e
KEY=kiln-bench-admin-key-0123456789abcdef
HELLO=${HELLO:-$(dirname "$0")/../examples/target/wasm32-wasip2/release/hello.wasm}
BIN=${1:?usage: kernel_split.sh BIN CONFIG...}; shift
TICK=$(getconf CLK_TCK)
one() { # config-text label
  local d pid u0 s0 f0 u1 s1 f1 out n rps
  d=$(mktemp -d); printf '%s\n' "$1" > "$d/c.toml"
  KILN_ADMIN_KEY=$KEY taskset -c 0 "$BIN" serve --listen 127.0.0.1:18121 --data-dir "$d" \
    --config "$d/c.toml" >/dev/null 2>&1 & pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18121/healthz && break; sleep 0.1; done
  curl -sf -o /dev/null -H "authorization: Bearer $KEY" -H 'content-type: application/wasm' \
    --data-binary @"$HELLO" "http://127.0.0.1:18121/v1/functions/hello/versions"
  taskset -c 1 wrk -t1 -c16 -d1s -H "authorization: Bearer $KEY" http://127.0.0.1:18121/fn/hello/ >/dev/null
  read -r f0 u0 s0 < <(awk '{print $10, $14, $15}' /proc/$pid/stat)
  out=$(taskset -c 1 wrk -t1 -c16 -d5s -H "authorization: Bearer $KEY" http://127.0.0.1:18121/fn/hello/)
  read -r f1 u1 s1 < <(awk '{print $10, $14, $15}' /proc/$pid/stat)
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$d"
  n=$(echo "$out" | grep -oP '\d+(?= requests in)')
  rps=$(echo "$out" | grep -oP 'Requests/sec:\s+\K[\d.]+')
  if echo "$out" | grep -q "Non-2xx"; then echo "$2: error responses" >&2; exit 1; fi
  awk -v l="$2" -v r="$rps" -v n="$n" -v u=$((u1-u0)) -v s=$((s1-s0)) -v f=$((f1-f0)) -v t="$TICK" \
    'BEGIN { printf "%-28s %9.0f req/s  user %6.1f us/req  kernel %6.1f us/req  faults %4.1f/req\n",
             l, r, u/t*1e6/n, s/t*1e6/n, f/n }'
}
for r in $(seq "${ROUNDS:-3}"); do
  i=0
  for cfg in "$@"; do
    i=$((i+1)); one "$cfg" "round $r config $i"
  done
done
