"""server_configs/*.yaml through sglang's own parser and GPU-free resolution steps.

Each file is parsed with sglang's `prepare_server_args` on the exact arguments
`sglang-dflash serve` passes, then sglang's linear-attention checks and the DFLASH
server-args handler run on it (the plugin's `load()` first, when the module exists).
What needs the GPU or the network (model configs, memory planning, CUDA graphs) is left
to launch time.
"""

import argparse
import re
from pathlib import Path

import pytest

pytest.importorskip("sglang", reason="the server configs are checked against sglang itself")

from sglang_dflash import serve  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "server_configs"
TARGET = "moonshotai/Kimi-Linear-48B-A3B-Instruct"
DRAFTER = "Moonlight556/Kimi-Linear-48B-A3B-DFlash-240k"
# file -> (tp_size, verify width W, max running requests); every YAML file must be listed
EXPECTED = {
    "kimi-linear-h200-tp1.yaml": (1, 6, 48),
    "kimi-linear-h100x2-tp2.yaml": (2, 16, 32),
    "kimi-linear-b200-tp1.yaml": (1, 16, 96),
    "kimi-linear-h200-tp1-highconc.yaml": (1, 8, 128),
}
# file -> (verify scratch budgeted per request in MiB, average tokens every running
# request must keep): the design inputs of each header's request cap
CAP_RULE = {
    "kimi-linear-h200-tp1.yaml": (30, 8192),
    "kimi-linear-h100x2-tp2.yaml": (15, 8192),
    "kimi-linear-b200-tp1.yaml": (30, 8192),
    "kimi-linear-h200-tp1-highconc.yaml": (15, 2048),
}

# The per-token and per-request sizes the headers derive, recomputed from the model facts.
MLA_BYTES = 7 * (512 + 64) * 2             # 7 MLA layers, latent + rope, bf16
# 5 layers, K and V, 32 heads x 72 (MHA, inferred from the drafter's 902 MB file), bf16;
# the plugin holds it whole on every rank. test_draft_kv_pricing.py checks that SGLang's
# planner charges exactly this (and half of it for an fp8 pool) at the worker's layout.
DRAFT_KV_BYTES = 5 * 2 * 32 * 72 * 2
FP8_DRAFT_KV_BYTES = DRAFT_KV_BYTES // 2
DRAFTER_BYTES = 902_487_456
KDA_MIB = (20 * 32 * 128 * 128 * 4 + 20 * 3 * 4096 * 3 * 2) / 2**20
WEIGHTS_GIB = 48e9 * 2 / 2**30


def token_pool(name: str, fields: dict, requests: int, draft_kv_bytes: int = DRAFT_KV_BYTES) -> float:
    """Tokens of KV (target + draft) that fit per GPU with ``requests`` state slots."""
    text = (CONFIGS / name).read_text()
    visible = float(re.search(r"([\d.]+) GiB visible", text).group(1))
    tp, scratch_mib = fields["tp_size"], CAP_RULE[name][0]
    pool_gib = (fields["mem_fraction_static"] * visible - WEIGHTS_GIB / tp - DRAFTER_BYTES / 2**30
                - requests * (3 * KDA_MIB / tp + scratch_mib) / 1024)
    return pool_gib * 2**30 / (MLA_BYTES + draft_kv_bytes)


@pytest.fixture(scope="module")
def checked():
    return {name: serve.check_config(CONFIGS / name, []) for name in EXPECTED}


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.y*ml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_resolves_like_a_gpu_machine(checked, name):
    tp, width, max_running = EXPECTED[name]
    f = checked[name]["fields"]
    assert (f["model_path"], f["speculative_draft_model_path"]) == (TARGET, DRAFTER)
    assert (f["device"], f["tp_size"], f["trust_remote_code"]) == ("cuda", tp, True)
    assert f["speculative_algorithm"] == "DFLASH"
    # num_draft_tokens is the verify width W; _handle_dflash pins steps/topk to 1
    assert (f["speculative_num_draft_tokens"], f["speculative_num_steps"],
            f["speculative_eagle_topk"]) == (width, 1, 1)
    assert f["speculative_draft_attention_backend"] is not None
    assert f["max_running_requests"] == max_running
    # sglang caps running requests at max_mamba_cache_size // 3 (radix cache on)
    assert f["max_mamba_cache_size"] == 3 * max_running
    assert f["cuda_graph_max_bs_decode"] == max_running
    assert f["enable_linear_replayssm_spec"] is True and f["mamba_ssm_dtype"] == "float32"
    assert 0.5 < f["mem_fraction_static"] < 0.95


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_states_hardware_budget_and_flags(name):
    text = (CONFIGS / name).read_text()
    header = text[:text.index("\nmodel-path:")]
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    for needle in ("Hardware:", "Memory budget", "Why each flag", "MLA KV", "draft KV",
                   "KDA state", f"{MLA_BYTES} B", f"{WEIGHTS_GIB:.1f} GiB"):
        assert needle in header, f"{name}: header lacks {needle!r}"
    tp = EXPECTED[name][0]
    assert "32 heads x 72" in header and f"{DRAFT_KV_BYTES} B" in header
    assert f"{MLA_BYTES + DRAFT_KV_BYTES} B" in header and "8 heads" not in header
    assert f"{KDA_MIB / tp:.1f} MiB" in header
    assert "not measured on a GPU" in header or "none is measured on a GPU" in header
    # every flag set in the file is explained in its header (or in the H200 file's)
    keys = re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.M)
    base = (CONFIGS / "kimi-linear-h200-tp1.yaml").read_text()
    for key in keys:
        assert key in header or key in base[:base.index("\nmodel-path:")], key


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_request_cap_and_token_pool_follow_from_the_arithmetic(checked, name):
    """The cap is the largest multiple of 16 leaving every running request its average
    token budget; the header states the token pool that the cap leaves."""
    f = checked[name]["fields"]
    cap, per_request = f["max_running_requests"], CAP_RULE[name][1]
    assert cap % 16 == 0
    assert token_pool(name, f, cap) / cap >= per_request
    assert token_pool(name, f, cap + 16) / (cap + 16) < per_request
    header = (CONFIGS / name).read_text().split("\nmodel-path:")[0]
    stated = int(re.search(r"54144 B ~ (\d+)k tokens", header).group(1)) * 1000
    # the header sums rounded GiB terms: within 0.2 GiB of the exact pool
    assert abs(stated - token_pool(name, f, cap)) < 0.2 * 2**30 / (MLA_BYTES + DRAFT_KV_BYTES)
    # sglang plans the draft K/V at exactly what the plugin holds, at TP2 too (the worker's
    # draft_parallel_layout), so no file caps the token pool by hand
    assert serve.read_config(CONFIGS / name).get("max-total-tokens") is None


def test_fp8_capacity_figures_follow_from_the_arithmetic(checked):
    """The fp8 draft K/V figures (the TP2 header, the table in docs/draft_kv.md): per-token
    bytes, and the tokens each file's pool holds at both dtypes."""
    fp8_token = MLA_BYTES + FP8_DRAFT_KV_BYTES
    tolerance = 0.2 * 2**30 / fp8_token  # the texts sum rounded GiB terms, as the headers do
    tp2 = "kimi-linear-h100x2-tp2.yaml"
    header = (CONFIGS / tp2).read_text().split("\nmodel-path:")[0]
    line = re.search(r"\((\d+) B, (\d+) B per token\): [\d.]+ GiB ~ (\d+)k tokens, ([\d.]+)x", header)
    assert line, f"{tp2}: no fp8 draft K/V line"
    f = checked[tp2]["fields"]
    assert (int(line.group(1)), int(line.group(2))) == (FP8_DRAFT_KV_BYTES, fp8_token)
    assert abs(int(line.group(3)) * 1000 - token_pool(tp2, f, 32, FP8_DRAFT_KV_BYTES)) < tolerance
    assert line.group(4) == f"{(MLA_BYTES + DRAFT_KV_BYTES) / fp8_token:.2f}"

    doc = (CONFIGS.parent / "docs" / "draft_kv.md").read_text()
    rows = dict(re.findall(r"^\| (bf16|fp8 e4m3) \|(.*)\|$", doc, flags=re.M))
    assert sorted(rows) == ["bf16", "fp8 e4m3"], "docs/draft_kv.md: no capacity table"
    for dtype, draft in (("bf16", DRAFT_KV_BYTES), ("fp8 e4m3", FP8_DRAFT_KV_BYTES)):
        cells = [c.strip().replace(",", "") for c in rows[dtype].split("|")]
        assert [int(c) for c in cells[:3]] == [draft, MLA_BYTES + draft, int(2**30 / (MLA_BYTES + draft))]
        pools = [float(c.removesuffix("k")) * 1000 for c in cells[3:]]
        names = ("kimi-linear-h200-tp1.yaml", tp2, "kimi-linear-b200-tp1.yaml", "kimi-linear-h200-tp1-highconc.yaml")
        assert len(pools) == len(names), cells
        for name, stated in zip(names, pools):
            fields = checked[name]["fields"]
            exact = token_pool(name, fields, fields["max_running_requests"], draft)
            assert abs(stated - exact) < 0.2 * 2**30 / (MLA_BYTES + draft), \
                f"docs/draft_kv.md: {dtype}, {name}: {stated} vs {exact:.0f}"


def test_extra_arguments_win_over_the_file():
    path = CONFIGS / "kimi-linear-h200-tp1.yaml"
    f = serve.check_config(path, ["--max-running-requests", "7",
                                  "--speculative-num-draft-tokens", "8"])["fields"]
    assert (f["max_running_requests"], f["speculative_num_draft_tokens"]) == (7, 8)


def _variant(tmp_path, old: str, new: str) -> Path:
    text = (CONFIGS / "kimi-linear-h200-tp1.yaml").read_text()
    assert old in text
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_misspelt_flag_is_rejected_by_sglangs_parser(tmp_path):
    path = _variant(tmp_path, "max-running-requests: 48", "max-runing-requests: 48")
    with pytest.raises(ValueError, match=r"variant\.yaml: sglang serve rejected .*runing"):
        serve.check_config(path, [])


def test_dflash_handler_really_runs(tmp_path):
    # the same file on device cpu: sglang's own _handle_dflash refuses it
    path = _variant(tmp_path, "device: cuda", "device: cpu")
    with pytest.raises(ValueError, match=r"refused the configuration: DFLASH .*not supported"):
        serve.check_config(path, [])
    path = _variant(tmp_path, "speculative-num-draft-tokens: 6",
                    "speculative-num-draft-tokens: 6\nspeculative-dflash-block-size: 16")
    with pytest.raises(ValueError, match="they differ"):
        serve.check_config(path, [])


def test_serve_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    serve.add_serve_args(parser)
    path = CONFIGS / "kimi-linear-b200-tp1.yaml"
    args = parser.parse_args(["--dry-run", str(path), "--port", "30001", "--host", "0.0.0.0"])
    assert serve.main_serve(args) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("+ ") and printed.split()[2] == "serve"
    assert printed.split()[3:] == ["--model-path", TARGET, "--config", str(path),
                                   "--port", "30001", "--host", "0.0.0.0"]
    # a model path given by the user is not doubled
    assert serve.serve_argv(path, ["--model-path=/models/kimi"]) == [
        "--config", str(path), "--model-path=/models/kimi"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tp-size: 1\n")
    with pytest.raises(SystemExit, match="bad.yaml: field 'model-path'"):
        serve.main_serve(parser.parse_args(["--dry-run", str(bad)]))
    with pytest.raises(SystemExit, match="only YAML"):
        serve.main_serve(parser.parse_args(["--dry-run", str(tmp_path / "x.json")]))


PREDICTION_ROW = re.compile(r"^#   W = (\d+), (eager|graphed) draft((?:\s+\d+\.\d\dx)+)", re.M)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_predictions_are_what_the_planner_computes(name):
    """Every "W = N, eager|graphed draft  1.24x ..." row of a header is the step-time
    model's speed-up (geometric acceptance, tau(16) = 5.21) at the concurrencies above it,
    and the header says it is a model until measured."""
    from sglang_dflash.plan.acceptance_curve import geometric_curve
    from sglang_dflash.plan.cost_model import Assumptions, tau_at
    from sglang_dflash.plan.planner import ModelCosts

    text = (CONFIGS / name).read_text()
    header = text[:text.index("\nmodel-path:")]
    assert "A MODEL" in header and "until measured" in header, name
    table = header[header.index("Predicted speed-up"):]
    concurrency = [int(c) for c in re.search(r"^#\s+((?:\d+\s+)+\d+)$", table, re.M).group(1).split()]
    rows = PREDICTION_ROW.findall(table)
    assert rows, f"{name}: no prediction rows"
    assert any(int(W) == EXPECTED[name][1] for W, _, _ in rows), f"{name}: no row for the file's W"
    gpu = next(g for g in ("h200", "h100", "b200") if g in name)
    curve = geometric_curve(5.21, 16)
    for W, draft, values in rows:
        costs = ModelCosts(gpu, EXPECTED[name][0], Assumptions(drafter_graphed=draft == "graphed"))
        want = [tau_at(curve, int(W)) * costs.target_ms(C, 1) / (costs.target_ms(C, int(W)) + costs.draft_ms(C, int(W)))
                for C in concurrency]
        got = [float(v.rstrip("x")) for v in values.split()]
        assert got == pytest.approx([round(x, 2) for x in want], abs=0.006), f"{name}: W = {W}, {draft}"
