#!/bin/sh
# Installs the kernel the Vagrant VM should boot (SLUICE_KERNEL, see the
# Vagrantfile); Vagrant reboots the VM afterwards.
set -eu
export DEBIAN_FRONTEND=noninteractive
case "${SLUICE_KERNEL:-6.1}" in
6.1)
	pkgs=linux-image-amd64 ;;
6.12)
	echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/bookworm-backports.list
	pkgs="-t bookworm-backports linux-image-amd64" ;;
linux-image-*)
	pkgs=$SLUICE_KERNEL ;;
*)
	echo "SLUICE_KERNEL=$SLUICE_KERNEL: want 6.1, 6.12 or a linux-image-* package" >&2
	exit 1 ;;
esac
apt-get update -qq
# shellcheck disable=SC2086 # $pkgs is words on purpose
apt-get install -y -qq $pkgs
echo "installed kernels:"; ls /boot/vmlinuz-*
