#!/usr/bin/env bash
# make test-kernels: the privileged datapath tests (agent/datapath and
# test/kernel) and `sluice check`, inside Debian's kernels booted under qemu
# with software emulation (KVM here refuses stock kernels), one CPU, no
# network device. Kernels come from Debian's archive with apt (a private apt
# configuration; the system's sources are untouched) and are cached by
# series under $SLUICE_CACHE/kernels (default ~/.cache/sluice/kernels).
#
#   SLUICE_KERNELS="5.10 6.1 6.12"   series to test (Debian bullseye, bookworm, bookworm 6.12)
#   SLUICE_KERNEL_TIMEOUT=900        seconds per boot before it counts as failed
#   SLUICE_KERNEL_TESTRUN=regexp     only the tests matching it (go test -run)
#   SLUICE_KERNEL_LOGS=dir           keep each kernel's console log there
#
# Prints one PASS/FAIL line per kernel; exits non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
kernels=${SLUICE_KERNELS:-"5.10 6.1 6.12"}
cache=${SLUICE_CACHE:-$HOME/.cache/sluice}/kernels
timeout_s=${SLUICE_KERNEL_TIMEOUT:-900}
work=$(mktemp -d /tmp/sluice-kernels.XXXXXX)
trap 'rm -rf "$work"' EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need qemu-system-x86_64 || ! [ -x /bin/busybox ] || ! need cpio || ! need xz || ! need dpkg-deb; then
	echo "test-kernels: installing qemu-system-x86, busybox-static, cpio, xz-utils"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-system-x86 busybox-static cpio xz-utils dpkg >/dev/null
fi

# A private apt for the kernel packages: bookworm (+updates, security,
# backports) and bullseye (+security).
apt_dir=$cache/apt
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Get::List-Cleanup=0)
apt_ready=
apt_update() {
	[ -n "$apt_ready" ] && return
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
	local key=/usr/share/keyrings/debian-archive-keyring.gpg m=http://deb.debian.org
	cat >"$apt_dir/sources.list" <<-EOF
		deb [signed-by=$key] $m/debian bookworm main
		deb [signed-by=$key] $m/debian bookworm-updates main
		deb [signed-by=$key] $m/debian-security bookworm-security main
		deb [signed-by=$key] $m/debian bookworm-backports main
		deb [signed-by=$key] $m/debian bullseye main
		deb [signed-by=$key] $m/debian-security bullseye-security main
	EOF
	echo "test-kernels: apt-get update (private lists in $apt_dir)"
	apt-get "${apt_opts[@]}" update -qq
	apt_ready=1
}

# fetch_kernel SERIES: leaves vmlinuz, veth.ko and the exact package name in
# $cache/SERIES, downloading the newest cloud kernel of that series once.
fetch_kernel() {
	local series=$1 dir=$cache/$1 pattern
	[ -s "$dir/vmlinuz" ] && [ -s "$dir/veth.ko" ] && return
	case $series in
	5.10) pattern='^linux-image-5\.10\.0-[0-9]+-cloud-amd64$' ;;
	6.1) pattern='^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' ;;
	6.12) pattern='^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$' ;;
	*) echo "test-kernels: unknown series $series (want 5.10, 6.1 or 6.12)" >&2; return 1 ;;
	esac
	apt_update
	local pkg
	pkg=$(apt-cache "${apt_opts[@]}" pkgnames linux-image- | grep -E "$pattern" | sort -V | tail -n1)
	[ -n "$pkg" ] || { echo "test-kernels: no package matches $pattern" >&2; return 1; }
	echo "test-kernels: downloading $pkg"
	local tmp=$work/deb-$series
	mkdir -p "$tmp" && (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "$pkg")
	mkdir -p "$tmp/x"
	dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$tmp/x" --wildcards './boot/vmlinuz-*' '*/drivers/net/veth.ko*'
	mkdir -p "$dir"
	cp "$tmp"/x/boot/vmlinuz-* "$dir/vmlinuz"
	local veth
	veth=$(find "$tmp/x" -name 'veth.ko*' | head -n1)
	case $veth in
	*.xz) xz -dc "$veth" >"$dir/veth.ko" ;;
	*) cp "$veth" "$dir/veth.ko" ;;
	esac
	echo "$pkg" >"$dir/package"
	rm -rf "$tmp"
}

# The initramfs: busybox, the tools the tests run (ip, nsenter, sysctl,
# setpriv) with their libraries, static test binaries and sluice.
root=$work/root
build_initramfs() {
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,proc,sys,dev,run,tmp,tests,etc}
	cp /bin/busybox "$root/bin/busybox"
	for a in sh mount umount mkdir cat echo insmod poweroff sleep uname ls timeout; do
		ln -sf busybox "$root/bin/$a"
	done
	local t lib
	for t in ip nsenter sysctl setpriv; do
		t=$(command -v "$t") || { echo "test-kernels: $t is needed (iproute2, util-linux, procps)" >&2; return 1; }
		cp "$t" "$root/usr/bin/"
		for lib in $(ldd "$t" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
			mkdir -p "$root$(dirname "$lib")"
			cp -L "$lib" "$root$lib"
		done
	done
	echo "test-kernels: building static test binaries"
	CGO_ENABLED=0 go test -c -o "$root/tests/datapath.test" ./agent/datapath
	CGO_ENABLED=0 go test -c -o "$root/tests/kernel.test" ./test/kernel
	CGO_ENABLED=0 go build -o "$root/sluice" ./cmd/sluice
	cat >"$root/init" <<-'EOF'
		#!/bin/sh
		export PATH=/usr/bin:/usr/sbin:/bin:/sbin HOME=/tmp TMPDIR=/tmp
		mount -t proc proc /proc
		mount -t sysfs sys /sys
		mount -t devtmpfs dev /dev
		mount -t tmpfs tmp /tmp
		mount -t tmpfs run /run
		mkdir -p /sys/fs/cgroup /sys/fs/bpf
		mount -t cgroup2 cgroup2 /sys/fs/cgroup
		mount -t bpf bpf /sys/fs/bpf
		ip link set lo up
		insmod /veth.ko
		echo "SLUICE-KERNEL $(uname -r)"
		rc=0
		/sluice check || rc=1
		for t in /tests/*.test; do
			echo "SLUICE-RUN $t"
			# No netfilter modules here: the conntrack test runs on the host.
			"$t" -test.v -test.count=1 -test.timeout=20m -test.run "${TESTRUN:-.}" -test.skip '^TestPrivilegedConntrack' || rc=1
		done
		echo "SLUICE-EXIT $rc"
		poweroff -f
	EOF
	chmod +x "$root/init"
}

run_kernel() {
	local series=$1 root=$2 dir=$cache/$1
	cp "$dir/veth.ko" "$root/veth.ko"
	(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initramfs-$series.cpio"
	local log=$work/console-$series.log start=$SECONDS
	# CI=true on the kernel command line reaches init's environment: a
	# privileged test that cannot run fails instead of skipping.
	timeout "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -machine q35 -smp 1 -m 1536 \
		-nodefaults -nographic -serial stdio -nic none -no-reboot \
		-kernel "$dir/vmlinuz" -initrd "$work/initramfs-$series.cpio" \
		-append "console=ttyS0 panic=-1 quiet CI=true TESTRUN=${SLUICE_KERNEL_TESTRUN:-.}" </dev/null >"$log" 2>&1 || true
	local took=$((SECONDS - start)) kver rc
	kver=$(grep -a -o 'SLUICE-KERNEL [^[:space:]]*' "$log" | head -n1 | cut -d' ' -f2)
	rc=$(grep -a -o 'SLUICE-EXIT [0-9]*' "$log" | head -n1 | cut -d' ' -f2)
	local passed skipped
	passed=$(grep -a -c -- '--- PASS' "$log" || true)
	skipped=$(grep -a -c -- '--- SKIP' "$log" || true)
	if [ "$rc" = 0 ]; then
		printf 'PASS  %-5s %-28s %4ss  %3s tests passed, %s skipped  %s\n' "$series" "${kver:-?}" "$took" "$passed" "$skipped" "$(cat "$dir/package")" | tee -a "$work/summary"
	else
		echo "---- console of $series (last 80 lines) ----"
		tail -n 80 "$log"
		printf 'FAIL  %-5s %-28s %4ss  %3s tests passed, %s skipped  %s%s\n' "$series" "${kver:-?}" "$took" "$passed" "$skipped" "$(cat "$dir/package")" \
			"$([ -z "$rc" ] && echo ' (no result: timed out or crashed)')" | tee -a "$work/summary"
	fi
	if [ -n "${SLUICE_KERNEL_LOGS:-}" ]; then
		mkdir -p "$SLUICE_KERNEL_LOGS" && cp "$log" "$SLUICE_KERNEL_LOGS/"
	fi
}

for k in $kernels; do fetch_kernel "$k"; done
build_initramfs
: >"$work/summary"
for k in $kernels; do
	echo "test-kernels: booting $k"
	run_kernel "$k" "$root"
done
echo
echo "== kernel matrix"
cat "$work/summary"
! grep -q '^FAIL' "$work/summary"
