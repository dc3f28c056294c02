#!/usr/bin/env bash
# sluice end to end on kind with the official Envoy (the Vagrant VM runs
# this; so can any Linux machine with Docker, kind, kubectl and make):
#   - an audit pod's request to the in-cluster "external" server goes
#     through Envoy and is in Envoy's access log with the pod's name;
#   - an enforce pod reaches its allowed host and gets sluice's 403 for
#     another;
#   - an unlabelled pod goes direct;
#   - after daemonset/uninstall.sh, the audit pod goes direct too.
# SLUICE_KIND_KEEP=1 keeps the cluster for a look around afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
cluster=${SLUICE_KIND_CLUSTER:-sluice-e2e}
image=localhost/sluice:dev
export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/sluice-e2e}

step() { echo; echo "== $*"; }
diagnostics() {
	kubectl get pods -A -o wide || true
	kubectl -n sluice-system logs ds/sluice -c agent --tail=40 || true
	kubectl -n sluice-system logs ds/sluice -c envoy --tail=40 || true
}
fail() { echo "FAIL: $*" >&2; diagnostics >&2; exit 1; }
cleanup() { [ -n "${SLUICE_KIND_KEEP:-}" ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# curl from a pod: prints the body, then the status code on its own line.
fetch() { kubectl -n e2e exec "$1" -- curl -sS -m 10 -w '\n%{http_code}' "$2" || true; }
status() { tail -n1 <<<"$1"; }
body() { sed '$d' <<<"$1"; }
pod_ip() { kubectl -n e2e get pod "$1" -o jsonpath='{.status.podIP}'; }

step "kernel $(uname -r), cgroup $(stat -fc %T /sys/fs/cgroup)"
step "building $image"
make image IMAGE="$image" VERSION=e2e-kind

step "creating kind cluster $cluster"
kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
kind create cluster --name "$cluster" --config test/e2e-kind/kind.yaml --wait 180s
kind load docker-image "$image" --name "$cluster"

step "installing sluice (daemonset/ with kind's kubelet settings)"
kubectl apply -k test/e2e-kind/overlay
kubectl -n sluice-system rollout status ds/sluice --timeout=300s || fail "sluice did not become ready"
kubectl -n sluice-system exec ds/sluice -c agent -- /sluice check

step "starting the workloads"
kubectl apply -f test/e2e-kind/workloads.yaml
kubectl -n e2e wait --for=condition=Ready pod --all --timeout=300s || fail "workloads not ready"
# The agent selects pods as the API reports them; give the xDS push a moment.
for _ in $(seq 30); do
	kubectl -n sluice-system exec ds/sluice -c agent -- /sluice status 2>/dev/null | grep -q 'e2e/enforce' && break
	sleep 1
done
kubectl -n sluice-system exec ds/sluice -c agent -- /sluice status

step "audit pod: redirected through Envoy, logged with its name"
out=$(fetch audit http://external.e2e.svc:8080/clientip)
[ "$(status "$out")" = 200 ] || fail "audit pod got $(status "$out"): $(body "$out")"
seen=$(body "$out"); seen=${seen%:*}
[ "$seen" != "$(pod_ip audit)" ] || fail "the server saw the audit pod's own address $seen: not redirected"
echo "server saw $seen (Envoy), not the pod's $(pod_ip audit)"
sleep 2 # Envoy flushes its access log
line=$(kubectl -n sluice-system logs ds/sluice -c envoy | grep -E '"pod": ?"audit"' | tail -n1) ||
	fail "no access log line for pod audit"
echo "$line"

step "enforce pod: allowed host passes, another host gets sluice's 403"
out=$(fetch enforce http://external.e2e.svc:8080/clientip)
[ "$(status "$out")" = 200 ] || fail "enforce pod to its allowed host got $(status "$out"): $(body "$out")"
out=$(fetch enforce http://blocked.e2e.svc:8080/clientip)
[ "$(status "$out")" = 403 ] && grep -q sluice <<<"$(body "$out")" || fail "enforce pod to a disallowed host got $(status "$out"): $(body "$out")"
echo "denied: $(body "$out")"

step "unlabelled pod: direct"
out=$(fetch plain http://external.e2e.svc:8080/clientip)
seen=$(body "$out"); seen=${seen%:*}
[ "$(status "$out")" = 200 ] && [ "$seen" = "$(pod_ip plain)" ] || fail "plain pod: $(status "$out"), server saw $seen, pod is $(pod_ip plain)"
echo "server saw the pod's own address $seen"

step "uninstall: programs detached on every node, the audit pod goes direct"
daemonset/uninstall.sh
out=$(fetch audit http://external.e2e.svc:8080/clientip)
seen=$(body "$out"); seen=${seen%:*}
[ "$(status "$out")" = 200 ] && [ "$seen" = "$(pod_ip audit)" ] || fail "after uninstall the audit pod: $(status "$out"), server saw $seen"

step "PASS: sluice end to end on kind, kernel $(uname -r)"
