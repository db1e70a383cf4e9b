"""gpu_check.json: the exit status of every part of benchmarks/gpu_check.sh, each op's
fraction of the HBM roofline, the draft step's eager vs graph numbers; exit 1 if any
part failed.

    python benchmarks/gpu_check_summary.py OUTDIR START_EPOCH SMOKE name=rc ...
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def _load(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def roofline(kernels: dict | None) -> list[dict]:
    if not kernels or kernels.get("smoke"):
        return []
    peak = kernels["env"].get("hbm_peak_GBps")
    return [{"name": r["name"], "op_us": round(r["op_us"], 1), "op_GBps": round(r["op_GBps"], 1),
             "hbm_fraction": round(r["op_GBps"] / peak, 3) if peak else None, "speedup_vs_twin": round(r["speedup"], 2),
             "ok": r["ok"]} for r in kernels["cases"]]


def main(argv: list[str]) -> int:
    out, start, smoke = Path(argv[0]), int(argv[1]), argv[2] == "1"
    parts = {k: int(v) for k, v in (a.split("=", 1) for a in argv[3:])}
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:  # a GPU machine without git: the summary just has no commit
        commit = ""
    step = _load(out, "draft_step.json")
    summary = {
        "ok": all(rc == 0 for rc in parts.values()), "cpu_smoke": smoke, "exit_codes": parts,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "commit": commit or None, "seconds": int(time.time()) - start,
        "roofline": roofline(_load(out, "kernels.json")),
        "draft_step": step["rows"] if step else None,
        "reference_e2e": (_load(out, "reference_e2e.json") or {}).get("rows"),
        "verify_cost": (_load(out, "verify_cost/verify_cost.json") or {}).get("rows"),
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    for row in summary["roofline"]:
        print(f"{row['name']:<34} {row['op_us']:>9.1f} µs {row['op_GBps']:>8.1f} GB/s "
              f"{'' if row['hbm_fraction'] is None else format(row['hbm_fraction'], '.0%'):>5} of HBM")
    failed = [k for k, rc in parts.items() if rc != 0]
    print(json.dumps({k: summary[k] for k in ("ok", "exit_codes", "gpu", "seconds")}))
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
