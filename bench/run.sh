#!/usr/bin/env bash
# Runs every benchmark part that exists and leaves its table in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
for part in storage migration control mirror; do
	if [ -x "bench/$part.sh" ]; then
		echo "== bench: $part"
		bash "bench/$part.sh"
	fi
done
