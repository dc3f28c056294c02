#!/bin/sh
# Removes egressd from the cluster kubectl points at:
#   1. stops the agents (the pinned datapath keeps redirecting meanwhile),
#   2. runs `egressd uninstall` on every node (daemonset/uninstall/) with the
#      image the agents ran: programs detached, pins and proxy addresses gone,
#   3. deletes the uninstall DaemonSet and everything `kubectl apply -k` made.
# Pods selected for redirection connect directly from step 2 on.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
kubectl=${KUBECTL:-kubectl}
ns=egressd

image=$($kubectl -n "$ns" get daemonset egressd -o jsonpath='{.spec.template.spec.containers[?(@.name=="agent")].image}' 2>/dev/null || true)
if [ -z "$image" ]; then
	image=${EGRESSD_IMAGE:-}
	[ -n "$image" ] || { echo "uninstall: no egressd DaemonSet found; set EGRESSD_IMAGE to the egressd image to run the node cleanup" >&2; exit 1; }
fi

echo "uninstall: stopping the agents"
$kubectl -n "$ns" delete daemonset egressd --ignore-not-found --wait=true
$kubectl -n "$ns" wait --for=delete pod -l app.kubernetes.io/component=agent --timeout=120s 2>/dev/null || true

echo "uninstall: detaching the datapath on every node with $image"
$kubectl kustomize "$dir/uninstall" | sed "s#image: localhost/egressd:dev#image: $image#" | $kubectl apply -f -
if ! $kubectl -n "$ns" rollout status daemonset/egressd-uninstall --timeout=300s; then
	echo "uninstall: some nodes did not finish; see: $kubectl -n $ns get pods -l app.kubernetes.io/component=uninstall" >&2
	exit 1
fi

echo "uninstall: removing egressd's objects"
$kubectl -n "$ns" delete daemonset egressd-uninstall --ignore-not-found --wait=true
$kubectl delete -k "$dir" --ignore-not-found
echo "uninstall: done"
