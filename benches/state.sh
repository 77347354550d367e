#!/usr/bin/env bash
# The cost of the state store (greylisting and helo_churn): CPU per session and state round
# trips per session, without a store, with the embedded store and with Redis, from the
# loadgen `helo` load (cold: every session a new client and name); then Redis's memory per
# greylist triplet. See docs/benchmarks.md "State store".
#
#   benches/state.sh [-n SESSIONS] [--reps R] [--out DIR]
#
# The three runs have the same dialogue shape: the sessions whose checks fail end at RCPT
# with a 451 (`defer` in the baseline, `greylist` in the others), so what differs is the
# state store's work: one HELO-history update per EHLO, one greylist decision per RCPT of a
# greylisted session.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=3000 REPS=1 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N=$2; shift ;;
    --reps) REPS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "state.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
REDIS_SERVER=${REDIS_SERVER:-/usr/bin/redis-server}
[ -x "$REDIS_SERVER" ] || { echo "SKIP: $REDIS_SERVER not found (apt-get install redis-server)" >&2; exit 0; }

cd "$REPO"
echo "== build" >&2
cargo build --release 2>&1 | tail -n 1 >&2
BIN=$REPO/target/release/heloguard
LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="loadgen" and m.get("executable"): print(m["executable"])' | tail -n 1)
[ -x "$BIN" ] && [ -x "$LOADGEN" ] || { echo "state.sh: build failed" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/heloguard-state-bench.XXXXXX")
[ -n "$OUT" ] || OUT=$REPO/target/bench-results/state-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
RES=$OUT/results.jsonl
: > "$RES"
REDIS_PID=""
cleanup() {
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$TMP" --save "" --appendonly no \
  --daemonize no --loglevel warning >/dev/null 2>&1 &
REDIS_PID=$!
rcli() { python3 - "$REDIS_PORT" "$@" <<'EOF'
import socket, sys
port, args = int(sys.argv[1]), sys.argv[2:]
s = socket.create_connection(("127.0.0.1", port), timeout=5)
s.sendall(("*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)).encode())
f = s.makefile("rb")
line = f.readline().decode().rstrip()
if line.startswith("$") and int(line[1:]) >= 0:
    print(f.read(int(line[1:]) + 2).decode().rstrip())
else:
    print(line.lstrip(":+"))
EOF
}
for _ in $(seq 100); do rcli PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done
info() { rcli INFO "$1" | tr -d '\r' | sed -n "s/^$2://p"; }
redis_cpu() { awk '{print $14+$15}' "/proc/$REDIS_PID/stat"; }
TICKS=$(getconf CLK_TCK)
# The server runs through this wrapper, which samples the CPU time of its state thread
# (`heloguard-state`) every 0.1 s until the process ends: the store's own cost, apart from the
# noise of the rest of the server on a shared machine.
cat > "$TMP/server.sh" <<WRAPPER
#!/bin/sh
pid=\$\$
( while [ -d /proc/\$pid ]; do
    for t in /proc/\$pid/task/*; do
      if [ "\$(cat \$t/comm 2>/dev/null)" = heloguard-state ]; then
        awk '{print \$14+\$15}' \$t/stat > "\$STATE_CPU_FILE.tmp" 2>/dev/null &&
          mv "\$STATE_CPU_FILE.tmp" "\$STATE_CPU_FILE"
      fi
    done
    sleep 0.1
  done ) &
exec "$BIN"
WRAPPER
chmod +x "$TMP/server.sh"

run() { # label policy churn store
  local label=$1 policy=$2 churn=$3 store=$4 rep=$5
  local calls0 cpu0 line
  calls0=$(info commandstats cmdstat_evalsha | sed 's/^calls=\([0-9]*\).*/\1/'); calls0=${calls0:-0}
  cpu0=$(redis_cpu)
  echo 0 > "$TMP/state-cpu-$label"
  line=$(STATE_CPU_FILE=$TMP/state-cpu-$label HELOGUARD_HELO_POLICY=$policy HELOGUARD_HELO_CHURN=$churn HELOGUARD_STATE=$store \
    HELOGUARD_STATE_FILE=$TMP/heloguard-$label.state HELOGUARD_WORKERS=2 \
    "$LOADGEN" helo --server "$TMP/server.sh" --mode cold -n "$N" -c 20 --msgs 1 \
    --workdir "$TMP" --label "$label-$rep")
  local calls1 cpu1
  calls1=$(info commandstats cmdstat_evalsha | sed 's/^calls=\([0-9]*\).*/\1/'); calls1=${calls1:-0}
  cpu1=$(redis_cpu)
  sleep 0.3
  python3 - "$line" "$label" "$((calls1 - calls0))" "$(( (cpu1 - cpu0) ))" "$TICKS" "$N" \
    "$(cat "$TMP/state-cpu-$label")" >> "$RES" <<'EOF'
import json, sys
r = json.loads(sys.argv[1]); label = sys.argv[2]
calls, ticks, hz, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
r["state"] = label
r["state_thread_cpu_ms_per_session"] = round(int(sys.argv[7]) * 1000 / hz / n, 4)
greylisted = sum(v for k, v in r.get("errors", {}).items() if k.startswith("rcpt:451"))
r["sessions_451_at_rcpt"] = greylisted
if label == "redis":
    r["redis_script_calls"] = calls
    r["redis_script_calls_per_session"] = round(calls / n, 3)
    r["redis_cpu_ms_per_session"] = round(ticks * 1000 / hz / n, 4)
print(json.dumps(r))
EOF
  tail -n 1 "$RES" >&2
}

for rep in $(seq "$REPS"); do
  run none "default=defer" 0 "" "$rep"
  run embedded "default=greylist" 5 "" "$rep"
  run redis "default=greylist" 5 "redis://127.0.0.1:$REDIS_PORT/0" "$rep"
  rcli FLUSHALL >/dev/null
done

# Redis memory per triplet: N distinct triplets written by the greylist script itself.
rcli FLUSHALL >/dev/null
M=20000
before=$(info memory used_memory)
python3 - "$REDIS_PORT" "$M" <<'EOF'
import socket, sys
port, m = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
def cmd(*args):
    return ("*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(str(a).encode()), a) for a in args)).encode()
# As RedisStore writes them: heloguard:g:CLIENT\nSENDER\nRECIPIENT = FIRST:0:LAST, PX retry.
buf = b"".join(cmd("SET", "heloguard:g:n:198.51.%d.0\nsender%d@example.net\nuser%d@example.org" % (i % 250, i, i),
                   "1796000000000:0:1796000000000", "PX", 172800000) for i in range(m))
s.sendall(buf)
f = s.makefile("rb")
for _ in range(m):
    f.readline()
EOF
after=$(info memory used_memory)
sample=$(rcli MEMORY USAGE "$(rcli RANDOMKEY)")
python3 - "$before" "$after" "$M" "$sample" >> "$RES" <<'EOF'
import json, sys
b, a, m, sample = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(json.dumps({"tool": "state.sh", "redis_triplets": m, "used_memory_before": b,
                  "used_memory_after": a, "bytes_per_triplet": round((a - b) / m, 1),
                  "memory_usage_of_one_key": int(sample)}))
EOF
tail -n 1 "$RES" >&2
echo "results: $RES" >&2
