#!/usr/bin/env bash
# Control-plane benchmark: placement throughput and packing (simulated cluster), then
# provisioning latency from the create API call to QEMU running and to guest ready, for
# the tiny test guest grown into a 1 GiB and a 20 GiB image (the clone is O(1), so both
# should take the same time). Runs `grow serve` all-in-one inside a private network
# namespace (its bridge and addresses never touch the machine's network) and removes
# everything afterwards. Writes bench/results/control.md.
# Environment: GROW_BIN (default bin/grow), GROW_GUEST_DIR (default .cache/guest), RUNS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
GROW=${GROW_BIN:-$REPO/bin/grow}
GUEST=${GROW_GUEST_DIR:-$REPO/.cache/guest}
RUNS=${RUNS:-3}
OUT=bench/results/control.md
[ -x "$GROW" ] || { echo "bench/control: $GROW is missing (make build)" >&2; exit 1; }
[ -s "$GUEST/disk.raw" ] || { echo "bench/control: no test guest in $GUEST (make guest)" >&2; exit 1; }

NS=growbench-$$
WORK=$(mktemp -d /tmp/growbench.XXXXXX)
SERVE_PID=
cleanup() {
	if [ -n "$SERVE_PID" ]; then
		# Delete what the benchmark may have left, then stop grow serve and every process in the namespace.
		ip netns exec "$NS" env GROW_DATA="$WORK/data" GROW_URL="$URL" "$GROW" server list -o json 2>/dev/null |
			sed -n 's/.*"name": "\(bench-[^"]*\)".*/\1/p' | while read -r s; do
				ip netns exec "$NS" env GROW_DATA="$WORK/data" GROW_URL="$URL" "$GROW" server delete "$s" >/dev/null 2>&1 || true
			done
		kill "$SERVE_PID" 2>/dev/null || true
		wait "$SERVE_PID" 2>/dev/null || true
	fi
	for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
	ip netns del "$NS" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up

# The two gold masters: the test guest's ext4 root at the start of a 1 GiB and a 20 GiB disk.
for size in 1 20; do
	qemu-img convert -q -O qcow2 "$GUEST/disk.raw" "$WORK/tiny-${size}g.qcow2"
	qemu-img resize -q "$WORK/tiny-${size}g.qcow2" "${size}G"
done

URL=http://127.0.0.1:7470
ip netns exec "$NS" "$GROW" serve --data "$WORK/data" --api 127.0.0.1:7470 --guest-dir "$GUEST" \
	--pool-size 64GiB --cache 256MiB >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
cli() { ip netns exec "$NS" env GROW_DATA="$WORK/data" GROW_URL="$URL" "$GROW" "$@"; }
for _ in $(seq 1 120); do cli user whoami >/dev/null 2>&1 && break; sleep 0.5; done
cli user whoami >/dev/null || { tail -20 "$WORK/serve.log" >&2; exit 1; }
for size in 1 20; do
	cli image import "tiny-${size}g" "$WORK/tiny-${size}g.qcow2" --kernel "$WORK/data/images/tiny/vmlinux" \
		--initrd "$WORK/data/images/tiny/initrd.img" --cmdline console=ttyS0 -o json >/dev/null
done

{
	echo "# Control-plane benchmark"
	echo
	echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(uname -r)."
	echo "The machine is shared with other work: absolute times are noisy, compare rows of one run."
	echo
	ip netns exec "$NS" go run ./bench/control -url "$URL" -token "$(cat "$WORK/data/admin.token")" \
		-images tiny-1g,tiny-20g -runs "$RUNS"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
