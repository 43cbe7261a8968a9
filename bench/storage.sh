#!/usr/bin/env bash
# Storage benchmark (the storage part of `make bench`): the same fio jobs, with fio's nbd
# ioengine, against grow storaged, qemu-nbd and nbdkit's file plugin, each serving an
# identical copy of the same data from the same filesystem, in one run, once over loopback
# TCP (how hosts reach controllers, and the setup of the issue's reference figures) and
# once over a unix socket; plus the clone time of a 100 MiB and a 10 GiB image. Writes
# bench/results/storage.md.
#
# Every job runs in BENCH_ROUNDS rounds (default 3); each round runs it against every
# server, starting with a different one each round, so that load from elsewhere on a
# shared machine hits all servers alike. Figures are medians over the rounds; ratios are
# the median of the ratios within each round (servers measured back to back).
#
# Environment: GROW_BIN (default bin/grow, built if missing), BENCH_RUNTIME (seconds per
# job and round, default 5), BENCH_ROUNDS, BENCH_SIZE (data set, default 512M),
# BENCH_DIR (work directory on the filesystem to measure, default a new directory under
# /var/tmp), BENCH_JOBS (space-separated job names to run, e.g. "seqwrite-1m"; default
# all), BENCH_TRANSPORTS (default "tcp unix"), BENCH_CLONE=0 (skip the clone times).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export PATH="/usr/local/go/bin:$PATH"
source bench/storage/lib.sh

RUNTIME=${BENCH_RUNTIME:-5}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-512M}
GROW=${GROW_BIN:-$REPO/bin/grow}
OUT=${BENCH_OUT:-$REPO/bench/results/storage.md}
for tool in fio qemu-nbd nbdkit nbdcopy qemu-img qemu-io; do
	command -v "$tool" >/dev/null || die "missing $tool (run scripts/install-deps.sh)"
done
if [ ! -x "$GROW" ]; then
	log "building $GROW"
	go build -o "$GROW" ./cmd/grow
fi

LOAD0=$(cut -d' ' -f1 /proc/loadavg)
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/grow-bench-storage.XXXXXX)}
mkdir -p "$WORK"
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	[ -n "${BENCH_KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

log "work directory $WORK ($(df -h --output=fstype,avail "$WORK" | tail -1 | xargs))"
log "creating $SIZE of random data"
head -c "$SIZE" /dev/urandom >"$WORK/data.img"
BYTES=$(stat -c %s "$WORK/data.img")
cp "$WORK/data.img" "$WORK/qemu.img"
cp "$WORK/data.img" "$WORK/nbdkit.img"

TRANSPORTS=(${BENCH_TRANSPORTS:-tcp unix})
for t in "${TRANSPORTS[@]}"; do
	case $t in tcp | unix) ;; *) die "BENCH_TRANSPORTS: unknown transport $t (tcp or unix)" ;; esac
done

# grow storaged: one file disk in its data directory, a fully written volume; it serves
# both transports at once.
GROW_PORT=$(free_port)
"$GROW" storaged --data "$WORK/grow" --nbd "127.0.0.1:$GROW_PORT" --nbd-socket "$WORK/grow.sock" --api 127.0.0.1:0 \
	--cache "${BENCH_CACHE:-1GiB}" --pool-size 24GiB 2>"$WORK/grow.log" &
PIDS+=($!)
declare -A SPID=([grow]=$!)
wait_for_log "$WORK/grow.log" "Storage controller ready"
API=http://$(sed -n 's/.*Storage controller ready.* api=\([^ ]*\).*/\1/p' "$WORK/grow.log" | head -1)
TOKEN=$(cat "$WORK/grow/admin.token")
gs() { "$GROW" storage --controller "$API" --token "$TOKEN" "$@"; }
gs volume create bench --size "$BYTES" >/dev/null
nbdcopy "$WORK/data.img" "nbd+unix:///bench?socket=$WORK/grow.sock"

SERVERS=(grow qemu nbdkit)
declare -A RES URI
# name rw bs unit
JOBS=(
	"randread-4k randread 4k iops"
	"randwrite-4k randwrite 4k iops"
	"seqread-1m read 1m bw"
	"seqwrite-1m write 1m bw"
)
if [ -n "${BENCH_JOBS:-}" ]; then
	sel=()
	for job in "${JOBS[@]}"; do
		for want in $BENCH_JOBS; do
			[ "${job%% *}" = "$want" ] && sel+=("$job")
		done
	done
	[ ${#sel[@]} -gt 0 ] || die "BENCH_JOBS=$BENCH_JOBS names no job"
	JOBS=("${sel[@]}")
fi

# start_peers TRANSPORT: qemu-nbd and nbdkit listening on TRANSPORT (each can listen on
# only one), replacing those of the previous transport; sets URI for every server.
start_peers() {
	local t=$1 qport kport
	stop_peers
	if [ "$t" = unix ]; then
		rm -f "$WORK/qemu.sock" "$WORK/nbdkit.sock"
		qemu-nbd -f raw -k "$WORK/qemu.sock" -x bench --shared=8 --persistent "$WORK/qemu.img" 2>>"$WORK/qemu.log" &
		SPID[qemu]=$!
		nbdkit -f -U "$WORK/nbdkit.sock" -e bench file file="$WORK/nbdkit.img" 2>>"$WORK/nbdkit.log" &
		SPID[nbdkit]=$!
		wait_for_socket "$WORK/qemu.sock"
		wait_for_socket "$WORK/nbdkit.sock"
		URI=(
			[grow]="nbd+unix:///bench?socket=$WORK/grow.sock"
			[qemu]="nbd+unix:///bench?socket=$WORK/qemu.sock"
			[nbdkit]="nbd+unix:///bench?socket=$WORK/nbdkit.sock"
		)
	else
		qport=$(free_port)
		qemu-nbd -f raw -b 127.0.0.1 -p "$qport" -x bench --shared=8 --persistent "$WORK/qemu.img" 2>>"$WORK/qemu.log" &
		SPID[qemu]=$!
		wait_for_port "$qport"
		kport=$(free_port)
		nbdkit -f -i 127.0.0.1 -p "$kport" -e bench file file="$WORK/nbdkit.img" 2>>"$WORK/nbdkit.log" &
		SPID[nbdkit]=$!
		wait_for_port "$kport"
		URI=(
			[grow]="nbd://127.0.0.1:$GROW_PORT/bench"
			[qemu]="nbd://127.0.0.1:$qport/bench"
			[nbdkit]="nbd://127.0.0.1:$kport/bench"
		)
	fi
	PIDS+=("${SPID[qemu]}" "${SPID[nbdkit]}")
}

# stop_peers: stop the running qemu-nbd and nbdkit, if any.
stop_peers() {
	local s
	for s in qemu nbdkit; do
		if [ -n "${SPID[$s]:-}" ]; then
			kill "${SPID[$s]}" 2>/dev/null || true
			wait "${SPID[$s]}" 2>/dev/null || true
			SPID[$s]=""
		fi
	done
}

for t in "${TRANSPORTS[@]}"; do
	start_peers "$t"
	# Warm every server's caches with one full read, as a VM that has been running would,
	# in 64 KiB requests: larger reads are streaming reads that grow's cache lets pass.
	for s in "${SERVERS[@]}"; do
		nbdcopy --request-size=65536 "${URI[$s]}" null: 2>/dev/null || nbdcopy --request-size=65536 "${URI[$s]}" - >/dev/null
	done
	for job in "${JOBS[@]}"; do
		read -r name rw bs unit <<<"$job"
		for r in $(seq "$ROUNDS"); do
			for i in "${!SERVERS[@]}"; do
				s=${SERVERS[$(((i + r - 1) % ${#SERVERS[@]}))]}
				log "fio $name against $s over $t (round $r of $ROUNDS)"
				RES[$t,$s,$name,$r]=$(run_fio "${URI[$s]}" "$rw" "$bs" "$unit" "$RUNTIME" "$WORK/fio-$t-$s-$name-$r.txt" "${SPID[$s]}")
				log "  IOPS, MB/s, CPU us per request: ${RES[$t,$s,$name,$r]} (load $(cut -d' ' -f1 /proc/loadavg))"
			done
		done
	done
done
stop_peers

# Clone times: a 100 MiB image of random data and a 10 GiB image with data spread over it.
CLONE100="- -" CLONE10G="- -"
if [ "${BENCH_CLONE:-1}" != 0 ]; then
	log "clone times"
	head -c 100M /dev/urandom >"$WORK/img100m.raw"
	gs image import img100m "$WORK/img100m.raw" >/dev/null 2>&1
	qemu-img create -q -f qcow2 "$WORK/img10g.qcow2" 10G
	cmds=()
	for i in $(seq 0 63); do cmds+=(-c "write -P $((i + 1)) $((i * 160))M 1M"); done
	qemu-io -f qcow2 "${cmds[@]}" "$WORK/img10g.qcow2" >/dev/null
	gs image import img10g "$WORK/img10g.qcow2" >/dev/null 2>&1
	CLONE100=$(clone_ms img100m)
	CLONE10G=$(clone_ms img10g)
fi

# Where the controller spends its CPU during 4 KiB random writes (for the owners of slow paths).
if [ -n "${BENCH_PROFILE:-}" ]; then
	profile_grow "$API" "$TOKEN" "${URI[grow]}" "$WORK" "$OUT"
fi

write_report "$OUT"
log "wrote $OUT"
cat "$OUT"
