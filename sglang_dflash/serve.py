"""`sglang-dflash serve CONFIG [sglang args]`: run `sglang serve` with a server config.

A config is sglang's own `--config` YAML (keys are `sglang serve` flags without `--`),
e.g. the files in `server_configs/`. This command builds the command line, prints it and
execs it; the plugin itself loads through sglang's plugin entry point, so nothing else is
needed. `--check` validates a file on any machine, GPU or not (see `check_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import shlex
import shutil
import sys
from pathlib import Path

MODEL_KEYS = ("model-path", "model_path", "model")
MODEL_FLAGS = ("--model-path", "--model")
# Fields `--check` prints: what decides whether and how DFlash runs.
CHECKED_FIELDS = (
    "model_path", "device", "tp_size", "trust_remote_code", "speculative_algorithm",
    "speculative_draft_model_path", "speculative_num_draft_tokens", "speculative_num_steps",
    "speculative_eagle_topk", "speculative_draft_attention_backend", "max_running_requests",
    "max_mamba_cache_size", "mem_fraction_static", "mamba_ssm_dtype",
    "enable_linear_replayssm_spec", "linear_attn_decode_backend", "cuda_graph_max_bs_decode",
)


def read_config(path: Path) -> dict:
    """The YAML mapping of a config file, with errors that name the file."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"{path}: sglang reads only YAML config files (.yaml / .yml)")
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sglang flags at the top level")
    return data


def _has_flag(argv: list[str], flags: tuple[str, ...]) -> bool:
    return any(a in flags or a.startswith(tuple(f + "=" for f in flags)) for a in argv)


def serve_argv(config: Path, extra: list[str]) -> list[str]:
    """Arguments after `sglang serve`: model path, the file, then `extra` (which wins).

    `sglang serve` chooses its backend from the model path on the command line before
    it merges the file, so the file's model path is repeated here unless `extra` has one.
    """
    argv = []
    if not _has_flag(extra, MODEL_FLAGS):
        cfg = read_config(config)
        model = next((cfg[k] for k in MODEL_KEYS if k in cfg), None)
        if not isinstance(model, str) or not model:
            raise ValueError(f"{config}: field 'model-path': expected the target model "
                             "(a Hugging Face id or a directory)")
        argv += ["--model-path", model]
    return argv + ["--config", str(config), *extra]


def sglang_executable() -> str:
    """The `sglang` command of this environment (beside this Python first)."""
    beside = Path(sys.executable).with_name("sglang")
    found = str(beside) if beside.is_file() else shutil.which("sglang")
    if found is None:
        raise SystemExit("sglang-dflash serve: the `sglang` command is not installed here "
                         "(pip install 'sglang-dflash[sglang]')")
    return found


def build_command(config: Path, extra: list[str]) -> list[str]:
    return [sglang_executable(), "serve", *serve_argv(config, extra)]


def _stub_torchvision_if_missing() -> str | None:
    """CPU installs of sglang lack a loadable torchvision, which its vision configs import.

    The check builds no model, so the stub the CPU dev server uses serves here too.
    """
    from .torchvision_stub import install_torchvision_stub

    if install_torchvision_stub():
        return "torchvision does not load here: sglang's vision-model imports got a stub"
    return None


def _load_plugin() -> str:
    """Run the plugin's entry point as `sglang serve` would, when the module exists."""
    try:
        plugin = importlib.import_module("sglang_dflash.plugin")
    except ModuleNotFoundError as e:
        if e.name != "sglang_dflash.plugin":
            raise
        return "sglang_dflash.plugin is not present: checked against stock sglang"
    if not hasattr(plugin, "load"):
        return "sglang_dflash.plugin has no load(): checked against stock sglang"
    plugin.load()
    return "sglang_dflash.plugin.load() ran first"


def _parse(config: Path, argv: list[str]):
    from sglang.srt.server_args import prepare_server_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return prepare_server_args(argv)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise ValueError(f"{config}: sglang serve rejected the arguments: "
                         f"{lines[-1] if lines else 'argparse error'}") from None
    except ValueError as e:
        raise ValueError(f"{config}: sglang could not read the file: {e}") from None


def _run_algorithm_step(sa) -> None:
    """The per-algorithm part of sglang's `handle_speculative_decoding`.

    Its first part resolves algorithm aliases by downloading the draft config, so it is
    left out; the handler below (DFLASH: `_handle_dflash`) needs neither GPU nor network
    when the block size is given.
    """
    from sglang.srt.arg_groups.overrides import declare_resolution, record_foreign_defaults
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    if sa.speculative_algorithm is None:
        return
    declare_resolution(sa, "sglang-dflash check",
                       speculative_algorithm=sa.speculative_algorithm.upper())
    algo = SpeculativeAlgorithm.from_string(sa.speculative_algorithm)
    if isinstance(algo, CustomSpecAlgo):
        if algo.validate_server_args is not None:
            record_foreign_defaults(sa, "sglang-dflash check", algo.validate_server_args)
        record_foreign_defaults(sa, "sglang-dflash check", algo.handle_server_args)
    else:
        algo.handle_server_args(sa)


def check_config(config: Path, extra: list[str]) -> dict:
    """Validate a config the way a GPU machine would, as far as that needs no GPU.

    Runs: the plugin's `load()` (if present), sglang's own parser on the exact arguments
    `serve` would pass, sglang's linear-attention backend checks (ReplaySSM constraints)
    and the speculative algorithm's server-args handler (DFLASH: device, pp, draft path,
    block size vs num_draft_tokens, draft attention backend, the max-running default).
    Not run: steps that download model configs, plan GPU memory or size CUDA graphs.
    Returns {"fields": resolved values of CHECKED_FIELDS, "notes": [...]}.
    """
    import sglang  # noqa: F401  (imports transformers before any stub)

    notes = [n for n in (_stub_torchvision_if_missing(), _load_plugin()) if n]
    sa = _parse(config, serve_argv(config, extra))
    from sglang.srt.arg_groups.attention_hook import handle_linear_attn_backend
    from sglang.srt.arg_groups.overrides import resolution_result
    from sglang.srt.arg_groups.resolution_hooks import run_hook

    # The order of sglang's resolution pipeline: linear-attention backend, then speculative.
    try:
        run_hook(handle_linear_attn_backend, sa)
        _run_algorithm_step(sa)
    except ValueError as e:
        raise ValueError(f"{config}: sglang refused the configuration: {e}") from None
    return {"fields": {f: resolution_result(sa, f) for f in CHECKED_FIELDS}, "notes": notes}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[1]
    p.epilog = ("Options of this command go before CONFIG; everything after CONFIG goes to "
                "`sglang serve` unchanged, after the file, so it wins over the file.")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--check", action="store_true",
                   help="validate CONFIG (plus any extra arguments) through sglang's own parser "
                        "and its GPU-free resolution steps, print the resolved fields, exit")
    p.add_argument("config", type=Path, help="YAML file, e.g. server_configs/"
                                             "kimi-linear-h200-tp1.yaml")
    p.add_argument("sglang_args", nargs=argparse.REMAINDER,
                   help="passed to `sglang serve` (e.g. --port 30001 --host 0.0.0.0)")


def main_serve(args) -> int:
    try:
        if args.check:
            result = check_config(args.config, args.sglang_args)
            for note in result["notes"]:
                print(f"note: {note}")
            for name, value in result["fields"].items():
                print(f"{name:>38} = {value!r}")
            print(f"{args.config}: OK for sglang serve (model and GPU steps run at launch)")
            return 0
        cmd = build_command(args.config, args.sglang_args)
    except ValueError as e:
        raise SystemExit(f"sglang-dflash serve: {e}")
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    os.execv(cmd[0], cmd)
    return 1  # not reached: execv replaces this process
