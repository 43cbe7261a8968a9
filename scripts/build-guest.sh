#!/usr/bin/env bash
# Builds the tiny GrowServer test guest into DIR (default <repo>/.cache/guest):
#   vmlinux     the Debian kernel, uncompressed (the xz stream inside vmlinuz)
#   initrd.img  busybox initramfs (xz) with the virtio/ext4/isofs modules and the guest agent
#   disk.raw    a 64 MiB ext4 root filesystem of the same guest (the "gold master")
#   VERSION     what it was built from, and the outputs' SHA-256 sums
# Nothing is downloaded but the Debian kernel package (apt-get download). The build is
# reproducible (fixed timestamps, owners, UUIDs) and skipped when the inputs are unchanged.
# Usage: scripts/build-guest.sh [DIR]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$REPO/.cache/guest}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
EPOCH=1700000000            # every timestamp inside the outputs
DISK_SIZE=64M
DISK_UUID=6a0c2f1e-9b1d-4c3e-8f7a-67726f777631
HASH_SEED=3b4e5f60-7a8b-4c9d-8e0f-67726f777632

die() { echo "build-guest: $*" >&2; exit 1; }
for tool in busybox cpio xz mkfs.ext4 debugfs dpkg-deb apt-get flock "$GO"; do
	command -v "$tool" >/dev/null 2>&1 || die "missing $tool (run scripts/install-deps.sh)"
done
BUSYBOX=$(command -v busybox)
"$BUSYBOX" --list | grep -qx switch_root || die "$BUSYBOX is not busybox-static"

mkdir -p "$DIR/cache"
DIR=$(cd "$DIR" && pwd)
exec 9>"$DIR/.lock"
flock 9   # concurrent `make guest` runs build once

# Inputs.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
if [ -z "$kpkg" ]; then
	cached=$(ls "$DIR"/cache/linux-image-*-amd64_*.deb 2>/dev/null | sort | tail -1 || true)
	[ -n "$cached" ] || die "apt-cache does not know linux-image-amd64 (run apt-get update)"
	kpkg=$(basename "$cached" | cut -d_ -f1)
fi
kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}') || true
if [ -z "$kver" ] || [ "$kver" = "(none)" ]; then
	kver=$(ls "$DIR"/cache/"${kpkg}"_*.deb 2>/dev/null | sort | tail -1 | xargs -r basename | cut -d_ -f2)
	[ -n "$kver" ] || die "no version of $kpkg is available"
fi
bbver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || "$BUSYBOX" | head -1)
gover=$("$GO" env GOVERSION)
srcsum=$(cd "$REPO" && { find guest scripts/build-guest.sh -type f ! -name README.md ! -name '*_test.go' ! -path '*/testdata/*' -print0 | sort -z | xargs -0 sha256sum; grep -h 'go.yaml.in/yaml' go.mod; } | sha256sum | cut -d' ' -f1)
fingerprint="$kpkg $kver busybox $bbver $gover src $srcsum"

if [ -f "$DIR/VERSION" ] && grep -qxF "fingerprint: $fingerprint" "$DIR/VERSION" &&
	[ -s "$DIR/vmlinux" ] && [ -s "$DIR/initrd.img" ] && [ -s "$DIR/disk.raw" ]; then
	echo "build-guest: $DIR is up to date"
	exit 0
fi
echo "build-guest: building into $DIR ($kpkg $kver)"

WORK=$(mktemp -d "$DIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. The kernel package, downloaded once per version.
deb=$(ls "$DIR"/cache/"${kpkg}"_"${kver//:/%3a}"_amd64.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
	(cd "$WORK" && apt-get download -q "$kpkg=$kver" >/dev/null 2>&1) || die "apt-get download $kpkg=$kver failed"
	mv "$WORK"/"${kpkg}"_*.deb "$DIR/cache/"
	deb=$(ls "$DIR"/cache/"${kpkg}"_*.deb | head -1)
	# Keep only the package in use.
	find "$DIR/cache" -name 'linux-image-*.deb' ! -path "$deb" -delete
fi

# 2. vmlinux (the xz stream inside vmlinuz, decompressed: boots about twice as fast
#    under TCG) and the modules the guest loads, stripped; kept per kernel version so
#    that rebuilding after a change under guest/ does not unpack the package again.
modsum=$(sha256sum <"$REPO/guest/rootfs/etc/modules" | cut -c1-12)
KC="$DIR/cache/kernel-$kver-$modsum"
if [ ! -f "$KC/done" ]; then
	rm -rf "$KC" "$KC.tmp" "$WORK/kernel"
	mkdir -p "$KC.tmp/modules"
	dpkg-deb -x "$deb" "$WORK/kernel"
	vmlinuz=$(ls "$WORK"/kernel/boot/vmlinuz-* | head -1)
	off=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
	[ -n "$off" ] || die "no xz stream in $vmlinuz"
	tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream >"$KC.tmp/vmlinux" 2>/dev/null || true
	head -c 4 "$KC.tmp/vmlinux" | grep -q 'ELF' || die "decompressing $vmlinuz gave no ELF kernel"
	declare -A kmod
	while read -r f; do
		b=${f##*/}
		kmod[${b%.ko}]=$f
	done < <(find "$WORK"/kernel/lib/modules -name '*.ko')
	while read -r m; do
		[ -n "$m" ] || continue
		f=${kmod[$m]:-}
		[ -n "$f" ] || die "module $m not found in $kpkg"
		if command -v strip >/dev/null 2>&1; then
			strip --strip-debug -o "$KC.tmp/modules/$m.ko" "$f"
		else
			cp "$f" "$KC.tmp/modules/$m.ko"   # binutils missing: bigger, same behaviour
		fi
	done <"$REPO/guest/rootfs/etc/modules"
	rm -rf "$WORK/kernel"
	touch "$KC.tmp/done"
	find "$DIR/cache" -maxdepth 1 -name 'kernel-*' ! -name "${KC##*/}.tmp" -exec rm -rf {} +
	mv "$KC.tmp" "$KC"
fi
cp "$KC/vmlinux" "$WORK/vmlinux"

# 3. The guest agent, a static Go binary.
(cd "$REPO" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$GO" build -trimpath -ldflags='-s -w -buildid=' \
	-o "$WORK/growguest" ./guest/cmd/growguest) || die "building the guest agent failed"

# 4. The root tree shared by the initramfs and the disk.
T="$WORK/root"
mkdir -p "$T"/{bin,sbin,usr/bin,usr/sbin,etc,lib/modules,proc,sys,dev,run,tmp,root,newroot,mnt}
cp "$BUSYBOX" "$T/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
	[ "$applet" = bin/busybox ] && continue
	dir=${applet%/*} rel=..
	[ "$dir" = "${dir#*/}" ] || rel=../..   # usr/bin, usr/sbin
	ln -s "$rel/bin/busybox" "$T/$applet"
done
cp -r "$REPO"/guest/rootfs/. "$T/"
cp "$WORK/growguest" "$T/bin/growguest"
while read -r m; do
	[ -n "$m" ] || continue
	[ -f "$KC/modules/$m.ko" ] || die "module $m is missing from $KC (remove it to rebuild)"
	cp "$KC/modules/$m.ko" "$T/lib/modules/$m.ko"
done <"$REPO/guest/rootfs/etc/modules"
echo "$kpkg $kver" >"$T/etc/grow-guest-kernel"
chmod 0755 "$T/init" "$T/etc/rc.sysinit" "$T/bin/growguest"
chmod 0700 "$T/root"
chmod 1777 "$T/tmp"
find "$T" -exec touch -h -d "@$EPOCH" {} +

# 5. initrd.img: newc cpio, sorted, owned by root, fixed times, xz with the CRC32 check
#    the kernel's decompressor requires (20 % smaller than gzip -9).
(cd "$T" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --reproducible --quiet) |
	xz -6 --check=crc32 -T1 >"$WORK/initrd.img"

# 6. disk.raw: the same tree as an ext4 root filesystem; stage 1 switches into it when it
#    is the first virtio disk.
D="$WORK/diskroot"
cp -a "$T" "$D"
rm -f "$D/init"
echo "GrowServer test guest root filesystem" >"$D/etc/grow-guest-root"
touch -h -d "@$EPOCH" "$D/etc/grow-guest-root" "$D/etc"
truncate -s "$DISK_SIZE" "$WORK/disk.raw"
SOURCE_DATE_EPOCH=$EPOCH E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L growroot -U "$DISK_UUID" \
	-E "hash_seed=$HASH_SEED,root_owner=0:0" -d "$D" "$WORK/disk.raw" ||
	die "mkfs.ext4 failed"
# mke2fs 1.47.0 stamps symlinks with the current time: pin every inode's times.
(cd "$D" && find . -mindepth 1 | sed 's#^\.##') | while read -r p; do
	for field in atime ctime mtime crtime; do
		echo "set_inode_field \"$p\" $field @$EPOCH"
	done
done >"$WORK/times.debugfs"
SOURCE_DATE_EPOCH=$EPOCH E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$WORK/times.debugfs" "$WORK/disk.raw" >/dev/null 2>&1 || die "debugfs failed"

# 7. Manifest, then publish atomically.
{
	echo "fingerprint: $fingerprint"
	echo "kernel: $kpkg $kver"
	echo "busybox: $bbver"
	echo "go: $gover"
	echo "append: console=ttyS0 (add grow.run=counter,diskwriter,responder for workloads)"
	(cd "$WORK" && sha256sum vmlinux initrd.img disk.raw)
} >"$WORK/VERSION"
for f in vmlinux initrd.img disk.raw VERSION; do
	mv -f "$WORK/$f" "$DIR/$f"
done
echo "build-guest: done: $(cd "$DIR" && du -h vmlinux initrd.img disk.raw | tr '\t\n' '  ')"
