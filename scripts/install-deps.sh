#!/usr/bin/env bash
# Installs the Debian packages GrowServer and its tests need. Idempotent and quiet when
# everything is already there. Run as root on Debian 12.
set -euo pipefail

pkgs=(qemu-system-x86 qemu-utils libnbd-bin nbdkit fio busybox-static socat iproute2 nftables
      cpio xz-utils zstd kmod ca-certificates openssl debootstrap e2fsprogs fdisk genisoimage binutils)
if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
	pkgs+=(postgresql-15)
fi

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
	echo "install-deps: Go is not installed (need Go 1.26 or newer at /usr/local/go)" >&2
	exit 1
fi
