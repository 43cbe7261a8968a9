#!/usr/bin/env bash
# Mirror benchmark (issue 5): fio writes on a mirrored volume against the same kind of
# controller unmirrored, the guest's I/O stall when its primary controller is killed,
# and resync time against the data changed during an outage, all on the namespace test
# bed in one run. Writes bench/results/mirror.md. Needs root, QEMU, fio, qemu-io,
# nbdcopy, nft, `make build` (bin/grow) and `make guest` (.cache/guest).
#
# Environment: BENCH_RUNTIME (seconds per fio job, default 10), BENCH_ROUNDS (fio rounds
# per side, default 2), BENCH_KILLS (primary kills under the guest, default 5),
# BENCH_SIZE_MIB (fio data set, default 512), BENCH_CACHE (controller cache, default
# 256MiB), BENCH_RESYNC_RATE (--resync-rate, default the daemon's), BENCH_ONLY (comma list
# of sections to run: fio, failover stall, resync; default all) and BENCH_OUT (result file).
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
# Only a run of every section replaces bench/results/mirror.md by default.
if [ -n "${BENCH_ONLY:-}" ]; then
	out=${BENCH_OUT:-${TMPDIR:-/tmp}/grow-bench-mirror-partial.md}
else
	out=${BENCH_OUT:-$PWD/bench/results/mirror.md}
fi
export GROW_BIN=${GROW_BIN:-$PWD/bin/grow}
export GROW_GUEST_DIR=${GROW_GUEST_DIR:-$PWD/.cache/guest}
[ -x "$GROW_BIN" ] || { echo "bench/mirror: $GROW_BIN is missing (make build)" >&2; exit 1; }
[ -s "$GROW_GUEST_DIR/vmlinux" ] || { echo "bench/mirror: no test guest in $GROW_GUEST_DIR (make guest)" >&2; exit 1; }
tmp=$(mktemp "${out}.XXXXXX")
trap 'rm -f "$tmp" "$tmp.log"' EXIT
# keep FILE EXT: move FILE out of the way (it would be removed on exit) and print where.
keep() {
	local dst
	dst=$(mktemp --suffix=".$2" "${TMPDIR:-/tmp}/grow-bench-mirror.XXXXXX")
	mv "$1" "$dst"
	echo "$dst"
}
set +e
GROW_BENCH_OUT=$tmp "$GO" test -count=1 -timeout 30m -run TestMirrorBench -v ./bench/mirror/ >"$tmp.log" 2>&1
rc=$?
set -e
grep -E '^(=== RUN|--- |PASS|FAIL|ok|\s+mirror_test.go)' "$tmp.log" || true
test -s "$tmp" || { echo "bench/mirror: no result written; log: $(keep "$tmp.log" log)" >&2; exit 1; }
if [ "$rc" -ne 0 ]; then
	# A failed run does not replace the last good result.
	echo "bench/mirror: failed (exit $rc); partial result: $(keep "$tmp" md), full log: $(keep "$tmp.log" log)" >&2
	exit "$rc"
fi
mv "$tmp" "$out"
cat "$out"
