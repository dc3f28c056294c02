#!/usr/bin/env bash
# Refresh the vendored headers under bpf/include from pinned Debian packages.
# We take libbpf's BPF-side headers and the kernel's UAPI <linux/bpf.h> from
# Debian's archive (the only package source reachable from our build machines),
# at exact versions, so a refresh is reproducible and reviewable as a diff.
set -euo pipefail

LIBBPF_DEB_VERSION="1:1.1.2-0+deb12u1"   # libbpf v1.1.2
LINUX_LIBC_DEB_VERSION="6.1.192-2"       # kernel UAPI headers v6.1

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
apt-get download "libbpf-dev=${LIBBPF_DEB_VERSION}" "linux-libc-dev=${LINUX_LIBC_DEB_VERSION}"
for deb in ./*.deb; do dpkg -x "$deb" root; done

for h in bpf_helpers.h bpf_helper_defs.h bpf_endian.h; do
	install -m 0644 "root/usr/include/bpf/$h" "$here/bpf/$h"
done
for h in bpf.h bpf_common.h; do
	install -m 0644 "root/usr/include/linux/$h" "$here/linux/$h"
done
echo "updated headers: libbpf ${LIBBPF_DEB_VERSION}, linux UAPI ${LINUX_LIBC_DEB_VERSION}"
