#!/usr/bin/env bash
# GPU check of the Triton kernels, needing nothing beyond python + torch + triton
# (matplotlib optional: without it there is no plot).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# 1. kernels_smoke.json: every op against its torch twin on small irregular shapes,
#    compiled for the GPU (masks, tails, ragged batches).
# 2. kernels.json (+ kernels.png): the same checks, then µs / GB/s against the twins,
#    at Kimi-Linear / DFlash drafter shapes.
# 3. gpu_check.json: exit codes of both, and what ran where.
# The package is staged from this checkout (kernels/ as sglang_dflash.kernels), so the
# check needs no install and always tests the working tree. Exit status 0 = all passed.
# KERNEL_BENCH_ONLY=text limits both runs to the cases whose name contains it.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
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
# real compilation, never the interpreter
unset TRITON_INTERPRET

"$python" - <<'EOF' || { echo "gpu_check: torch/triton/CUDA not usable" >&2; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF

cd "$repo"
start=$(date +%s)
"$python" benchmarks/kernel_bench.py --smoke --only "$only" --tag kernels_smoke --out "$out" \
    2>&1 | tee "$out/kernels_smoke.log"
smoke_rc=${PIPESTATUS[0]}
"$python" benchmarks/kernel_bench.py --only "$only" --tag kernels --out "$out" 2>&1 | tee "$out/kernels.log"
bench_rc=${PIPESTATUS[0]}

"$python" - "$out" "$smoke_rc" "$bench_rc" "$start" <<'EOF'
import json, subprocess, sys, time
import torch, triton
out, smoke_rc, bench_rc, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
summary = {"ok": smoke_rc == 0 and bench_rc == 0, "kernels_smoke_rc": smoke_rc, "kernels_rc": bench_rc,
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": commit or None, "seconds": int(time.time()) - start}
with open(f"{out}/gpu_check.json", "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary))
EOF
[ "$smoke_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
