"""The package layout: what the serving path may import, and the module entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"sglang_dflash": ROOT / "sglang_dflash", "sglang_dflash.kernels": ROOT / "kernels"}
# what `sglang serve` runs: the plugin's hooks and the worker they build
SERVING_ROOTS = ("sglang_dflash.plugin", "sglang_dflash.worker.dflash_worker")
# development code and pure-torch oracles: never on the serving path
FORBIDDEN = ("sglang_dflash.dev", "sglang_dflash.reference")


def module_files() -> dict[str, Path]:
    """Every module of the project by dotted name (kernels/ installs as sglang_dflash.kernels)."""
    out = {}
    for base, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if base == "sglang_dflash" and parts[0] == "assets":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([base, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # importing a.b.c runs a and a.b as well
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found - {name}


def reachable(roots: tuple[str, ...]) -> dict[str, str]:
    """Every project module the roots import, transitively: module -> the module importing it."""
    files = module_files()
    known = set(files)
    seen = {root: "(root)" for root in roots}
    todo = list(roots)
    while todo:
        current = todo.pop()
        for dep in imports_of(current, files[current], known):
            if dep not in seen:
                seen[dep] = current
                todo.append(dep)
    return seen


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = reachable(("sglang_dflash.worker.target",))
    # `from ..drafter import load_drafter` at module level, `from .settings import ...`
    assert {"sglang_dflash.drafter", "sglang_dflash.worker.settings", "sglang_dflash.checkpoint"} <= set(graph)
    # the CLI imports its commands inside functions
    assert "sglang_dflash.bench.online" in reachable(("sglang_dflash.cli",))


def test_no_serving_path_module_imports_dev_or_reference_code():
    graph = reachable(SERVING_ROOTS)
    assert {"sglang_dflash.drafter", "sglang_dflash.backend", "sglang_dflash.worker.steps"} <= set(graph)
    bad = {m: graph[m] for m in graph if m.startswith(FORBIDDEN)}
    assert not bad, f"serving-path modules import development/oracle code (module: imported by): {bad}"


def test_python_dash_m_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "sglang_dflash", "check", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: sglang-dflash check" in out.stdout
