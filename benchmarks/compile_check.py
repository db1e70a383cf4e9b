"""Compile every Triton kernel of the project for sm_90 and sm_100 at serving shapes, no GPU.

Each case calls an op's own Python launcher on ``meta`` tensors at a serving shape; the
launches are recorded instead of run and bound the way Triton's JIT binds them
(``kernels/jit_launches.py``), so integer specialisations, alignment, constexprs,
``num_warps`` and ``num_stages`` are what the JIT would pick on the GPU. Every distinct
binary is compiled by Triton's NVIDIA backend (ptxas included, which runs on CPU) and its
resources read from the ``ptxas -v`` log and the kernel metadata:

    kernel | shape | arch | registers | spills | shared memory | warps | stages | dot | async

``dot`` is the operand type of the kernel's tensor-core dots in TTGIR (``bf16`` = straight
from bf16 tiles; ``f32`` = fp32 operands, a TF32/IEEE dot), ``async`` the number of
asynchronous global-to-shared copies (loads the software pipeliner multi-buffers).

The run fails (exit status 1) on a compile error, any spill, or a resource over the limit
of the architecture (registers per thread and per SM, shared memory per block).
Nothing is cached: the Triton cache lives in a temporary folder for one run.

    python benchmarks/compile_check.py --out out/compile          # the full matrix
    python benchmarks/compile_check.py --subset ci --out out/ci   # a representative subset
"""

from __future__ import annotations

import os

# real compilation, never the interpreter: this must happen before triton is imported
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_cases  # noqa: E402

# per architecture: registers per thread / per SM, shared memory per block (opt-in max)
LIMITS = {
    90: {"gpu": "H100/H200", "sms": 132, "regs_per_thread": 255, "regs_per_sm": 65536, "smem_per_block": 232448},
    100: {"gpu": "B200", "sms": 148, "regs_per_thread": 255, "regs_per_sm": 65536, "smem_per_block": 232448},
}


@dataclass
class Compiled:
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared: int
    num_warps: int
    num_stages: int
    dot: str
    async_copies: int
    seconds: float


def _ptxas_resources(log: str) -> tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None or spills is None or stack is None:
        raise RuntimeError(f"no resource usage in the ptxas log:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2)), int(stack.group(1))


def _dot_types(ttgir: str) -> str:
    """Operand element types of the tensor-core dots, e.g. 'bf16' or 'f32+bf16'."""
    types = []
    for line in ttgir.splitlines():
        if re.search(r"\b(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b", line):
            found = re.search(r":\s*(?:!ttg\.memdesc|tensor)<[0-9x]+x(\w+)", line)
            types.append(found.group(1) if found else "?")
    return "+".join(sorted(set(types))) or "-"


def compile_one(binding, target) -> Compiled:
    from triton import knobs

    from sglang_dflash.kernels.jit_launches import compile_binding

    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = compile_binding(binding, target)
    seconds = time.perf_counter() - start
    regs, spills, stack = _ptxas_resources(log.getvalue())
    ttgir = kernel.asm["ttgir"]
    return Compiled(regs, spills, stack, int(kernel.metadata.shared), int(kernel.metadata.num_warps),
                    int(binding.options.num_stages), _dot_types(ttgir),
                    len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir)),
                    seconds)


def problems(c: Compiled, arch: int) -> list[str]:
    lim = LIMITS[arch]
    out = []
    if c.spill_bytes:
        out.append(f"{c.spill_bytes} bytes of register spills")
    if c.registers > lim["regs_per_thread"]:
        out.append(f"{c.registers} registers/thread > {lim['regs_per_thread']}")
    if c.registers * 32 * c.num_warps > lim["regs_per_sm"]:
        out.append(f"{c.registers} x {32 * c.num_warps} threads > {lim['regs_per_sm']} registers/SM")
    if c.shared > lim["smem_per_block"]:
        out.append(f"{c.shared} B shared memory > {lim['smem_per_block']}")
    return out


def _record(cases, archs, log) -> tuple[list[dict], dict]:
    """Rows of every launch, bound for its arch, and the distinct bindings to compile."""
    from sglang_dflash.kernels.jit_launches import bind, gpu_target, record_launches

    rows, todo = [], {}
    for arch in archs:
        target = gpu_target(arch)
        for case in cases:
            base = dict(op=case.op, shape=case.shape, arch=arch)
            try:
                with record_launches(sm_count=LIMITS[arch]["sms"]) as launches:
                    case.call()
                if not launches:
                    raise RuntimeError("the launcher made no Triton launch")
            except Exception as e:  # a launcher that fails at a serving shape is a failure of the check
                rows.append(dict(base, kernel="-", ok=False, problems=[f"launcher: {type(e).__name__}: {e}"]))
                log(f"FAIL {case.op} {case.shape} sm_{arch}: launcher {type(e).__name__}: {e}")
                continue
            for launch in launches:
                try:
                    binding = bind(launch, target)
                except Exception as e:
                    rows.append(dict(base, kernel=launch.name, ok=False, problems=[f"bind: {type(e).__name__}: {e}"]))
                    log(f"FAIL {launch.name} {case.shape} sm_{arch}: bind {type(e).__name__}: {e}")
                    continue
                row = dict(base, kernel=launch.name, grid=list(launch.grid), key=binding.key)
                if (binding.key, arch) not in todo:
                    todo[(binding.key, arch)] = binding
                    row["compiled_here"] = True
                rows.append(row)
    return rows, todo


_TODO: list = []


def _compile_index(i: int):
    from sglang_dflash.kernels.jit_launches import gpu_target

    (_, arch), binding = _TODO[i]
    try:
        return compile_one(binding, gpu_target(arch))
    except Exception as e:
        msg = str(e).strip().splitlines()
        return f"compile: {type(e).__name__}: {msg[0] if msg else ''}"


def run_cases(cases: list[compile_cases.Case], archs: list[int], log: Callable[[str], None],
              jobs: int = 1) -> list[dict]:
    rows, todo = _record(cases, archs, log)
    _TODO[:] = list(todo.items())
    if jobs > 1:
        import multiprocessing

        # forked workers inherit the bindings; each compile runs its own ptxas
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_index, range(len(_TODO)))
    else:
        results = [_compile_index(i) for i in range(len(_TODO))]
    compiled = {key: result for (key, _), result in zip(_TODO, results)}
    for row in rows:
        if "key" not in row:
            continue
        result = compiled[(row["key"], row["arch"])]
        if isinstance(result, str):
            row.update(ok=False, problems=[result])
            log(f"FAIL {row['kernel']} {row['shape']} sm_{row['arch']}: {result}")
            continue
        row.update(result.__dict__)
        row["problems"] = problems(result, row["arch"])
        row["ok"] = not row["problems"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'kernel':<26} {'shape':<40} {'arch':>6} {'regs':>4} {'spill':>5} {'smem KB':>7} "
            f"{'warps':>5} {'stages':>6} {'dot':>8} {'async':>5}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "registers" not in r:
            lines.append(f"{r['kernel']:<26} {r['shape']:<40} {'sm_' + str(r['arch']):>6}  "
                         f"{'; '.join(r['problems'])}")
            continue
        lines.append(f"{r['kernel']:<26} {r['shape']:<40} {'sm_' + str(r['arch']):>6} {r['registers']:>4} "
                     f"{r['spill_bytes']:>5} {r['shared'] / 1024:>7.1f} {r['num_warps']:>5} {r['num_stages']:>6} "
                     f"{r['dot']:>8} {r['async_copies']:>5}  {'ok' if r['ok'] else 'FAIL ' + '; '.join(r['problems'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compile_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for compile_check.json")
    parser.add_argument("--subset", choices=("full", "ci"), default="full")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 100], choices=sorted(LIMITS))
    parser.add_argument("--only", default="", help="run the cases whose op name contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)

    import torch
    import triton

    cases = [c for c in compile_cases.cases(args.subset) if args.only in c.op]
    if not cases:
        parser.error(f"--only {args.only!r} matches no case")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = run_cases(cases, args.arch, lambda m: print(m, flush=True), args.jobs)
    seconds = time.perf_counter() - start
    print(format_table(rows))
    ok = all(r["ok"] for r in rows)
    binaries = sum(1 for r in rows if r.get("compiled_here"))
    result = {"ok": ok, "subset": args.subset, "archs": args.arch, "limits": LIMITS,
              "torch": torch.__version__, "triton": triton.__version__, "seconds": round(seconds, 1),
              "binaries": binaries, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_check.json").write_text(json.dumps(result, indent=1))
    print(f"{len(rows)} launches, {binaries} distinct binaries compiled in {seconds:.0f} s; "
          f"wrote {args.out / 'compile_check.json'}; {'all within limits' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
