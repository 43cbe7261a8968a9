#!/usr/bin/env bash
# Brings GrowServer up on this machine (called by `make up` after deps, build and guest):
# starts `grow serve` all-in-one in the background (PID 1 is not systemd here), waits
# until its API answers, creates the demo customer and a plan-E server from the tiny test
# guest, and prints how to reach it and the admin token. Running it again reuses the
# running server and the existing demo.
# Environment: GROW_BIN (default bin/grow), GROW_DATA (default /var/lib/grow),
# GROW_GUEST_DIR (default .cache/guest), GROW_API (default 127.0.0.1:7470).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GROW=${GROW_BIN:-$REPO/bin/grow}
DATA=${GROW_DATA:-/var/lib/grow}
GUEST=${GROW_GUEST_DIR:-$REPO/.cache/guest}
API=${GROW_API:-127.0.0.1:7470}
LOG=$DATA/serve.log
PIDFILE=$DATA/serve.pid

die() { echo "up: $*" >&2; exit 1; }
[ -x "$GROW" ] || die "$GROW is missing (run make build)"
[ -s "$GUEST/disk.raw" ] || die "the test guest is missing in $GUEST (run make guest)"
mkdir -p "$DATA"

export GROW_URL=http://$API GROW_DATA=$DATA
unset GROW_TOKEN

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
	echo "up: grow serve already runs (pid $(cat "$PIDFILE"))"
else
	echo "up: starting grow serve (data $DATA, log $LOG)"
	nohup "$GROW" serve --data "$DATA" --api "$API" --guest-dir "$GUEST" >>"$LOG" 2>&1 </dev/null &
	echo $! >"$PIDFILE"
fi

for _ in $(seq 1 120); do
	if "$GROW" user whoami >/dev/null 2>&1; then
		break
	fi
	kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$LOG" >&2; die "grow serve exited; see $LOG"; }
	sleep 0.5
done
"$GROW" user whoami >/dev/null || { tail -20 "$LOG" >&2; die "grow serve does not answer on $GROW_URL"; }

# The demo: exit code 4 means it exists already.
"$GROW" customer create demo --email demo@example.invalid >/dev/null || [ $? -eq 4 ] || die "failed to create the demo customer"
if ! "$GROW" server show demo >/dev/null 2>&1; then
	keyargs=()
	for k in "$HOME"/.ssh/id_ed25519.pub "$HOME"/.ssh/id_rsa.pub; do
		[ -f "$k" ] && keyargs+=(--ssh-key "$k")
	done
	"$GROW" server create demo --customer demo --plan E --image tiny "${keyargs[@]}"
fi

ip=$("$GROW" server show demo -o json | sed -n 's/.*"ipv4": "\([^"]*\)".*/\1/p')
cat <<INFO

GrowServer is up.
  API:          $GROW_URL   (grow serve pid $(cat "$PIDFILE"), log $LOG)
  Web console:  $GROW_URL/ui/   (sign in with the admin token below)
  Admin token:  $(cat "$DATA/admin.token")   (in $DATA/admin.token; the grow CLI on this host finds it)
  Demo server:  demo, plan E, customer demo, address ${ip:-none}
    grow server show demo         its details
    grow server console demo      its console output
    busybox ping ${ip:-ADDRESS}        reach it over the local bridge
  Stop:         kill \$(cat $PIDFILE)   (servers keep running; a new grow serve reattaches)
INFO
