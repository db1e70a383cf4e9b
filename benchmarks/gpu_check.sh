#!/usr/bin/env bash
# The GPU check, needing nothing beyond python + torch + triton (no sglang; matplotlib is
# optional, safetensors is needed for step 4's bundled pair).
#
#   benchmarks/gpu_check.sh OUTDIR              # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-smoke OUTDIR  # the same scripts on CPU, small
#
# 1. compile_check.json: every Triton kernel compiled for sm_90 and sm_100 at serving
#    shapes (registers, spills, shared memory; fails on a spill or a limit).
# 2. kernels_smoke.json, kernels.json (+ png): every op against its torch twin on the
#    device, small irregular shapes, then µs and GB/s at Kimi-Linear / drafter shapes;
#    gpu_check.json adds each op's fraction of the HBM roofline.
# 3. draft_step.json: the draft step eager vs replayed from CUDA graphs at B 1/8/32:
#    µs per step, launches per step; graph and eager candidates must be equal.
# 4. reference_e2e.json: the reference engine on the tiny Kimi-Linear pair with the
#    Triton and torch ops: lossless (DFlash tokens == plain greedy tokens) and tau.
# 5. verify_cost/verify_cost.json: one Kimi-Linear MoE, KDA and MLA layer timed for decode
#    (B tokens) and verify (B x W tokens), the table `sglang-dflash plan --cost` reads.
# 6. gpu_check.json: exit code of every part and the roofline table. Exit status 0 = all
#    passed; any mismatch fails its part and the script.
# The package is staged from this checkout (kernels/ as sglang_dflash.kernels), so the
# check needs no install and always tests the working tree.
# KERNEL_BENCH_ONLY=text limits the kernel runs to the cases whose name contains it.
set -uo pipefail

smoke=0
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=1; shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--cpu-smoke] OUTDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
only=${KERNEL_BENCH_ONLY:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$repo/sglang_dflash" "$stage/sglang_dflash"
rm -rf "$stage/sglang_dflash/kernels"
cp -r "$repo/kernels" "$stage/sglang_dflash/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"

if [ "$smoke" -eq 1 ]; then
    # the kernels run in Triton's interpreter; compile_check compiles for real regardless
    export TRITON_INTERPRET=1
    # one small case per part: the plumbing and the imports (tests/test_compile_check.py,
    # test_kernel_bench.py and test_draft_graph.py cover the parts themselves)
    compile_args=(--subset ci --only combine_shards)
    bench_smoke=(--smoke --only "${only:-accept_greedy B3}")
    bench_full=()
    step_args=(--smoke --batches 3)
    e2e_args=(--device cpu --backends torch --blocks 16 --max-new 12 --prompts 2)
    cost_args=(--shapes tiny --batch 1,2 --widths 1,3)
else
    unset TRITON_INTERPRET
    "$python" - <<'PY' || { echo "gpu_check: torch/triton/CUDA not usable" >&2; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY
    compile_args=(--subset full --jobs 8)
    bench_smoke=(--smoke --only "$only")
    bench_full=(--only "$only")
    step_args=(--batches 1 8 32)
    e2e_args=(--device cuda)
    cost_args=()
fi

cd "$repo"
start=$(date +%s)
run() {  # run NAME CMD...: the command's output to NAME.log and the terminal, its status to rc_NAME
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    printf -v "rc_$name" '%s' "${PIPESTATUS[0]}"
}
run compile_check "$python" benchmarks/compile_check.py "${compile_args[@]}" --out "$out"
run kernels_smoke "$python" benchmarks/kernel_bench.py "${bench_smoke[@]}" --tag kernels_smoke --out "$out"
if [ "$smoke" -eq 0 ]; then
    run kernels "$python" benchmarks/kernel_bench.py "${bench_full[@]}" --tag kernels --out "$out"
else
    rc_kernels=0
fi
run draft_step "$python" benchmarks/draft_step_bench.py "${step_args[@]}" --out "$out"
run reference_e2e "$python" benchmarks/reference_e2e.py "${e2e_args[@]}" --out "$out"
run verify_cost "$python" benchmarks/verify_cost.py "${cost_args[@]}" --out "$out/verify_cost"

"$python" benchmarks/gpu_check_summary.py "$out" "$start" "$smoke" \
    compile_check="$rc_compile_check" kernels_smoke="$rc_kernels_smoke" kernels="$rc_kernels" \
    draft_step="$rc_draft_step" reference_e2e="$rc_reference_e2e" verify_cost="$rc_verify_cost"
