# Helpers of bench/storage.sh (sourced). Every function writes its result on stdout.

log() { echo "bench/storage: $*" >&2; }
die() { log "$*"; exit 1; }

# wait_for_log FILE TEXT: wait up to 60 s for TEXT to appear in FILE.
wait_for_log() {
	for _ in $(seq 600); do
		grep -q "$2" "$1" 2>/dev/null && return 0
		sleep 0.1
	done
	cat "$1" >&2
	die "timed out waiting for '$2' in $1"
}

# wait_for_socket PATH: wait up to 30 s for a unix socket.
wait_for_socket() {
	for _ in $(seq 300); do
		[ -S "$1" ] && return 0
		sleep 0.1
	done
	die "timed out waiting for socket $1"
}

# wait_for_port PORT: wait up to 30 s for a listener on 127.0.0.1:PORT.
wait_for_port() {
	for _ in $(seq 300); do
		ss -Hltn "sport = :$1" | grep -q . && return 0
		sleep 0.1
	done
	die "timed out waiting for a listener on port $1"
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on (from the ephemeral range,
# which servers rarely bind).
free_port() {
	local p
	for _ in $(seq 100); do
		p=$((32768 + RANDOM % 28000))
		ss -Hltn "sport = :$p" | grep -q . || { echo "$p"; return 0; }
	done
	die "no free TCP port found"
}

# cpu_ticks PID: user+system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# run_fio URI RW BS UNIT RUNTIME LOG PID: one fio job, 2 jobs x iodepth 32 over fio's nbd
# engine, each job on its own half of the export, while sampling the CPU time of the
# server process PID after the ramp. Prints "IOPS MBPS CPU_US_PER_REQUEST".
run_fio() {
	local uri=$1 rw=$2 bs=$3 unit=$4 runtime=$5 logf=$6 pid=$7 half fpid c0 c1 hz
	half=$((BYTES / 2))
	hz=$(getconf CLK_TCK)
	# Write back what earlier jobs left dirty, so that no server pays for another's writes.
	sync -f "$WORK"
	fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
		--iodepth=32 --numjobs=2 --group_reporting --size="$half" --offset_increment="$half" \
		--time_based --runtime="$runtime" --ramp_time=2 --norandommap --randrepeat=0 \
		--output-format=terse --terse-version=3 >"$logf" 2>"$logf.err" &
	fpid=$!
	sleep 2.5
	c0=$(cpu_ticks "$pid")
	sleep "$((runtime - 1))"
	c1=$(cpu_ticks "$pid")
	wait "$fpid" || { cat "$logf.err" >&2; die "fio failed against $uri"; }
	# terse v3: field 7/8 read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
	awk -F';' -v rw="$rw" -v cpu="$(( c1 - c0 ))" -v hz="$hz" -v secs="$((runtime - 1))" '$1 == "3" {
		if (rw ~ /write/) { bw = $48; iops = $49 } else { bw = $7; iops = $8 }
		us = (iops > 0) ? cpu / hz * 1e6 / (iops * secs) : 0
		printf "%d %.0f %.1f\n", iops, bw * 1024 / 1e6, us
	}' "$logf"
}

# clone_ms IMAGE: clone IMAGE five times; prints "MEDIAN_CONTROLLER_MS MEDIAN_CLI_MS".
clone_ms() {
	local img=$1 i t0 t1 ns ctl=() cli=()
	for i in 1 2 3 4 5; do
		t0=$(date +%s%N)
		ns=$(gs volume clone "$img" "$img-c$i" --output json | sed -n 's/.*"nanoseconds": *\([0-9]*\).*/\1/p')
		t1=$(date +%s%N)
		ctl+=("$ns")
		cli+=($((t1 - t0)))
	done
	printf '%s %s\n' \
		"$(printf '%s\n' "${ctl[@]}" | sort -n | sed -n 3p | awk '{printf "%.2f", $1 / 1e6}')" \
		"$(printf '%s\n' "${cli[@]}" | sort -n | sed -n 3p | awk '{printf "%.1f", $1 / 1e6}')"
}

# median N...: the median of the numbers (the lower middle one of an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# field NAME SERVER COLUMN: column (1 IOPS, 2 MB/s, 3 CPU) of every round of job NAME on
# SERVER over transport TR.
field() {
	local r
	for r in $(seq "$ROUNDS"); do
		echo "${RES[$TR,$2,$1,$r]}" | cut -d' ' -f"$3"
	done
}

# round_ratio NAME COLUMN PEER: the median over rounds of grow's COLUMN divided by PEER's,
# over transport TR.
round_ratio() {
	local r out=()
	for r in $(seq "$ROUNDS"); do
		out+=("$(ratio "$(echo "${RES[$TR,grow,$1,$r]}" | cut -d' ' -f"$2")" "$(echo "${RES[$TR,$3,$1,$r]}" | cut -d' ' -f"$2")")")
	done
	median "${out[@]}"
}

# ratio A B: A/B with two decimals, "-" if B is zero.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

# verdict RATIO TARGET: "met" or "**missed**".
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { if (r != "-" && r + 0 >= t) print "met"; else print "**missed**" }'; }

# profile_grow API TOKEN URI WORK OUT: a 10 s CPU profile of the controller under 4 KiB
# random writes; leaves the top functions in WORK/pprof-top.txt.
profile_grow() {
	local api=$1 token=$2 uri=$3 work=$4
	fio --name=prof --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 \
		--size=$((BYTES / 2)) --offset_increment=$((BYTES / 2)) --time_based --runtime=14 \
		--norandommap --output=/dev/null 2>/dev/null &
	local fpid=$!
	sleep 2
	curl -sf -H "Authorization: Bearer $token" "$api/debug/pprof/profile?seconds=10" -o "$work/cpu.pprof" || true
	wait "$fpid" || true
	if [ -s "$work/cpu.pprof" ]; then
		go tool pprof -top -nodecount=40 "$GROW" "$work/cpu.pprof" >"$work/pprof-top.txt" 2>/dev/null || true
	fi
}

# write_report OUT: the markdown table of everything measured.
write_report() {
	local out=$1 tmp
	tmp=$(mktemp)
	{
		echo "# Storage benchmark"
		echo
		echo "Written by \`bench/storage.sh\` (\`make bench\`). Same fio jobs, in one run, against"
		echo "\`grow storaged\`, \`qemu-nbd\` and \`nbdkit file\`, each serving an identical copy of"
		echo "$(numfmt --to=iec "$BYTES") of random data from the same filesystem, over: ${TRANSPORTS[*]}."
		echo "Loopback TCP is how hosts reach controllers (over the network) and the setup of the"
		echo "issue's reference figures; the unix socket (no TCP stack) is shown for comparison."
		echo
		echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
		echo "- Machine: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, kernel $(uname -r), work directory on $(df --output=fstype "$WORK" | tail -1 | xargs)"
		echo "- Versions: grow $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), $(fio --version), $(qemu-nbd --version | head -1 | cut -d' ' -f1-2), $(nbdkit --version)"
		echo "- Jobs: fio nbd engine, 2 jobs x iodepth 32, each job on its own half of the export, ${RUNTIME} s after a 2 s ramp, ${ROUNDS} rounds with the server order rotated each round (figures: medians over rounds; ratios: median of the per-round ratios); caches warmed by one full read first; dirty pages written back before every job; grow storaged with --cache ${BENCH_CACHE:-1GiB}; qemu-nbd and nbdkit with their defaults (page cache)"
		echo "- Load: the machine is shared (other builds and tests may run), so compare the ratios of this one run rather than absolute numbers across runs. Load average at the start ${LOAD0:-?}, at the end $(cut -d' ' -f1 /proc/loadavg)."
		local job name rw bs unit col label target r s cpu TR
		for TR in "${TRANSPORTS[@]}"; do
			echo
			if [ "$TR" = tcp ]; then
				echo "## Over loopback TCP"
			else
				echo "## Over a unix socket"
			fi
			echo
			echo "| Job | grow storaged | qemu-nbd | nbdkit | grow / nbdkit | grow / qemu-nbd | target vs nbdkit | | server CPU µs per request (grow / qemu-nbd / nbdkit) |"
			echo "|---|---:|---:|---:|---:|---:|---:|---|---|"
			for job in "${JOBS[@]}"; do
				read -r name rw bs unit <<<"$job"
				if [ "$unit" = iops ]; then
					col=1 label=IOPS target=1.00
				else
					col=2 label=MB/s target=0.90
				fi
				declare -A val=()
				cpu=""
				for s in grow qemu nbdkit; do
					# shellcheck disable=SC2046
					val[$s]=$(median $(field "$name" "$s" "$col"))
					# shellcheck disable=SC2046
					cpu+="${cpu:+ / }$(median $(field "$name" "$s" 3))"
				done
				r=$(round_ratio "$name" "$col" nbdkit)
				echo "| $name ($label) | ${val[grow]} | ${val[qemu]} | ${val[nbdkit]} | $r | $(round_ratio "$name" "$col" qemu) | >= $target | $(verdict "$r" "$target") | $cpu |"
			done
		done
		if [ "$CLONE100" != "- -" ]; then
			echo
			echo "## Clone times"
			echo
			echo "| Clone (median of 5) | in the controller | CLI round trip (incl. process start) |"
			echo "|---|---:|---:|"
			echo "| 100 MiB image (random data) | $(echo "$CLONE100" | cut -d' ' -f1) ms | $(echo "$CLONE100" | cut -d' ' -f2) ms |"
			echo "| 10 GiB image (64 MiB of data spread over it) | $(echo "$CLONE10G" | cut -d' ' -f1) ms | $(echo "$CLONE10G" | cut -d' ' -f2) ms |"
		fi
		if [ -s "$WORK/pprof-top.txt" ]; then
			echo
			echo "CPU profile of grow storaged under 4 KiB random writes (top functions):"
			echo
			echo '```'
			sed -n '1,30p' "$WORK/pprof-top.txt"
			echo '```'
		fi
	} >"$tmp"
	mv "$tmp" "$out"
}
