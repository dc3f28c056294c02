#!/usr/bin/env bash
# Fuzz each target for FUZZTIME. A finding (the fuzzer writes the failing
# input to testdata/fuzz/<target>/) fails the run and prints the input.
#
# Go's fuzzing engine has a known race at the -fuzztime boundary
# (golang/go#51484, golang/go#75804): a worker still busy when the deadline
# hits makes `go test -fuzz` exit non-zero with a bare "context deadline
# exceeded" and no input written. That is no finding, so such a run is
# retried once; a second one in a row fails, as does any other error.
#
# usage: test/fuzz.sh FUZZTIME pkg:FuzzTarget...
set -uo pipefail
cd "$(dirname "$0")/.."
fuzztime=$1
shift
GO=${GO:-go}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# fuzz_once pkg fn: 0 passed, 1 finding or other failure, 2 boundary flake.
fuzz_once() {
	local pkg=$1 fn=$2 rc input
	$GO test -run '^$' -fuzz "^$fn\$" -fuzztime "$fuzztime" "$pkg" >"$log" 2>&1
	rc=$?
	if [ $rc -eq 0 ]; then
		tail -n 1 "$log"
		return 0
	fi
	input=$(sed -n 's/.*Failing input written to \(testdata\/fuzz\/[^ ]*\).*/\1/p' "$log" | head -n 1)
	if [ -z "$input" ] && grep -q 'context deadline exceeded' "$log" &&
		! grep -q 'panic:' "$log"; then
		echo "  fuzzing engine stopped at the -fuzztime boundary without a finding (golang/go#51484):"
		sed 's/^/  | /' "$log" | tail -n 6
		return 2
	fi
	echo "  FAILED:"
	sed 's/^/  | /' "$log"
	if [ -n "$input" ]; then
		echo "  the failing input, $pkg/$input (commit it: it becomes a regression test):"
		sed 's/^/  | /' "$pkg/$input"
	fi
	return 1
}

failed=0
for t in "$@"; do
	pkg=${t%%:*}
	fn=${t##*:}
	echo "fuzz $fn ($pkg, $fuzztime)"
	fuzz_once "$pkg" "$fn"
	rc=$?
	if [ $rc -eq 2 ]; then
		echo "  retrying $fn once"
		fuzz_once "$pkg" "$fn"
		rc=$?
	fi
	[ $rc -eq 0 ] || failed=1
done
exit $failed
