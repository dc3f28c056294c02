#!/bin/sh
# Docker (Debian's), kind and kubectl (pinned releases, checksums verified),
# and what building the image needs besides Docker: make.
set -eu
export DEBIAN_FRONTEND=noninteractive
KIND_VERSION=v0.33.0
KUBECTL_VERSION=v1.37.1

apt-get update -qq
apt-get install -y -qq docker.io curl make ca-certificates jq >/dev/null
systemctl enable --now docker

fetch() { # url dest: download and verify against the published sha256
	curl -fsSLo "$2" "$1"
	sum=$(curl -fsSL "$1.sha256" 2>/dev/null || curl -fsSL "$1.sha256sum")
	echo "${sum%% *}  $2" | sha256sum -c -
	chmod +x "$2"
}
fetch "https://kind.sigs.k8s.io/dl/$KIND_VERSION/kind-linux-amd64" /usr/local/bin/kind
fetch "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/amd64/kubectl" /usr/local/bin/kubectl
echo "kernel $(uname -r); $(docker --version); kind $(kind version); kubectl $(kubectl version --client -o json | jq -r .clientVersion.gitVersion)"
echo "cgroup: $(stat -fc %T /sys/fs/cgroup) (sluice needs cgroup2fs)"
