#!/bin/bash
# Two kiln binaries (before and after a change) serving hello with an admin key, side by side:
# each server on core 0, wrk on core 1, interleaved rounds of 5 s at 16 connections.
set -e
KEY=kiln-bench-admin-key-0123456789abcdef
HELLO=${HELLO:-$(dirname "$0")/../examples/target/wasm32-wasip2/release/hello.wasm}
run() { # bin port
  d=$(mktemp -d); KILN_ADMIN_KEY=$KEY taskset -c 0 $1 serve --listen 127.0.0.1:$2 --data-dir $d >/dev/null 2>&1 & echo $! > /tmp/pid.$2
  for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$2/healthz && break; sleep 0.1; done
  curl -s -o /dev/null -H "authorization: Bearer $KEY" -H 'content-type: application/wasm' --data-binary @$HELLO "http://127.0.0.1:$2/v1/functions/hello/versions"
  curl -s -o /dev/null -H "authorization: Bearer $KEY" http://127.0.0.1:$2/fn/hello/
}
OLD=${1:?usage: before_after.sh OLD_KILN NEW_KILN}; NEW=${2:?}
run "$OLD" 18101; run "$NEW" 18102
for r in 1 2 3; do for p in 18101 18102; do
  out=$(taskset -c 1 wrk -t1 -c16 -d5s -H "authorization: Bearer $KEY" http://127.0.0.1:$p/fn/hello/ | grep -E "Requests/sec|Latency")
  echo "round $r port $p: $(echo $out | tr -s ' ')"
done; done
kill $(cat /tmp/pid.18101) $(cat /tmp/pid.18102)
