#!/usr/bin/env bash
# Builds the real kube-apiserver, kubelet, kube-controller-manager and
# kube-scheduler from test/k8s/apiserver (a module of its own: k8s.io/kubernetes
# needs a replace per staging module; the others are its ./kubelet,
# ./controller-manager and ./scheduler, same version, same replace list)
# into a cache keyed by version, installs Debian's etcd-server when etcd is
# missing, and prints the kube-apiserver path (the others are next to it).
# A warm cache makes this a no-op.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit} $1 == "require" && $2 == "k8s.io/kubernetes" {print $3; exit}' "$here/apiserver/go.mod")
cache=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}/k8s-$version
bin=$cache/kube-apiserver
if [ ! -x "$bin" ]; then
	echo "building kube-apiserver $version into $cache (6-11 minutes on 2 cores the first time)..." >&2
	mkdir -p "$cache"
	tmp=$(mktemp -d "$cache/build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$here/apiserver" && GOFLAGS=-mod=readonly CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/kube-apiserver" .)
	mv "$tmp/kube-apiserver" "$bin"
	echo "built $bin" >&2
fi
# The node components of the real-node test (test/node), from the same
# module: the kubelet, and the DaemonSet controller and scheduler.
for cmd in kubelet:kubelet controller-manager:kube-controller-manager scheduler:kube-scheduler; do
	src=${cmd%%:*} name=${cmd##*:}
	if [ ! -x "$cache/$name" ]; then
		echo "building $name $version into $cache (1-3 minutes on 2 cores after the API server)..." >&2
		mkdir -p "$cache"
		tmp=$(mktemp -d "$cache/build.XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		(cd "$here/apiserver" && GOFLAGS=-mod=readonly CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/$name" "./$src")
		mv "$tmp/$name" "$cache/$name"
		rmdir "$tmp"
		echo "built $cache/$name" >&2
	fi
done
if ! command -v etcd >/dev/null; then
	echo "installing etcd-server..." >&2
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
echo "$bin"
