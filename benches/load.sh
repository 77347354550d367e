#!/usr/bin/env bash
# heloguard load benchmarks: throughput (smtp-source), HELO checks with real DNS work,
# EHLO latency, STARTTLS sessions (full and resumed handshakes), idle connections (plain and
# after STARTTLS), and optionally Postfix side by side (with --tls for the STARTTLS loads), a
# callgrind instruction count and a perf profile. See docs/benchmarks.md.
#
#   benches/load.sh [--vs-postfix] [--messages N] [--messages-b N] [--messages-c N]
#                   [--helo-sessions N] [--latency-sessions N] [--latency-rate R]
#                   [--same-rate R] [--same-rate-messages N] [--tls-sessions N] [--idle K]
#                   [--callgrind] [--callgrind-messages N] [--perf] [--reps R]
#                   [--only a,b,c,relay,helo,latency,same-rate,tls,idle,tls-idle]
#                   [--haraka DIR] [--out DIR]
#
# same-rate: heloguard's protocol CPU per message and smtp-sink's at one paced rate (default
# 500 messages/s), in the shape of load a (a session per message) and of load b (20
# connections, messages paced over them), so the two are compared at the same work per second;
# once with the scheduler placing threads freely, and once with server and generator both on
# CPU 0 (a wake that crosses CPUs costs an inter-processor interrupt, which on a VM is dear).
# relay: load (a) against heloguard in maildir mode, heloguard relaying to smtp-sink, and,
# with --haraka DIR (installed there by shared/bench/haraka/setup.sh when missing), Haraka 3
# forwarding to the same smtp-sink; the servers alternate within each rep.
# Every server gets a fresh temp spool; everything it started is stopped and removed on exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MSGS_A=10000 MSGS_B=2000 MSGS_C=2000 HELO_N=5000 LAT_N=10000 LAT_RATE=1000 IDLE_K=10000 TLS_N=5000
SAME_RATE=500 SAME_RATE_N=5000
CG_MSGS=500 REPS=1 VS_POSTFIX=0 CALLGRIND=0 PERF=0 ONLY="a,b,c,helo,latency,same-rate,tls,idle,tls-idle" OUT=""
HARAKA_DIR=""
PF_PORT=2625

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --vs-postfix) VS_POSTFIX=1 ;;
    --messages) MSGS_A=$2; shift ;;
    --messages-b) MSGS_B=$2; shift ;;
    --messages-c) MSGS_C=$2; shift ;;
    --helo-sessions) HELO_N=$2; shift ;;
    --latency-sessions) LAT_N=$2; shift ;;
    --latency-rate) LAT_RATE=$2; shift ;;
    --same-rate) SAME_RATE=$2; shift ;;
    --same-rate-messages) SAME_RATE_N=$2; shift ;;
    --tls-sessions) TLS_N=$2; shift ;;
    --idle) IDLE_K=$2; shift ;;
    --callgrind) CALLGRIND=1 ;;
    --callgrind-messages) CG_MSGS=$2; shift ;;
    --perf) PERF=1 ;;
    --reps) REPS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    --haraka) HARAKA_DIR=$2; shift ;;
    -h|--help) usage 0 ;;
    *) echo "load.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# The shared bench tools (bench-run.py, fsync-ceiling.py) live beside the repository.
SHARED=""
for d in "${HELOGUARD_BENCH_SHARED:-}" "$REPO/../shared/bench" "$REPO/../../shared/bench"; do
  if [ -n "$d" ] && [ -f "$d/bench-run.py" ]; then SHARED=$(cd "$d" && pwd); break; fi
done
[ -n "$SHARED" ] || { echo "load.sh: bench tools not found; set HELOGUARD_BENCH_SHARED to the dir with bench-run.py" >&2; exit 2; }

SMTP_SOURCE=$(command -v smtp-source || { [ -x /usr/sbin/smtp-source ] && echo /usr/sbin/smtp-source; } || true)
if [ -z "$SMTP_SOURCE" ]; then
  echo "SKIP: smtp-source not found (it comes with Postfix: apt-get install postfix); skipping loads a, b, c and --vs-postfix" >&2
  ONLY=$(echo ",$ONLY," | sed 's/,a,/,/; s/,b,/,/; s/,c,/,/; s/,relay,/,/'); VS_POSTFIX=0
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge $((IDLE_K * 2 + 200)) ] || echo "load.sh: warning: ulimit -n $(ulimit -n) is low for --idle $IDLE_K" >&2

cd "$REPO"
echo "== build" >&2
cargo build --release 2>&1 | tail -n 2 >&2
BIN=$REPO/target/release/heloguard
LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="loadgen" and m.get("executable"): print(m["executable"])' | tail -n 1)
[ -x "$BIN" ] && [ -x "$LOADGEN" ] || { echo "load.sh: build failed" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/heloguard-bench.XXXXXX")
[ -n "$OUT" ] || OUT=$REPO/target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
RES=$OUT/results.jsonl
: > "$RES"
PIDS=() PF_STARTED=0
cleanup() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && wait "$p" 2>/dev/null || true
  done
  [ "$PF_STARTED" = 1 ] && postfix stop >/dev/null 2>&1 || true
  rm -rf "$TMP"
  echo "load.sh: removed the temp spools; on ext4 without a journal, files created in the next" \
    "5 minutes cost more (recently freed inodes are skipped), so wait before the next run" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # PORT PID SECONDS
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    kill -0 "$2" 2>/dev/null || { echo "load.sh: server $2 exited at startup:" >&2; tail -n 5 "$TMP"/*.log >&2; return 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "load.sh: nothing listens on port $1" >&2; return 1
}
stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# A local DNS server for the plain loads: client.example.org A 127.0.0.1, so that no run
# depends on the machine's resolver.
"$LOADGEN" dns > "$TMP/dns.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q '^dns=' "$TMP/dns.out" && break; sleep 0.1; done
DNS=$(sed -n 's/^dns=//p' "$TMP/dns.out")
[ -n "$DNS" ] || { echo "load.sh: test DNS server did not start" >&2; exit 1; }

# STARTTLS loads: heloguard serves a P-256 certificate made for this run (the key type Postfix
# gets from postfix-setup.sh --tls), so both servers sign with the same algorithm.
TLS_ENV=()
if want tls || want tls-idle; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=mx.bench.test \
    -keyout "$TMP/tls.key" -out "$TMP/tls.crt" >/dev/null 2>&1 ||
    { echo "load.sh: openssl could not make a certificate for the STARTTLS loads" >&2; exit 1; }
  TLS_ENV=(HELOGUARD_TLS_CERT="$TMP/tls.crt" HELOGUARD_TLS_KEY="$TMP/tls.key")
fi

HG_PORT="" HG_PID=""
start_heloguard() { # [prefix command...]; extra env may be exported by the caller
  HG_PORT=$(free_port)
  local spool; spool=$(mktemp -d "$TMP/spool.XXXX")
  env HELOGUARD_LISTEN="127.0.0.1:$HG_PORT" HELOGUARD_SPOOL="$spool" HELOGUARD_DNS="$DNS" \
    HELOGUARD_MIN_FREE_MB=0 HELOGUARD_MAX_CONNECTIONS_PER_IP=0 HELOGUARD_MAX_CONNECTIONS=0 \
    HELOGUARD_HOSTNAME=mx.bench.test RUST_LOG=warn "$@" "$BIN" > "$TMP/heloguard.$HG_PORT.log" 2>&1 &
  HG_PID=$!
  PIDS+=("$HG_PID")
  wait_port "$HG_PORT" "$HG_PID" 60
}

PF_PID=""
start_postfix() {
  # The comparison server on 127.0.0.1:2625, and for the tls loads the setup's own
  # certificate (Debian's default TLS settings alone would pass a check of the level).
  if ! grep -q '^127.0.0.1:2625 inet' /etc/postfix/master.cf 2>/dev/null ||
    { want tls && [ "$(postconf -h smtpd_tls_cert_file 2>/dev/null)" != /etc/postfix/bench-tls/cert.pem ]; }; then
    echo "== postfix-setup.sh $(want tls && echo --tls)" >&2
    if want tls; then bash "$SHARED/postfix-setup.sh" --tls >&2; else bash "$SHARED/postfix-setup.sh" >&2; fi
  fi
  if ! postfix status >/dev/null 2>&1; then postfix start >/dev/null 2>&1; PF_STARTED=1; sleep 1; fi
  PF_PID=$(tr -d ' ' < /var/spool/postfix/pid/master.pid)
  wait_port "$PF_PORT" "$PF_PID" 10
}

# CPU ticks of each thread of PID, summed by name without its number ("worker-1" -> "worker").
thread_ticks() {
  python3 - "$1" <<'PY'
import json, os, re, sys
pid, out = sys.argv[1], {}
for tid in os.listdir("/proc/%s/task" % pid):
    try:
        stat = open("/proc/%s/task/%s/stat" % (pid, tid)).read()
    except OSError:
        continue
    name = re.sub(r"-\d+$", "", stat[stat.index("(") + 1:stat.rindex(")")])
    fields = stat[stat.rindex(")") + 2:].split()
    out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
print(json.dumps(out))
PY
}

# load LABEL PID PORT N smtp-source-args...
# For heloguard the CPU is also split by thread (from /proc, so no profiler runs): the
# protocol work is every thread but the spool writers.
run_load() {
  local label=$1 pid=$2 port=$3 n=$4; shift 4
  echo "== $label ($n messages)" >&2
  local before=""
  case "$label" in heloguard*) before=$(thread_ticks "$pid") ;; esac
  python3 "$SHARED/bench-run.py" --pid "$pid" --label "$label" --messages "$n" -- \
    "$SMTP_SOURCE" "$@" -m "$n" -f load@client.example.org -t rcpt@bench.test \
    -M client.example.org "127.0.0.1:$port" | tee -a "$RES" | cut -c1-200 >&2
  if [ -n "$before" ]; then
    python3 - "$label" "$n" "$(getconf CLK_TCK)" "$before" "$(thread_ticks "$pid")" <<'PY' | tee -a "$RES" >&2
import json, sys
label, n, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a, b = json.loads(sys.argv[4]), json.loads(sys.argv[5])
ms = {k: 1000.0 * (b[k] - a.get(k, 0)) / hz / n for k in b}
protocol = sum(v for k, v in ms.items() if "spool" not in k)
print(json.dumps({"tool": "threads", "label": label, "messages": n, "protocol_ms_per_msg": round(protocol, 4),
                  "spool_ms_per_msg": round(sum(ms.values()) - protocol, 4),
                  "by_thread_ms_per_msg": {k: round(v, 4) for k, v in sorted(ms.items())}}))
PY
  fi
}

loads() { # NAME PID PORT REP
  local who=$1 pid=$2 port=$3 r=$4
  if want a; then run_load "$who/a/smtp-source/r$r" "$pid" "$port" "$MSGS_A" -s 50 -l 1000; fi
  if want b; then run_load "$who/b/smtp-source/r$r" "$pid" "$port" "$MSGS_B" -d -s 20 -l 1000; fi
  if want c; then run_load "$who/c/smtp-source/r$r" "$pid" "$port" "$MSGS_C" -s 50 -l 102400; fi
}

# What no server on this machine can go below, in CPU per message: Postfix's smtp-sink (one
# process, replies only, no disk) under load (a) and (b), and the kernel's CPU for one durable
# 1 KiB file done the Maildir way (create in tmp/, write, fsync, rename, fsync new/; 8 threads,
# batches of 8 as heloguard's writers do). Files are left for the exit cleanup: deleting them
# now would slow the next file creations (ext4 without a journal skips recently freed inodes).
cpu_floor() {
  local sink; sink=$(command -v smtp-sink || { [ -x /usr/sbin/smtp-sink ] && echo /usr/sbin/smtp-sink; } || true)
  if [ -n "$sink" ]; then
    local port; port=$(free_port)
    "$sink" -u nobody "127.0.0.1:$port" 1000 2>/dev/null &
    local spid=$!
    PIDS+=("$spid")
    sleep 0.5
    for load in "a:-s 50 -l 1000" "b:-d -s 20 -l 1000"; do
      # shellcheck disable=SC2086
      python3 "$SHARED/bench-run.py" --pid "$spid" --label "smtp-sink/${load%%:*}/smtp-source/floor" \
        --messages 20000 -- "$SMTP_SOURCE" ${load#*:} -m 20000 -f load@client.example.org \
        -t rcpt@bench.test "127.0.0.1:$port" | tee -a "$RES" | cut -c1-200 >&2
    done
    stop_pid "$spid"
  fi
  python3 - "$TMP/floor" <<'PY' | tee "$OUT/file-floor.txt" >&2
import os, sys, threading, time
base, n, threads, batch = sys.argv[1], 4000, 8, 8
os.makedirs(base + "/tmp"); os.makedirs(base + "/new")
data = b"x" * 1024
def work(w):
    dfd = os.open(base + "/new", os.O_RDONLY)
    for b in range(n // threads // batch):
        names = []
        for j in range(batch):
            name = "%d.%d.%d" % (w, b, j)
            fd = os.open(base + "/tmp/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data); os.fsync(fd); os.close(fd)
            os.rename(base + "/tmp/" + name, base + "/new/" + name)
        os.fsync(dfd)
    os.close(dfd)
t0 = os.times()
ts = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
t1 = os.times()
print("durable 1 KiB file: kernel CPU %.3f ms/file" % ((t1.system - t0.system) * 1000.0 / n))
PY
}

start_heloguard env "${TLS_ENV[@]}"
if [ "$VS_POSTFIX" = 1 ]; then start_postfix; fi
if want a || want b || want c; then
  for r in $(seq "$REPS"); do
    loads heloguard "$HG_PID" "$HG_PORT" "$r"
    if [ "$VS_POSTFIX" = 1 ]; then loads postfix "$PF_PID" "$PF_PORT" "$r"; fi
  done
fi

if want relay; then
  # Load (a) through the relay modes: the next hop is Postfix's smtp-sink (replies only, no
  # disk), for heloguard and Haraka alike; heloguard in maildir mode is the yardstick. Only
  # each server's own process tree is measured.
  sink=$(command -v smtp-sink || { [ -x /usr/sbin/smtp-sink ] && echo /usr/sbin/smtp-sink; } || true)
  [ -n "$sink" ] || { echo "load.sh: smtp-sink not found (apt-get install postfix)" >&2; exit 2; }
  SINK_PORT=$(free_port)
  "$sink" -u nobody "127.0.0.1:$SINK_PORT" 1000 2>"$TMP/smtp-sink.log" &
  SINK_PID=$!
  PIDS+=("$SINK_PID")
  wait_port "$SINK_PORT" "$SINK_PID" 10
  MD_PORT=$HG_PORT MD_PID=$HG_PID
  start_heloguard HELOGUARD_DELIVER="smtp://127.0.0.1:$SINK_PORT" HELOGUARD_DOMAINS=bench.test
  RL_PORT=$HG_PORT RL_PID=$HG_PID
  HK_PID=""
  if [ -n "$HARAKA_DIR" ]; then
    [ -x "$HARAKA_DIR/run.sh" ] || bash "$SHARED/haraka/setup.sh" "$HARAKA_DIR" >&2
    HK_PORT=$(free_port)
    # nodes=0: one process, as in shared/bench/haraka/README.md; the same test DNS server.
    "$HARAKA_DIR/run.sh" "$HK_PORT" "$SINK_PORT" 0 "$DNS" > "$TMP/haraka.log" 2>&1 &
    HK_PID=$!
    PIDS+=("$HK_PID")
    wait_port "$HK_PORT" "$HK_PID" 60
  fi
  for r in $(seq "$REPS"); do
    run_load "heloguard/relay-a/smtp-source/r$r" "$MD_PID" "$MD_PORT" "$MSGS_A" -s 50 -l 1000
    run_load "heloguard-relay/relay-a/smtp-source/r$r" "$RL_PID" "$RL_PORT" "$MSGS_A" -s 50 -l 1000
    if [ -n "$HK_PID" ]; then
      run_load "haraka/relay-a/smtp-source/r$r" "$HK_PID" "$HK_PORT" "$MSGS_A" -s 50 -l 1000
    fi
  done
  stop_pid "$RL_PID"
  [ -z "$HK_PID" ] || stop_pid "$HK_PID"
  stop_pid "$SINK_PID"
  HG_PORT=$MD_PORT HG_PID=$MD_PID
fi

if want latency; then
  # One client thread drives every connection (--events), so 50 client threads queueing for
  # the two cores are not counted as server latency. c1 and c50 are closed loops (a session
  # starts when one ends): at c50 client and server saturate the two cores together, and a
  # reply waits behind the others whatever the server (Little's law), so smtp-sink, which only
  # answers, runs the same load as the floor of this generator on this machine. paced: an
  # open loop, LAT_RATE sessions/s arriving over at most 50 connections, as mail reaches an MX.
  SINK_BIN=$(command -v smtp-sink || { [ -x /usr/sbin/smtp-sink ] && echo /usr/sbin/smtp-sink; } || true)
  LAT_SINK_PORT=""
  if [ -n "$SINK_BIN" ]; then
    LAT_SINK_PORT=$(free_port)
    "$SINK_BIN" -u nobody "127.0.0.1:$LAT_SINK_PORT" 1000 2>/dev/null &
    LAT_SINK_PID=$!
    PIDS+=("$LAT_SINK_PID")
    wait_port "$LAT_SINK_PORT" "$LAT_SINK_PID" 10
  fi
  lat_run() { # WHO PORT LABEL-SUFFIX ARGS...
    local who=$1 port=$2 suffix=$3; shift 3
    "$LOADGEN" latency --events --addr "127.0.0.1:$port" -n "$LAT_N" --label "$who/$suffix" "$@" | tee -a "$RES" >&2
  }
  for r in $(seq "$REPS"); do
    for c in 1 50; do
      echo "== EHLO latency, $c concurrent, rep $r" >&2
      lat_run heloguard "$HG_PORT" "c$c/r$r" -c "$c"
      if [ "$VS_POSTFIX" = 1 ]; then lat_run postfix "$PF_PORT" "c$c/r$r" -c "$c"; fi
      if [ "$c" = 50 ] && [ -n "$LAT_SINK_PORT" ]; then lat_run smtp-sink "$LAT_SINK_PORT" "c$c/r$r" -c "$c"; fi
    done
    echo "== EHLO latency, $LAT_RATE sessions/s over at most 50 connections, rep $r" >&2
    lat_run heloguard "$HG_PORT" "paced$LAT_RATE/r$r" -c 50 --rate "$LAT_RATE"
    if [ "$VS_POSTFIX" = 1 ]; then lat_run postfix "$PF_PORT" "paced$LAT_RATE/r$r" -c 50 --rate "$LAT_RATE"; fi
    if [ -n "$LAT_SINK_PORT" ]; then lat_run smtp-sink "$LAT_SINK_PORT" "paced$LAT_RATE/r$r" -c 50 --rate "$LAT_RATE"; fi
  done
  [ -z "$LAT_SINK_PORT" ] || stop_pid "$LAT_SINK_PID"
fi
if want same-rate; then
  # Closed loops (loads a and b) let smtp-sink, which never waits for a disk, run several times
  # faster than a server that makes each message durable; a server that sleeps between
  # arrivals pays a wake for each of them. Here both get the same paced arrivals, and the CPU
  # of every thread but the spool writers (all of smtp-sink's) is read from /proc around them.
  SINK_BIN=$(command -v smtp-sink || { [ -x /usr/sbin/smtp-sink ] && echo /usr/sbin/smtp-sink; } || true)
  [ -n "$SINK_BIN" ] || { echo "load.sh: smtp-sink not found (apt-get install postfix)" >&2; exit 2; }
  SR_SINK_PORT=$(free_port)
  "$SINK_BIN" -u nobody "127.0.0.1:$SR_SINK_PORT" 1000 2>/dev/null &
  SR_SINK_PID=$!
  PIDS+=("$SR_SINK_PID")
  wait_port "$SR_SINK_PORT" "$SR_SINK_PID" 10
  ALL_CPUS=$(taskset -c -p $$ | sed 's/.*: //')
  same_rate_run() { # WHO PID PORT SHAPE PLACEMENT REP LOADGEN-ARGS...
    local who=$1 pid=$2 port=$3 shape=$4 placement=$5 r=$6; shift 6
    echo "== same rate, $who, shape of load $shape, $placement, $SAME_RATE messages/s, rep $r" >&2
    local before gen pin=()
    if [ "$placement" = cpu0 ]; then
      taskset -a -c -p 0 "$pid" >/dev/null
      pin=(taskset -c 0)
    fi
    before=$(thread_ticks "$pid")
    gen=$("${pin[@]}" "$LOADGEN" latency --events --addr "127.0.0.1:$port" --label "$who/same-rate-$shape/r$r" "$@")
    local after; after=$(thread_ticks "$pid")
    [ "$placement" = free ] || taskset -a -c -p "$ALL_CPUS" "$pid" >/dev/null
    python3 - "$who" "$shape" "$placement" "$r" "$(getconf CLK_TCK)" "$before" "$after" "$gen" <<'PY' | tee -a "$RES" >&2
import json, sys
who, shape, placement, rep, hz = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
a, b, gen = json.loads(sys.argv[6]), json.loads(sys.argv[7]), json.loads(sys.argv[8])
n = max(1, gen["messages_ok"])
ms = {k: 1000.0 * (b[k] - a.get(k, 0)) / hz / n for k in b}
protocol = sum(v for k, v in ms.items() if "spool" not in k)
print(json.dumps({"tool": "same-rate", "who": who, "shape": shape, "placement": placement, "rep": rep,
                  "rate": gen["message_rate"] or gen["rate"], "messages": gen["messages_ok"],
                  "msgs_per_s": gen["msgs_per_s"], "late_starts": gen["late_starts"],
                  "errors": sum(gen["errors"].values()), "protocol_ms_per_msg": round(protocol, 4),
                  "by_thread_ms_per_msg": {k: round(v, 4) for k, v in sorted(ms.items())}}))
PY
  }
  SR_PER_CONN=$(( (SAME_RATE_N + 19) / 20 ))
  for r in $(seq "$REPS"); do
    for placement in free cpu0; do
      for who in heloguard smtp-sink; do
        if [ "$who" = heloguard ]; then pid=$HG_PID port=$HG_PORT; else pid=$SR_SINK_PID port=$SR_SINK_PORT; fi
        same_rate_run "$who" "$pid" "$port" a "$placement" "$r" -c 50 -n "$SAME_RATE_N" --rate "$SAME_RATE"
        same_rate_run "$who" "$pid" "$port" b "$placement" "$r" -c 20 -n 20 --msgs "$SR_PER_CONN" \
          --message-rate "$SAME_RATE"
      done
    done
  done
  stop_pid "$SR_SINK_PID"
fi

# tls_load WHO PID PORT REP MODE: 50 concurrent, 1 message (1 KiB) per session, each session
# EHLO, STARTTLS, handshake, EHLO, MAIL, RCPT, DATA, QUIT. MODE full: no session is resumed;
# resume: the client keeps tickets and session ids, as a sending MTA's TLS cache does.
tls_load() {
  local who=$1 pid=$2 port=$3 r=$4 mode=$5 extra=()
  [ "$mode" = resume ] && extra=(--resume)
  echo "== STARTTLS ($mode handshakes), $who, $TLS_N sessions" >&2
  python3 "$SHARED/bench-run.py" --pid "$pid" --label "$who/tls-$mode/loadgen/r$r" --messages "$TLS_N" -- \
    "$LOADGEN" latency --events --starttls "${extra[@]}" --addr "127.0.0.1:$port" -c 50 -n "$TLS_N" \
    --label "$who/tls-$mode/r$r" | tee -a "$RES" | cut -c1-200 >&2
}
if want tls; then
  for r in $(seq "$REPS"); do
    for mode in full resume; do
      tls_load heloguard "$HG_PID" "$HG_PORT" "$r" "$mode"
      if [ "$VS_POSTFIX" = 1 ]; then tls_load postfix "$PF_PID" "$PF_PORT" "$r" "$mode"; fi
    done
  done
fi
stop_pid "$HG_PID"

if want helo; then
  # loadgen starts its own heloguard (PROXY listener, HELOGUARD_DNS = its test DNS server).
  # On and off alternate, --reps times, so drift on a shared machine hits both alike.
  for r in $(seq "$REPS"); do
    for mode in cold warm; do
      for pol in "on:default=tag" "off:default=off,syntax=off"; do
        echo "== HELO checks ${pol%%:*}, $mode cache, rep $r" >&2
        HELOGUARD_HELO_POLICY=${pol#*:} HELOGUARD_MAX_CONNECTIONS=0 HELOGUARD_HOSTNAME=mx.bench.test \
          "$LOADGEN" helo --server "$BIN" --mode "$mode" -c 20 -n "$HELO_N" --workdir "$TMP" \
          --label "helo/${pol%%:*}/$mode/r$r" | tee -a "$RES" >&2
      done
    done
  done
fi

if want idle; then
  echo "== $IDLE_K idle connections" >&2
  start_heloguard
  "$LOADGEN" idle --addr "127.0.0.1:$HG_PORT" -k "$IDLE_K" --pid "$HG_PID" --hold 5 \
    --label "heloguard/idle" | tee -a "$RES" >&2
  stop_pid "$HG_PID"
fi

if want tls-idle; then
  echo "== $IDLE_K idle connections after STARTTLS" >&2
  start_heloguard env "${TLS_ENV[@]}"
  "$LOADGEN" idle --starttls --addr "127.0.0.1:$HG_PORT" -k "$IDLE_K" --pid "$HG_PID" --hold 5 \
    --label "heloguard/idle-tls" | tee -a "$RES" >&2
  stop_pid "$HG_PID"
fi

if [ "$PERF" = 1 ] && [ -n "$SMTP_SOURCE" ]; then
  echo "== perf record, load a" >&2
  start_heloguard
  perf record -q -e cpu-clock -g -p "$HG_PID" -o "$OUT/perf.data" 2>"$TMP/perf.err" &
  PERF_PID=$!; PIDS+=("$PERF_PID"); sleep 0.5
  run_load "heloguard-perf/a/smtp-source/r1" "$HG_PID" "$HG_PORT" "$MSGS_A" -s 50 -l 1000
  kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true
  perf report -i "$OUT/perf.data" --stdio --no-children -g none --sort sym --percent-limit 0.3 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -n 10 > "$OUT/perf-top10.txt"
  perf report -i "$OUT/perf.data" --stdio --no-children -g none --sort comm --percent-limit 0.5 2>/dev/null |
    grep -v '^#' | grep -v '^$' > "$OUT/perf-threads.txt"
  perf report -i "$OUT/perf.data" --stdio --no-children -g caller,0.5,callee --percent-limit 2 \
    2>/dev/null > "$OUT/perf-callers.txt" || true
  stop_pid "$HG_PID"
fi

if [ "$PERF" = 1 ] && want tls; then
  for mode in full resume; do
    echo "== perf record, STARTTLS ($mode handshakes)" >&2
    start_heloguard env "${TLS_ENV[@]}"
    perf record -q -e cpu-clock -g -p "$HG_PID" -o "$OUT/perf-tls-$mode.data" 2>"$TMP/perf.err" &
    PERF_PID=$!; PIDS+=("$PERF_PID"); sleep 0.5
    tls_load heloguard-perf "$HG_PID" "$HG_PORT" 1 "$mode"
    kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true
    perf report -i "$OUT/perf-tls-$mode.data" --stdio --no-children -g none --sort sym --percent-limit 0.3 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -n 10 > "$OUT/perf-tls-$mode-top10.txt"
    perf report -i "$OUT/perf-tls-$mode.data" --stdio --no-children -g none --sort sym --percent-limit 0 2>/dev/null |
      grep -v '^#' | grep -v '^$' > "$OUT/perf-tls-$mode-all.txt"
    perf report -i "$OUT/perf-tls-$mode.data" --stdio --no-children -g none --sort comm --percent-limit 0.5 2>/dev/null |
      grep -v '^#' | grep -v '^$' > "$OUT/perf-tls-$mode-threads.txt"
    stop_pid "$HG_PID"
  done
fi

if [ "$CALLGRIND" = 1 ] && [ -n "$SMTP_SOURCE" ]; then
  # Ir(N messages) - Ir(no load), over N: start-up and shutdown cancel out.
  for w in 1 2; do
    for n in 0 "$CG_MSGS"; do
      echo "== callgrind, workers=$w, $n messages" >&2
      start_heloguard HELOGUARD_WORKERS=$w valgrind --tool=callgrind --trace-children=no \
        --callgrind-out-file="$OUT/callgrind.w$w.n$n.out"
      sleep 1
      if [ "$n" -gt 0 ]; then
        "$SMTP_SOURCE" -s 5 -m "$n" -l 1000 -f load@client.example.org -t rcpt@bench.test \
          -M client.example.org "127.0.0.1:$HG_PORT"
      fi
      sleep 1
      stop_pid "$HG_PID"
      ir=$(sed -n 's/^\(summary\|totals\): *//p' "$OUT/callgrind.w$w.n$n.out" | head -n 1)
      callgrind_annotate "$OUT/callgrind.w$w.n$n.out" 2>/dev/null | sed -n '/file:function/,$p' | head -n 25 \
        > "$OUT/callgrind.w$w.n$n.top.txt" || true
      echo "{\"tool\":\"callgrind\",\"workers\":$w,\"messages\":$n,\"ir\":${ir:-0}}" | tee -a "$RES" >&2
    done
  done
fi

# Last, because fsync-ceiling.py deletes its files between writer counts, and new files made
# soon after many deletions cost more (ext4 without a journal skips recently freed inodes).
if [ "$VS_POSTFIX" = 1 ] && { want a || want b || want c; }; then
  cpu_floor
  echo "== fsync ceiling on $TMP" >&2
  python3 "$SHARED/fsync-ceiling.py" "$TMP" 2000 | tee "$OUT/fsync.txt" >&2
fi

# ---- report ---------------------------------------------------------------------------------
python3 - "$RES" "$OUT" <<'EOF'
import json, os, re, statistics, sys
res, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(res) if l.startswith("{")]
med = lambda xs: statistics.median(xs) if xs else None
def f(x, nd=0):
    return "-" if x is None else ("%.*f" % (nd, x))
bench = {}
for r in rows:
    if r.get("tool") != "loadgen" and "server_cpu_s" in r and r.get("label", "").count("/") == 3:
        who, load, _, _ = r["label"].split("/")
        bench.setdefault((load, who), []).append(r)
if bench:
    print("\n### Throughput (smtp-source through bench-run.py; median of reps)\n")
    print("| load | server | msgs/s | server CPU ms/msg | peak RSS MB (sum) | peak PSS MB | procs | contaminated |")
    print("|---|---|---|---|---|---|---|---|")
summary = {}
for (load, who), rs in sorted(bench.items()):
    rate = med([r["msgs_per_s"] for r in rs])
    cpu = med([1000.0 * r["server_cpu_s"] / (r["msgs_per_s"] * r["wall_s"]) for r in rs])
    rss = med([r["mem_peak"]["rss_kb"] / 1024 for r in rs])
    pss = med([r["mem_peak"]["pss_kb"] / 1024 for r in rs])
    summary[(load, who)] = (rate, cpu)
    print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (load, who, f(rate), f(cpu, 3), f(rss, 1), f(pss, 1),
          max(r["mem_peak"]["procs"] for r in rs), sum(bool(r["contaminated"]) for r in rs)))
ceil = {}
fp = os.path.join(out, "fsync.txt")
if os.path.exists(fp):
    for line in open(fp):
        m = re.match(r"writers=(\d+) files/s=(\d+)", line)
        if m:
            ceil[int(m.group(1))] = int(m.group(2))
    print("\nfsync ceiling (same disk, same run): " + ", ".join("%d writers %d files/s" % kv for kv in sorted(ceil.items())))
floor = os.path.join(out, "file-floor.txt")
sink = {r["label"].split("/")[1]: r for r in rows if r.get("label", "").startswith("smtp-sink/") and "server_cpu_s" in r}
if sink or os.path.exists(floor):
    print("\nCPU floor on this machine (no server can do less per message):")
    for load, r in sorted(sink.items()):
        print("- smtp-sink (replies only, no disk), load %s: %.3f ms/msg at %.0f msgs/s" % (load, 1000.0 * r["server_cpu_s"] / (r["msgs_per_s"] * r["wall_s"]), r["msgs_per_s"]))
    if os.path.exists(floor):
        print("- " + open(floor).read().strip())
threads = [r for r in rows if r.get("tool") == "threads" and r["label"].split("/")[0] == "heloguard"]
if threads:
    print("\nProtocol CPU (every thread but the spool writers, from /proc by thread) against smtp-sink's:")
    by_load = {}
    for r in threads:
        by_load.setdefault(r["label"].split("/")[1], []).append(r["protocol_ms_per_msg"])
    for load, ps in sorted(by_load.items()):
        s = sink.get(load)
        s_ms = 1000.0 * s["server_cpu_s"] / (s["msgs_per_s"] * s["wall_s"]) if s else None
        print("- load %s: %s ms/msg (median of %d; %s), smtp-sink %s ms/msg, ratio %s" % (
            load, f(med(ps), 3), len(ps), ", ".join(f(p, 3) for p in ps), f(s_ms, 3),
            "-" if s_ms is None else "%.2fx" % (med(ps) / s_ms)))
file_ms = None
if os.path.exists(floor):
    m = re.search(r"([\d.]+) ms/file", open(floor).read())
    file_ms = float(m.group(1)) if m else None
loads = sorted({l for l, _ in summary})
if any((l, "postfix") in summary for l in loads):
    print("\n| load | heloguard/Postfix msgs/s | heloguard/Postfix CPU per msg | floor/Postfix CPU per msg (smtp-sink + durable file) | heloguard vs 8-writer fsync ceiling |")
    print("|---|---|---|---|---|")
    for l in loads:
        h, p, k = summary.get((l, "heloguard")), summary.get((l, "postfix")), summary.get((l, "smtp-sink"))
        if h and p:
            c8 = ("%.0f%%" % (100.0 * h[0] / ceil[8])) if 8 in ceil else "-"
            fl = ("%.3f" % ((k[1] + file_ms) / p[1])) if k and file_ms is not None else "-"
            print("| %s | %.2fx | %.3f | %s | %s |" % (l, h[0] / p[0], h[1] / p[1], fl, c8))
relay = {who: v for (l, who), v in summary.items() if l == "relay-a"}
if "heloguard-relay" in relay:
    rl = relay["heloguard-relay"]
    print("\n### Relay mode (load a: 50 concurrent, 1 msg/conn, 1 KiB; next hop smtp-sink)\n")
    print("| comparison | msgs/s ratio | CPU per message ratio |")
    print("|---|---|---|")
    if "heloguard" in relay:
        md = relay["heloguard"]
        print("| heloguard relay / heloguard maildir | %.2fx | %.2f |" % (rl[0] / md[0], rl[1] / md[1]))
    if "haraka" in relay:
        hk = relay["haraka"]
        print("| heloguard relay / Haraka | %.2fx | %.2f (1/%.1f) |" % (rl[0] / hk[0], rl[1] / hk[1], hk[1] / rl[1]))
same = [r for r in rows if r.get("tool") == "same-rate"]
if same:
    print("\n### Protocol CPU at the same paced rate (loadgen; every thread but the spool writers, from /proc)\n")
    print("| shape | placement | rate msgs/s | heloguard ms/msg | smtp-sink ms/msg | ratio (medians) | late starts h/s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, placement in sorted({(r["shape"], r["placement"]) for r in same}):
        h = [r for r in same if (r["shape"], r["placement"], r["who"]) == (shape, placement, "heloguard")]
        s = [r for r in same if (r["shape"], r["placement"], r["who"]) == (shape, placement, "smtp-sink")]
        hm, sm = med([r["protocol_ms_per_msg"] for r in h]), med([r["protocol_ms_per_msg"] for r in s])
        print("| %s | %s | %s | %s (%s) | %s (%s) | %s | %d/%d | %d |" % (
            shape, placement, f(med([r["rate"] for r in h + s])), f(hm, 3), ", ".join(f(r["protocol_ms_per_msg"], 3) for r in h),
            f(sm, 3), ", ".join(f(r["protocol_ms_per_msg"], 3) for r in s),
            "-" if not hm or not sm else "%.2fx" % (hm / sm), sum(r["late_starts"] for r in h),
            sum(r["late_starts"] for r in s), sum(r["errors"] for r in h + s)))
lat = [r for r in rows if r.get("mode") == "latency"]
if lat:
    print("\n### EHLO latency (loadgen latency: banner, EHLO, 1 message, QUIT per session)\n")
    print("| server/load | sessions/s | EHLO p50 us | p90 us | p99 us | max us | session p99 ms | late starts | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in lat:
        e = r["ehlo_us"]
        late = r.get("late_starts") if r.get("rate") else None
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (r["label"], f(r["sessions_per_s"]), f(e["p50"]), f(e["p90"]),
              f(e["p99"]), f(e["max"]), f(r["session_ms"]["p99"], 1), f(late), sum(r["errors"].values())))
    groups = {}
    for r in lat:
        groups.setdefault("/".join(r["label"].split("/")[:2]), []).append(r["ehlo_us"])
    for g, es in sorted(groups.items()):
        if len(es) > 1:
            print("\n%s, median of %d runs: EHLO p50 %s us, p99 %s us" % (g, len(es), f(med([e["p50"] for e in es])), f(med([e["p99"] for e in es]))))
helo = [r for r in rows if r.get("mode") == "helo"]
if helo:
    print("\n### HELO checks (loadgen helo, PROXY v1, 20 concurrent, 1 message/session)\n")
    print("| checks | cache | sessions/s | server CPU ms/session | DNS queries/session | EHLO p99 us | peak RSS MB | errors |")
    print("|---|---|---|---|---|---|---|---|")
    by = {}
    for r in helo:
        parts = r["label"].split("/")
        pol, mode = parts[1], parts[2]
        by.setdefault((pol, mode), []).append(r["server_cpu_ms_per_session"])
        print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (pol, mode, f(r["sessions_per_s"]), f(r["server_cpu_ms_per_session"], 3),
              f(r["dns_queries_per_session"], 2), f(r["ehlo_us"]["p99"]), f(r["server_peak_rss_kb"] / 1024, 1), sum(r["errors"].values())))
    for mode in ("cold", "warm"):
        on, off = by.get(("on", mode)), by.get(("off", mode))
        if on and off and statistics.median(off) > 0:
            print("\nchecks on/off CPU per session, %s (median of %d): %.2fx" % (mode, len(on), statistics.median(on) / statistics.median(off)))
tls = [r for r in rows if "/tls-" in r.get("label", "") and isinstance(r.get("gen"), dict) and r["gen"].get("tls")]
if tls:
    print("\n### STARTTLS (loadgen latency --events --starttls: 50 concurrent, 1 message of 1 KiB per session)\n")
    print("| run | msgs/s | server CPU ms/msg | full handshakes | resumed | EHLO p99 us | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in tls:
        g = r["gen"]
        print("| %s | %s | %s | %d | %d | %s | %s |" % (r["label"], f(r["msgs_per_s"]),
              f(1000.0 * r["server_cpu_s"] / max(1, g["messages_ok"]), 3), g["tls"]["full"], g["tls"]["resumed"],
              f(g["ehlo_us"]["p99"]), sum(g["errors"].values())))
# Where a STARTTLS session's CPU goes, by symbol family (self time).
families = [
    ("ECDHE and signature (ring: X25519, P-256, ECDSA)", r"x25519|25519|p256|nistz256|ecp_|ecdsa|ecdh|suite_b|limbs_|bn_mul|LIMBS_|fiat_|ec::"),
    ("hashes and key schedule (SHA-2, HMAC, HKDF)", r"sha256|sha512|sha2|hmac|hkdf|digest::"),
    ("record encryption (AES-GCM, ChaCha20-Poly1305)", r"aes|gcm|gfmul|ghash|chacha|poly1305"),
    ("rustls itself", r"rustls::"),
]
for mode in ("full", "resume"):
    pa = os.path.join(out, "perf-tls-%s-all.txt" % mode)
    if not os.path.exists(pa):
        continue
    share = {name: 0.0 for name, _ in families}
    kernel = other = 0.0
    for line in open(pa):
        m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        pct, where, sym = float(m.group(1)), m.group(2), m.group(3)
        if where == "k":
            kernel += pct
            continue
        for name, rx in families:
            if re.search(rx, sym, re.I):
                share[name] += pct
                break
        else:
            other += pct
    print("\n### Where the server's CPU goes under STARTTLS (%s handshakes; perf, self time)\n" % mode)
    for name, _ in families:
        print("- %s: %.1f%%" % (name, share[name]))
    print("- kernel (syscalls, TCP, scheduling): %.1f%%\n- everything else (SMTP, loop, workers, spool): %.1f%%" % (kernel, other))
    top = os.path.join(out, "perf-tls-%s-top10.txt" % mode)
    if os.path.exists(top):
        print("\ntop 10:\n```\n" + open(top).read().rstrip() + "\n```")
    th = os.path.join(out, "perf-tls-%s-threads.txt" % mode)
    if os.path.exists(th):
        print("\nby thread:\n```\n" + open(th).read().rstrip() + "\n```")
for r in rows:
    if r.get("mode") == "idle":
        print("\n### Idle connections%s\n" % (" after STARTTLS" if r.get("starttls") else ""))
        print("%d asked, %d got a banner, %d still open after %ss; server RSS %.1f MB -> %.1f MB with them (%.1f kB/conn); "
              "a new client's banner in %s ms, EHLO in %s ms; errors %s" % (r["k"], r["banner_220"], r["still_open_after_hold"], r["hold_s"],
              r["rss_before_kb"] / 1024, r["rss_with_idle_kb"] / 1024, r["per_conn_rss_kb"], r["probe_banner_ms"], r["probe_ehlo_ms"], r["errors"]))
cg = {(r["workers"], r["messages"]): r["ir"] for r in rows if r.get("tool") == "callgrind"}
if cg:
    print("\n### callgrind (instructions per message, 1 KiB, 5 concurrent)\n")
    for w in (1, 2):
        ns = sorted(n for (ww, n) in cg if ww == w and n > 0)
        if ns and (w, 0) in cg:
            n = ns[-1]
            print("workers=%d: %d messages, Ir %d (idle run %d): %.0f instructions/message" % (w, n, cg[(w, n)], cg[(w, 0)], (cg[(w, n)] - cg[(w, 0)]) / n))
p = os.path.join(out, "perf-top10.txt")
if os.path.exists(p):
    print("\n### perf top 10 (load a, cpu-clock, self time)\n")
    print("```\n" + open(p).read().rstrip() + "\n```")
    t = os.path.join(out, "perf-threads.txt")
    if os.path.exists(t):
        print("\nby thread:\n```\n" + open(t).read().rstrip() + "\n```")
print("\nraw results: " + res)
EOF
