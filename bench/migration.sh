#!/usr/bin/env bash
# Live migration benchmark: grow hostd against raw QMP migrate, same guest, same run.
# Writes bench/results/migration.md. Needs root, QEMU and the test guest (make guest).
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
out=$PWD/bench/results/migration.md
GROW_BENCH_OUT=$out "$GO" test -count=1 -timeout 20m -run TestMigrationBench -v ./bench/migration/ | grep -E '^(=== RUN|--- |PASS|FAIL|ok|\s+migration_test.go)' || true
test -s "$out" || { echo "bench/migration: no result written" >&2; exit 1; }
cat "$out"
