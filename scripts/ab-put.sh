#!/usr/bin/env bash
# A/B of two builds' Put: `strata put` of FILE into a fresh sidecar
# (`tiers` memory 256 MiB -> disk, the disk tier on an empty directory)
# of each build in turn, ROUNDS times. One line per Put: build, MB/s, the
# sidecar's CPU seconds (user + system) and its context switches; then
# the medians, and how many rounds the second build won. With MEMORY_ONLY
# set, the sidecar is a single memory tier twice the file's size.
# Usage: bash scripts/ab-put.sh OLD_BIN NEW_BIN FILE [ROUNDS] [DIR]
#   (ROUNDS: 10; DIR, where the disk tiers go: a temp dir)
# With TONIC_PUT set to the `tonic_put` example's binary, the Puts come
# from a stock tonic client in 1 MiB messages, as in `strata bench`, and
# the rate is the one it measures (the file read before its clock starts).
set -euo pipefail
old="$1" new="$2" file="$3" rounds="${4:-10}"
work="$(mktemp -d "${5:-${TMPDIR:-/tmp}}/ab-put.XXXXXX")"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

bytes=$(stat -c %s "$file")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ -n "${MEMORY_ONLY:-}" ]; then
    cat > "$work/sidecar.toml" <<EOF
[blobservices.root]
type = "memory"
max_size = $((bytes * 2))
EOF
else
    cat > "$work/sidecar.toml" <<EOF
[blobservices.root]
type = "tiers"
tiers = ["mem", "disk"]
[blobservices.mem]
type = "memory"
max_size = "256MiB"
[blobservices.disk]
type = "disk"
path = "$work/disk"
max_size = "16GiB"
EOF
fi
cat "$file" > /dev/null  # from the page cache for every Put

one_put() {
    local name="$1" bin="$2" start end
    rm -rf "$work/disk"
    "$bin" serve --config "$work/sidecar.toml" --listen "127.0.0.1:$port" 2> "$work/serve.log" &
    pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
    start=$(date +%s.%N)
    if [ -n "${TONIC_PUT:-}" ]; then
        rate=$("$TONIC_PUT" "grpc+http://127.0.0.1:$port" "$file" | awk '{ print $2 }')
    else
        "$new" put --addr "grpc+http://127.0.0.1:$port" "$file" > /dev/null
    fi
    end=$(date +%s.%N)
    awk -v n="$name" -v b="$bytes" -v s="$start" -v e="$end" -v rate="${rate:-}" \
        -v cpu="$(awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat")" \
        -v cs="$(cat /proc/"$pid"/task/*/status | awk '/ctxt_switches/ { s += $2 } END { print s }')" \
        'BEGIN { printf "%s %.0f %.2f %d\n", n, rate ? rate : b / (e - s) / 1e6, cpu, cs }'
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

echo "build MB/s cpu_s ctx_switches"
# Each round swaps which build goes first: on some hosts the first Put
# after a sidecar exits runs faster or slower than the next.
for round in $(seq "$rounds"); do
    order="old new"; [ $((round % 2)) = 0 ] && order="new old"
    for build in $order; do
        bin="$old"; [ "$build" = new ] && bin="$new"
        one_put "$build" "$bin" >> "$work/results"
        tail -n 1 "$work/results"
    done
done
median() { sort -n | awk '{ a[NR] = $1 } END { print NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
for b in old new; do
    for col in 2 3 4; do
        printf '%s ' "$(awk -v b="$b" -v c="$col" '$1 == b { print $c }' "$work/results" | median)"
    done | awk -v b="$b" '{ print "median " b ": " $1 " MB/s, " $2 " CPU-s, " $3 " context switches" }'
done
paste <(awk '$1 == "old"' "$work/results") <(awk '$1 == "new"' "$work/results") |
    awk '{ if ($6 > $2) w++; if ($7 < $3) c++ } END { print "new faster in " w + 0 " of " NR ", less CPU in " c + 0 " of " NR }'
