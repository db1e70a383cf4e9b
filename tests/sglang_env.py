"""Tests that run SGLang 0.5.23 on CPU: the dev shims, fresh processes, a one-rank group."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sglang_dflash.dev.server import free_port


def require_sglang() -> None:
    """Skip without SGLang (the canary test fails instead under CI); else stub torchvision."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed here (`make setup-sglang`)")
    from sglang_dflash.torchvision_stub import install_torchvision_stub

    install_torchvision_stub()


def start_fresh_python(code: str, env: dict[str, str | None]) -> subprocess.Popen:
    """Run ``code`` in a new interpreter; ``env`` entries with None are removed."""
    full_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.Popen([sys.executable, "-c", code], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def last_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON object a fresh process printed last; its stderr on failure."""
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, \
        f"fresh process failed (rc {proc.returncode}):\n{err[-4000:]}"
    return json.loads(lines[-1])


@contextlib.contextmanager
def one_rank_group():
    """A world of one CPU rank (gloo) with SGLang's model-parallel groups, torn down after.

    SGLang's layers read their tensor-parallel group even at tp=1.
    """
    from sglang.srt.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )
    from sglang.srt.runtime_context import reset_context
    from sglang.test.layer_ut_utils import init_single_process_dist

    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["MASTER_PORT"] = str(free_port())
    init_single_process_dist(master_port=int(os.environ["MASTER_PORT"]), backend="gloo")
    try:
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()
        reset_context()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
