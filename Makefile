# sluice — run `make help` for the targets.
SHELL := /bin/bash
GO ?= go
BIN := bin
CLANG ?= clang-14
GOTEST_FLAGS ?= -count=1
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
export CGO_ENABLED ?= 0

.DEFAULT_GOAL := build

## help: list the targets
.PHONY: help
help:
	@grep -hE '^## ' $(MAKEFILE_LIST) | sed 's/^## /  /' | column -t -s ':'

## build: build the binaries into bin/
.PHONY: build
build:
	$(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BIN)/ ./cmd/sluice
	$(GO) build -o $(BIN)/ ./test/cmd/standin-proxy

## deps-test: install what the tests need on a fresh Debian machine (iproute2, nsenter; containerd, runc and the CNI plugins for the real-node test)
.PHONY: deps-test
deps-test:
	@command -v ip >/dev/null && command -v nsenter >/dev/null && command -v nft >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux nftables >/dev/null; }
	@if [ "$$(id -u)" = 0 ]; then command -v containerd >/dev/null && command -v runc >/dev/null && test -x /usr/lib/cni/bridge || { \
		echo "installing containerd, runc and the CNI plugins for the real-node test..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc containernetworking-plugins >/dev/null; \
		systemctl disable --now containerd >/dev/null 2>&1 || true; }; fi

## deps-generate: install clang/llvm 14 to regenerate the BPF objects
.PHONY: deps-generate
deps-generate:
	@command -v $(CLANG) >/dev/null && command -v llvm-strip >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-14 llvm-14 >/dev/null; \
		command -v llvm-strip >/dev/null || ln -sf /usr/bin/llvm-strip-14 /usr/local/bin/llvm-strip; }

## generate: recompile bpf/*.c into the committed bpf2go output (needs clang-14); regenerate the policy API's deepcopy, CRDs, clients, listers and informers; render the kustomize install from the Helm chart
.PHONY: generate
generate: deps-generate
	$(GO) generate ./agent/datapath/ ./policy/
	$(GO) run ./daemonset/generate

# What daemonset/generate writes from the chart.
CHART_GENERATED = daemonset/rbac.yaml daemonset/configmap.yaml daemonset/daemonset.yaml daemonset/monitoring/monitoring.yaml daemonset/uninstall/daemonset.yaml charts/sluice/crds/

## verify: regenerate and fail if the committed BPF objects or Go code are stale; gofmt and vet
.PHONY: verify
verify: generate
	@git diff --exit-code -- agent/datapath/ || { echo "committed bpf2go output is stale: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- policy/ daemonset/crds/)" || { git status --short -- policy/ daemonset/crds/; git diff -- policy/ daemonset/crds/ | head -50; echo "committed generated policy API code or CRDs are stale: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- $(CHART_GENERATED))" || { git status --short -- $(CHART_GENERATED); git diff -- $(CHART_GENERATED) | head -50; echo "the kustomize install differs from what the chart renders (charts/sluice is the source): run 'make generate' and commit"; exit 1; }
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

## deps-k8s: build the real kube-apiserver (cached by version) and install etcd, for the Kubernetes tests
.PHONY: deps-k8s
deps-k8s:
	@test/k8s/build.sh >/dev/null

## test: run every test, the datapath's kernel tests again in the workloads attach scope, the xDS package's again under the race detector (it builds and validates on every CPU), then fuzz each parser of outside input briefly; as root the privileged kernel tests and the real API server tests run too (under CI=true they must)
.PHONY: test
test: deps-test
	apiserver=$$(test/k8s/build.sh) && SLUICE_KUBE_APISERVER=$$apiserver $(GO) test $(GOTEST_FLAGS) ./...
	SLUICE_TEST_SCOPE=workloads $(GO) test $(GOTEST_FLAGS) ./test/kernel/
	CGO_ENABLED=1 $(GO) test $(GOTEST_FLAGS) -race ./xds/
	$(MAKE) --no-print-directory fuzz

# The fuzz targets: every parser of input from outside the agent, and the
# policy merge (checked against its definition).
FUZZ_TARGETS := ./policy:FuzzParseAllowList ./policy:FuzzMerge ./xds:FuzzBuildFromPod ./agent:FuzzParseWorkloadFile ./agent:FuzzParseResolvers
FUZZTIME ?= 8s

## fuzz: run each fuzz target for FUZZTIME (default 8s); findings land in testdata/fuzz, commit them as regression tests
.PHONY: fuzz
fuzz:
	@GO=$(GO) test/fuzz.sh $(FUZZTIME) $(FUZZ_TARGETS)

## test-kernels: the privileged datapath tests inside Debian kernels 5.10, 6.1 and 6.12 under qemu (root; SLUICE_KERNELS to choose)
.PHONY: test-kernels
test-kernels: deps-test
	test/kernels/run.sh

## test-unit: only the tests that need no privileges
.PHONY: test-unit
test-unit:
	$(GO) test $(GOTEST_FLAGS) -run 'Test[^P]|TestP[^r]' ./...

## bench: measure the redirect's cost side by side (root, < 10 min); writes bench/out/report.md and report.json
.PHONY: bench
bench: deps-test
	@{ command -v nft && command -v iptables-restore; } >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iptables >/dev/null; }
	rm -rf bench/out && mkdir -p bench/out
	set -o pipefail; apiserver=$$(test/k8s/build.sh) && SLUICE_KUBE_APISERVER=$$apiserver SLUICE_BENCH_OUT=$(CURDIR)/bench/out $(GO) test -count=1 -timeout 20m -run TestPrivilegedBench -v ./bench/ 2>&1 | tee bench/out/bench.log
	set -o pipefail; $(GO) test -count=1 -run '^$$' -bench 'Build|UpdateOneChange' -benchmem -benchtime 10x ./xds/ 2>&1 | tee bench/out/xds.txt
	set -o pipefail; $(GO) test -count=1 -run '^$$' -bench 'UpdateFull' -benchmem -benchtime 10x ./xds/ 2>&1 | grep -E '^Benchmark' | tee -a bench/out/xds.txt
	set -o pipefail; GOMAXPROCS=1 $(GO) test -count=1 -run '^$$' -bench 'UpdateFull' -benchmem -benchtime 10x ./xds/ 2>&1 | grep -E '^Benchmark' | tee -a bench/out/xds.txt
	set -o pipefail; $(GO) test -count=1 -run '^$$' -bench 'Update250x20|UpdateUnchanged' -benchmem -benchtime 200x ./xds/ 2>&1 | grep -E '^Benchmark' | tee -a bench/out/xds.txt
	set -o pipefail; $(GO) test -count=1 -run '^$$' -bench BenchmarkConnection -benchtime 1000x ./test/conformance/ 2>&1 | tee bench/out/conformance.txt
	{ cat bench/out/connect.md; echo; cat bench/out/scope.md; echo; cat bench/out/http.md; echo; cat bench/out/bulk.md; cat bench/out/flows.md; cat bench/out/clash.md; echo; cat bench/out/controlplane.md; echo; \
	  echo '# xDS: build, validate and publish for 250 workloads x 20 allow entries'; echo; \
	  echo 'Go benchmarks in xds/bench_test.go on the same machine: builds and full rebuilds 10 iterations each (full rebuilds with GOMAXPROCS 2, the -2 suffix, and 1, none: a build and its validation use every CPU the process may; the testing flag -cpu does not hold GOMAXPROCS at 1 here, the environment does), one change and no change among 250 workloads 200 each (a few milliseconds or less, so 10 were noise); cpu-ns/op is the CPU time of the process per update, ns/op the wall time.'; echo; \
	  echo '```'; grep -E '^(cpu:|Benchmark)' bench/out/xds.txt; echo '```'; echo; \
	  echo '# One connection through the conformance proxy, by the rule that allows it'; echo; \
	  echo 'test/conformance/bench_test.go, 1,000 connections each, side by side; the conformance proxy, not Envoy.'; echo; \
	  echo '```'; grep -E '^Benchmark' bench/out/conformance.txt; echo '```'; } > bench/out/report.md
	{ echo '{"connect":'; cat bench/out/connect.json; echo ',"scope":'; cat bench/out/scope.json; echo ',"http":'; cat bench/out/http.json; echo ',"bulk":'; cat bench/out/bulk.json; \
	  echo ',"control_plane":'; cat bench/out/controlplane.json; echo ',"xds_benchmarks":'; \
	  grep -E '^Benchmark' bench/out/xds.txt | awk 'BEGIN{printf "["} {if (NR>1) printf ","; printf "{\"name\":\"%s\",\"iterations\":%s", $$1, $$2; for (i = 3; i < NF; i += 2) { u = $$(i+1); sub(/\/op$$/, "_per_op", u); gsub(/-/, "_", u); if (u == "B_per_op") u = "bytes_per_op"; printf ",\"%s\":%s", u, $$i }; printf "}"} END{print "]"}'; \
	  echo '}'; } > bench/out/report.json
	@echo "report: bench/out/report.md, bench/out/report.json"

## image: build the container image $(IMAGE) (needs a Docker engine; the Dockerfile runs the same make targets as CI)
IMAGE ?= localhost/sluice:dev
.PHONY: image
image:
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

## demo: throwaway node/pod testbed on this kernel showing redirection end to end (root)
.PHONY: demo
demo: deps-test
	set -o pipefail; SLUICE_DEMO=1 $(GO) test -count=1 -run TestDemo -v ./test/demo/ 2>&1 | grep -v -E '^(=== RUN|--- PASS|PASS|ok )'

## clean: remove build output
.PHONY: clean
clean:
	rm -rf $(BIN) bench/out
