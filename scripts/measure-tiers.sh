#!/usr/bin/env bash
# Throughput of 1 GiB put and read for each persistent tier kind and through
# a three-process chain (origin <- peer <- sidecar), with the release build.
# Usage: bash scripts/measure-tiers.sh [SIZE_MIB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib="${1:-1024}"
cargo build --release --quiet
bin="$PWD/target/release/strata"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
work="$(mktemp -d)"
# Background servers append their pids here: `serve` runs in a subshell.
touch "$work/pids"
cleanup() { xargs -r kill < "$work/pids" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/blob"
bytes=$(stat -c %s "$work/blob")

now() { date +%s.%N; }
mbps() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# serve NAME CONFIG_TEXT -> prints the address
serve() {
    local name="$1" config="$2" p
    p=$(port)
    printf '%s\n' "$config" > "$work/$name.toml"
    "$bin" serve --config "$work/$name.toml" --listen "127.0.0.1:$p" > /dev/null 2> "$work/$name.log" &
    echo $! >> "$work/pids"
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break
        sleep 0.1
    done
    echo "grpc+http://127.0.0.1:$p"
}

# measure LABEL ADDR: put, then read twice
measure() {
    local label="$1" addr="$2" t0 t1 digest
    t0=$(now); digest=$("$bin" put --addr "$addr" "$work/blob" | cut -d' ' -f1); t1=$(now)
    local put_s; put_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    rm -f "$work/out"
    t0=$(now); "$bin" get --addr "$addr" "$digest" -o "$work/out"; t1=$(now)
    local get_s; get_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    cmp -s "$work/blob" "$work/out" || { echo "$label: read back different bytes" >&2; exit 1; }
    printf '| %s | %s MB/s | %s MB/s |\n' "$label" "$(mbps "$put_s")" "$(mbps "$get_s")"
    echo "$digest" > "$work/digest"
}

echo "blob: $bytes bytes; nproc: $(nproc)"
echo
echo "| tier | put | read (get -o, verified) |"
echo "| --- | --- | --- |"

addr=$(serve disk "[blobservices.root]
type = \"disk\"
path = \"$work/disk\"
max_size = \"4GiB\"")
measure disk "$addr"

mkdir -p "$work/bucket"
addr=$(serve file "[blobservices.root]
type = \"objectstore\"
object_store_url = \"file://$work/bucket\"")
measure "objectstore file://" "$addr"

mkdir -p "$work/s3/blobs"
s3port=$(port)
s3s-fs --host 127.0.0.1 --port "$s3port" --access-key k --secret-key s "$work/s3" > /dev/null 2> "$work/s3.log" &
echo $! >> "$work/pids"
sleep 1
addr=$(serve s3 "[blobservices.root]
type = \"objectstore\"
object_store_url = \"s3://blobs\"
object_store_options = { aws_endpoint = \"http://127.0.0.1:$s3port\", aws_allow_http = \"true\", aws_access_key_id = \"k\", aws_secret_access_key = \"s\", aws_region = \"us-east-1\", aws_virtual_hosted_style_request = \"false\" }")
measure "objectstore s3 (s3s-fs)" "$addr"

# The chain: origin (objectstore file://) <- peer <- sidecar.
mkdir -p "$work/origin"
origin=$(serve origin "[blobservices.root]
type = \"objectstore\"
object_store_url = \"file://$work/origin\"")
tiers() {
    printf '[blobservices.root]\ntype = "tiers"\ntiers = ["mem", "disk", "%s"]\n[blobservices.mem]\ntype = "memory"\nmax_size = "256MiB"\n[blobservices.disk]\ntype = "disk"\npath = "%s"\nmax_size = "4GiB"\n' "$1" "$2"
}
peer=$(serve peer "$(tiers "$origin" "$work/peer-disk")")
sidecar=$(serve sidecar "$(tiers "$peer" "$work/sidecar-disk")")
digest=$("$bin" put --addr "$origin" "$work/blob" | cut -d' ' -f1)
for round in cold warm; do
    rm -f "$work/out"
    t0=$(now); "$bin" get --addr "$sidecar" "$digest" -o "$work/out"; t1=$(now)
    s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    cmp -s "$work/blob" "$work/out" || { echo "chain: different bytes" >&2; exit 1; }
    echo "| chain read, $round | | $(mbps "$s") MB/s |"
done
