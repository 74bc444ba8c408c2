#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for SECS seconds (default 60) and prints,
# per target, the executions, the working corpus and the findings. Exits non-zero when a target
# crashed, hung or ran out of memory; the input that did it is in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECS] [TARGET...]
#   FUZZ_JOBS=2 scripts/fuzz.sh 300     # two targets at a time (default one: shared machine)
#
# The bodies are in src/fuzzing/ (the stable regression test tests/fuzz_regressions.rs runs the
# same ones over the committed corpus). libFuzzer starts from fuzz/corpus/<target>/ (committed
# seeds, read only) and writes what it finds to fuzz/work/<target>/ (ignored by git; delete it
# to start afresh). A crash input, minimized with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET -minimize_crash=1 -runs=10000 FILE
# goes to fuzz/corpus/<target>/crash-NAME, with a unit test beside the fix.
#
# cargo fuzz needs nightly compiler flags (sanitizers, -Z options). This machine's toolchain
# is stable, and RUSTC_BOOTSTRAP=1 makes stable accept them; set FUZZ_TOOLCHAIN=nightly to use
# `cargo +nightly` instead. The fuzzers run in a network namespace of their own when
# `unshare --net` works (root, or user namespaces): only a downed loopback exists there, so no
# input can reach a network whatever the code under test does (the link target is built so
# that it opens no host socket anyway; see src/fuzzing/link.rs).
set -euo pipefail

secs=${1:-60}
shift || true
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    cargo_fuzz=(cargo "+$FUZZ_TOOLCHAIN" fuzz)
else
    export RUSTC_BOOTSTRAP=1
    cargo_fuzz=(cargo fuzz)
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <("${cargo_fuzz[@]}" list)
fi
for t in "${targets[@]}"; do
    [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target $t" >&2; exit 2; }
done

# Release, debug assertions and overflow checks, AddressSanitizer: cargo fuzz's defaults.
"${cargo_fuzz[@]}" build >&2
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release

isolate=()
if unshare --net true 2>/dev/null; then
    isolate=(unshare --net)
else
    echo "fuzz.sh: unshare --net is not available; fuzzing in this network namespace" >&2
fi

mkdir -p fuzz/work fuzz/artifacts
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT

# Runs one target; writes "name execs corpus findings rc" to $results/name.
run_target() {
    local t=$1 work=fuzz/work/$1 art=fuzz/artifacts/$1 log=fuzz/work/$1.log
    mkdir -p "$work" "$art"
    local max_len
    max_len=$(sed -n 's/.*libFuzzer -max_len: \([0-9]*\).*/\1/p' "fuzz/fuzz_targets/$t.rs")
    local before after rc=0
    before=$(find "$art" -type f | wc -l)
    "${isolate[@]}" "$bin_dir/$t" -max_total_time="$secs" -max_len="${max_len:-4096}" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$art/" \
        "$work" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    after=$(find "$art" -type f | wc -l)
    local execs corpus
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    corpus=$(find "$work" -type f | wc -l)
    echo "$t ${execs:-?} $corpus $((after - before)) $rc" >"$results/$t"
}

jobs_max=${FUZZ_JOBS:-1}
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
        wait -n || true
    done
    echo "fuzz.sh: $t for ${secs}s" >&2
    run_target "$t" &
done
wait

failed=0
printf '%-16s %12s %8s %9s\n' target executions corpus findings
for t in "${targets[@]}"; do
    read -r name execs corpus findings rc <"$results/$t"
    status=ok
    if [ "$rc" -ne 0 ] || [ "$findings" -ne 0 ]; then
        status="FAILED (exit $rc; log fuzz/work/$name.log, inputs fuzz/artifacts/$name/)"
        failed=1
    fi
    printf '%-16s %12s %8s %9s  %s\n' "$name" "$execs" "$corpus" "$findings" "$status"
done
exit $failed
