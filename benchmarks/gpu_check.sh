#!/usr/bin/env bash
# GPU check for a CUDA machine without network access (under 8 minutes on an H100/H200):
#   1. install this project in place (builds the C++/CUDA extension for the local GPU arch);
#   2. every test marked `gpu`, then the rest of the kernel test files on the GPU;
#   3. the CUDA layer benchmark (benchmarks/throughput.py --device cuda; its triton rows
#      include the forced fused / split / split-K paths);
#   4. the split-K decode benchmark: fused vs split-K (the heuristic's count and forced
#      counts 2, 4, 8) at M = 1, 4, 16, K = N = 4096, bf16, r = 8 (benchmarks/cuda_layer_bench.py;
#      skip with SPLITK_SWEEP=0);
#   5. short summary tables, printed last.
# Usage: bash benchmarks/gpu_check.sh     Logs (install, pytest_gpu, pytest_kernels, tests,
# bench, splitk), throughput_cuda.json, its PNG and splitk_decode.json go to $RESULTS_DIR
# (default: $OUT if set, else bench_results/): 9 files. Each step has a time limit
# (120 + 200 + 170 + 100 s) so the whole script stays under 10 minutes (8 with
# SPLITK_SWEEP=0); the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-${OUT:-bench_results}}
mkdir -p "$RESULTS_DIR"
T0=$SECONDS
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME LIMIT_SECONDS LOG COMMAND...
    local name=$1 limit=$2 log=$3; shift 3
    local t=$SECONDS
    echo "== $name (limit ${limit}s) ..."
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local last
    last=$(grep -E "passed|failed|error|skipped" "$log" | tail -n 1)
    [ $rc -eq 124 ] && last="TIMED OUT after ${limit}s"
    SUMMARY+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t))" "${last:0:90}")")
    if [ $rc -ne 0 ]; then FAILED=1; echo "-- $name failed (rc=$rc), last lines of $log:"; tail -n 25 "$log"; fi
}

python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name()}")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
# Build the CUDA extension for this GPU only (faster than the default "8.0;9.0").
export MOGU_CUDA_ARCH=${MOGU_CUDA_ARCH:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
unset TRITON_INTERPRET

step "install" 120 "$RESULTS_DIR/install.log" pip install --no-build-isolation --no-deps -e .
python -c "import mogu_kernels; print('backends on cuda:', mogu_kernels.available_backends('cuda'))" \
    2>&1 | tee -a "$RESULTS_DIR/install.log"

# Tests: the `gpu`-marked ones, and the rest of the kernel test files (each odd shape is a
# new Triton compile, so they run as $SHARDS parallel pytest processes: compiles are
# CPU-bound and the GPU is mostly idle). Node ids go through xargs, never the shell glob.
SHARDS=${SHARDS:-6}
KERNEL_TESTS=$(ls tests/test_triton_backend.py tests/test_extension.py tests/test_op_contract.py 2>/dev/null)
run_tests() {
    local work
    work=$(mktemp -d)
    python -m pytest tests -m gpu -q -rs >"$RESULTS_DIR/pytest_gpu.log" 2>&1 &
    local pids=($!)
    python -m pytest $KERNEL_TESTS -m "not gpu" -q --collect-only 2>/dev/null | grep "::" >"$work/ids.txt"
    split -n "r/$SHARDS" -d "$work/ids.txt" "$work/shard_"
    for f in "$work"/shard_[0-9][0-9]; do
        [ -s "$f" ] || continue
        xargs -a "$f" python -m pytest -q -p no:cacheprovider >"$f.log" 2>&1 &
        pids+=($!)
    done
    local rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    cat "$work"/shard_*.log >"$RESULTS_DIR/pytest_kernels.log"
    echo "gpu-marked: $(grep -E 'passed|failed|error|skipped' "$RESULTS_DIR/pytest_gpu.log" | tail -n 1)"
    local passed failed
    passed=$(grep -oE '[0-9]+ passed' "$RESULTS_DIR/pytest_kernels.log" | awk '{s+=$1} END {print s+0}')
    failed=$(grep -oE '[0-9]+ (failed|error)' "$RESULTS_DIR/pytest_kernels.log" | awk '{s+=$1} END {print s+0}')
    [ "$rc" -eq 0 ] || grep -hE "^(FAILED|ERROR)" "$RESULTS_DIR/pytest_gpu.log" "$RESULTS_DIR/pytest_kernels.log" | head -n 30
    echo "kernel test files, $SHARDS shards: $passed passed, $failed failed/errors"
    rm -rf "$work"
    return $rc
}
export RESULTS_DIR SHARDS KERNEL_TESTS
export -f run_tests
step "tests" 200 "$RESULTS_DIR/tests.log" bash -c run_tests
cat "$RESULTS_DIR/tests.log"

step "layer benchmark" 170 "$RESULTS_DIR/bench.log" \
    python benchmarks/throughput.py --device cuda --json "$RESULTS_DIR/throughput_cuda.json"

# Split-K decode (issue 16 item 6): re-measure the heuristic (triton_backend.split_k_count).
if [ "${SPLITK_SWEEP:-1}" != "0" ]; then
    step "split-K decode bench" 100 "$RESULTS_DIR/splitk.log" \
        python benchmarks/cuda_layer_bench.py --backends triton --d 4096 --ranks 8 --Ms 1,4,16 \
            --paths fused,splitk --split-k 2,4,8 --json "$RESULTS_DIR/splitk_decode.json"
fi

echo
echo "================ summary ($((SECONDS - T0))s) ================"
printf '%s\n' "${SUMMARY[@]}"
python - "$RESULTS_DIR/throughput_cuda.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError, KeyError) as exc:
    print(f"(no benchmark results: {exc})"); sys.exit(0)
rows = [r for r in rows if r.get("kind", "layer") == "layer"]
impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "base"]
shapes = list(dict.fromkeys(r["shape"] for r in rows))
print("\ntime / cuBLAS base F.linear (lower is better); base column in ms")
print(f"{'shape':<28}{'base ms':>9}" + "".join(f"{i:>20}" for i in impls))
for s in shapes:
    cell = {r["impl"]: r for r in rows if r["shape"] == s}
    line = f"{s:<28}{cell['base']['ms']:>9.4f}"
    line += "".join(f"{cell[i]['ratio_to_base']:>19.2f}x" if i in cell else f"{'-':>20}" for i in impls)
    print(line)
EOF
python - "$RESULTS_DIR/splitk_decode.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError, KeyError) as exc:
    print(f"\n(no split-K results: {exc})"); sys.exit(0)
print("\nsplit-K decode: time / cuBLAS base F.linear (lower is better); auto = mogu:triton")
cols = [("auto", "mogu:triton"), ("fused", "mogu:triton/fused")]
cols += [(r["impl"].split("/", 1)[1], r["impl"]) for r in rows if r["impl"].startswith("mogu:triton/splitk")]
cols = list(dict.fromkeys(cols))
print(f"{'shape':<28}{'base ms':>9}" + "".join(f"{c:>11}" for c, _ in cols) + "   best split-K vs fused")
for s in dict.fromkeys(r["shape"] for r in rows):
    cell = {r["impl"]: r for r in rows if r["shape"] == s}
    line = f"{s:<28}{cell['base']['ms']:>9.4f}"
    line += "".join(f"{cell[i]['ratio_to_base']:>10.2f}x" if i in cell else f"{'-':>11}" for _, i in cols)
    split = [r for r in cell.values() if r["impl"].startswith("mogu:triton/splitk")]
    if split and "mogu:triton/fused" in cell:
        best = min(split, key=lambda r: r["ms"])
        line += f"   SPLIT_K={best['split_k']}: {cell['mogu:triton/fused']['ms'] / best['ms']:.2f}x faster"
    print(line)
EOF
exit $FAILED
