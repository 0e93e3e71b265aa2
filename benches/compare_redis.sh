#!/usr/bin/env bash
# bucketly side by side with Redis, on loopback, in one run. See benches/README.md.
#
#   benches/compare_redis.sh            # every workload, median of 3 rounds each
#   ROUNDS=1 SECS=3 benches/compare_redis.sh
#
# Installs Debian's redis-server and redis-tools if they are missing, builds the
# release binaries, starts fresh servers on free ports in a temporary directory, and
# stops them at the end. Redis is measured with redis-benchmark, bucketly with
# `bucketly bench`; each round runs the Redis side then the bucketly side of a
# workload, so both see the same machine state.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
MEMBERS=${MEMBERS:-1000000}

need_redis() {
    command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && command -v redis-cli >/dev/null
}
if ! need_redis; then
    echo "installing redis-server and redis-tools (Debian packages)" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y redis-server redis-tools >/dev/null ||
        { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y redis-server redis-tools >/dev/null; }
fi
cargo build --release --quiet --bin bucketlyd --bin bucketly
BIN=target/release

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# start_redis NAME ARGS... : a fresh redis-server in $WORK/NAME; sets RPORT and RPID.
start_redis() {
    local name=$1; shift
    mkdir -p "$WORK/$name"
    RPORT=$(free_port)
    redis-server --port "$RPORT" --bind 127.0.0.1 --dir "$WORK/$name" --save '' "$@" \
        >"$WORK/$name.log" 2>&1 &
    RPID=$!
    PIDS+=("$RPID")
    until redis-cli -p "$RPORT" ping >/dev/null 2>&1; do sleep 0.1; done
}

# start_bucketly NAME ARGS... : a fresh bucketlyd with its own database; sets BPORT, BPID.
start_bucketly() {
    local name=$1; shift
    BPORT=$(free_port)
    "$BIN/bucketlyd" "$WORK/$name.redb" --port "$BPORT" "$@" >"$WORK/$name.log" 2>&1 &
    BPID=$!
    PIDS+=("$BPID")
    until "$BIN/bucketly" --port "$BPORT" ping >/dev/null 2>&1; do sleep 0.1; done
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# redis_rps ARGS... : requests/s of one redis-benchmark INCR run.
redis_rps() {
    redis-benchmark -p "$RPORT" -t incr --csv "$@" 2>/dev/null |
        awk -F'"' '/^"INCR"/ {print $4}'
}

# bucketly_eps ARGS... : events/s of one `bucketly bench` run.
bucketly_eps() {
    "$BIN/bucketly" --port "$BPORT" --user admin --password admin bench --json -q "$@" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["events_per_sec"]))'
}

median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

ROWS=()
# row NAME TARGET REDIS BUCKETLY
row() { ROWS+=("$1|$2|$3|$4"); }

# versus NAME TARGET "REDIS-ARGS" "BUCKETLY-ARGS": median of ROUNDS interleaved runs.
versus() {
    local name=$1 target=$2 rargs=$3 bargs=$4 r=() b=()
    for _ in $(seq "$ROUNDS"); do
        # shellcheck disable=SC2086
        r+=("$(redis_rps $rargs)")
        # shellcheck disable=SC2086
        b+=("$(bucketly_eps $bargs --duration "$SECS")")
    done
    row "$name" "$target" "$(median "${r[@]}")" "$(median "${b[@]}")"
    echo "  $name: redis ${r[*]}  bucketly ${b[*]}" >&2
}

echo "in-memory: redis-server (no persistence) vs bucketlyd, counter bucket" >&2
start_redis mem --appendonly no
start_bucketly mem
versus "(a) 1 conn, unpipelined" ">= 1.2x" "-c 1 -P 1 -n 100000" "-c 1 -P 1"
versus "(b) 50 conns, unpipelined" ">= 1.2x" "-c 50 -P 1 -n 250000" "-c 50 -P 1"
versus "(c) 50 conns, pipelined 64" ">= 2x" "-c 50 -P 64 -n 4000000" "-c 50 -P 64"
d=()
for _ in $(seq "$ROUNDS"); do d+=("$(bucketly_eps -c 50 -P 1 -e 100 --duration "$SECS")"); done
row "(d) SEND of 100 events, 50 conns" ">= 1000000 ev/s" "-" "$(median "${d[@]}")"
echo "  (d): bucketly ${d[*]}" >&2
stop "$BPID"
# For the record: (a) without busy polling (bucketlyd --busy-poll-us 0), the
# daemon's default before it polled for 50 us after each read.
start_bucketly nopoll --busy-poll-us 0
versus "(a) same, --busy-poll-us 0" "(for the record)" "-c 1 -P 1 -n 100000" "-c 1 -P 1"
stop "$RPID"; stop "$BPID"

echo "durable: redis appendonly yes, appendfsync always vs a durable bucket" >&2
start_redis aof --appendonly yes --appendfsync always
start_bucketly durable
versus "(e) durable, 50 conns, unpipelined" ">= 1x" "-c 50 -P 1 -n 100000" "-c 50 -P 1 --durable"
versus "(e) durable, 50 conns, pipelined 64" ">= 1x" "-c 50 -P 64 -n 1000000" "-c 50 -P 64 --durable"
stop "$RPID"; stop "$BPID"

echo "memory: $MEMBERS distinct 16-byte members, one set / one unique bucket" >&2
start_redis set --appendonly no
# Growing a Lua table of ~1M keys rehashes it in one send; that takes longer than the
# default 100 ms budget (see benches/README.md), so the budget is raised here.
start_bucketly set --handler-memory-mib 4096 --handler-time-ms 10000
python3 - "$MEMBERS" <<'EOF' | redis-cli -p "$RPORT" --pipe >/dev/null
import sys
out = sys.stdout
for i in range(int(sys.argv[1])):
    m = "%016x" % i
    out.write("*3\r\n$4\r\nSADD\r\n$1\r\nk\r\n$16\r\n%s\r\n" % m)
EOF
[ "$(redis-cli -p "$RPORT" scard k)" = "$MEMBERS" ] || { echo "redis set has the wrong size" >&2; exit 1; }
"$BIN/bucketly" --port "$BPORT" --user admin --password admin bench --json -q --handler unique \
    --bucket set --keep --sequential --keys "$MEMBERS" -c 1 -P 16 -e 100 -n $((MEMBERS / 100)) >/dev/null
got=$("$BIN/bucketly" --port "$BPORT" --user admin --password admin view set k)
[ "$got" = "$MEMBERS" ] || { echo "unique bucket counts $got, expected $MEMBERS" >&2; exit 1; }
row "(f) RSS after $MEMBERS members (MiB)" "<= 1x" "$(( $(rss_kib "$RPID") / 1024 ))" "$(( $(rss_kib "$BPID") / 1024 ))"
stop "$RPID"; stop "$BPID"

cores=$(nproc); mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
echo
echo "bucketly vs Redis $(redis-server --version | awk '{print $3}' | tr -d 'v='), $(date -u +%F), $cores cores, $mem, median of $ROUNDS"
printf '| %-38s | %-16s | %12s | %12s | %7s |\n' workload target redis bucketly ratio
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..40})" "$(printf -- '-%.0s' {1..18})" \
    "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..9})"
for r in "${ROWS[@]}"; do
    IFS='|' read -r name target redis ours <<<"$r"
    ratio=$(python3 -c "import sys; a,b=sys.argv[1:]; print('-' if a=='-' else '%.2fx' % (float(b)/float(a)))" "$redis" "$ours")
    printf '| %-38s | %-16s | %12s | %12s | %7s |\n' "$name" "$target" "$redis" "$ours" "$ratio"
done
