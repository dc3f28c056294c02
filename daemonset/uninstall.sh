#!/bin/sh
# Removes sluice from the cluster kubectl points at:
#   1. stops the agents (the pinned datapath keeps redirecting meanwhile),
#   2. runs `sluice uninstall` on every node (daemonset/uninstall/) with the
#      image the agents ran: programs detached, pins and proxy addresses gone,
#   3. deletes the uninstall DaemonSet and everything `kubectl apply -k` made.
# Pods selected for redirection connect directly from step 2 on.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
kubectl=${KUBECTL:-kubectl}
ns=sluice-system

image=$($kubectl -n "$ns" get daemonset sluice -o jsonpath='{.spec.template.spec.containers[?(@.name=="agent")].image}' 2>/dev/null || true)
if [ -z "$image" ]; then
	image=${SLUICE_IMAGE:-}
	[ -n "$image" ] || { echo "uninstall: no sluice DaemonSet found; set SLUICE_IMAGE to the sluice image to run the node cleanup" >&2; exit 1; }
fi

echo "uninstall: stopping the agents"
$kubectl -n "$ns" delete daemonset sluice --ignore-not-found --wait=true
$kubectl -n "$ns" wait --for=delete pod -l app.kubernetes.io/component=agent --timeout=120s 2>/dev/null || true

echo "uninstall: detaching the datapath on every node with $image"
$kubectl kustomize "$dir/uninstall" | sed "s#image: localhost/sluice:dev#image: $image#" | $kubectl apply -f -
if ! $kubectl -n "$ns" rollout status daemonset/sluice-uninstall --timeout=300s; then
	echo "uninstall: some nodes did not finish; see: $kubectl -n $ns get pods -l app.kubernetes.io/component=uninstall" >&2
	exit 1
fi

echo "uninstall: removing sluice's objects"
$kubectl -n "$ns" delete daemonset sluice-uninstall --ignore-not-found --wait=true
$kubectl delete -k "$dir" --ignore-not-found
echo "uninstall: done"
