"""Drafter/target config parsing and pair validation: every bad input names file and field."""

import copy
import json
import logging
from pathlib import Path

import pytest

from sglang_dflash.config import (ConfigError, DrafterConfig, drafter_config_from_dict, load_drafter_config,
                                  parse_drafter)
from sglang_dflash.pair import check_pair, validate_pair
from sglang_dflash.target_config import load_target_config, target_config_from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
SRC = "ckpt/config.json"
TSRC = "target/config.json"


def tiny_drafter() -> dict:
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 4096,
        "attention_bias": False, "block_size": 16, "num_target_layers": 8, "vocab_size": 300,
        "dflash_config": {"mask_token_id": 299, "target_layer_ids": [1, 3, 7]},
    }


def tiny_kimi() -> dict:
    # DESIGN §7's tiny Kimi-Linear layout: 0-based MLA layers {3, 7}
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
        "hidden_size": 64, "num_hidden_layers": 8, "vocab_size": 300, "eos_token_id": 257,
        "pad_token_id": 299,
        "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8]},
    }


def problems_of(parse, d, source=SRC) -> str:
    with pytest.raises(ConfigError) as info:
        parse(d, source)
    return str(info.value)


def test_published_pair_from_fixtures_fits():
    drafter = load_drafter_config(FIXTURES / "kimi-linear-48b-a3b-dflash.json")
    target = load_target_config(FIXTURES / "kimi-linear-48b-a3b-instruct.json")
    assert (drafter.num_hidden_layers, drafter.hidden_size, drafter.block_size) == (5, 2304, 16)
    assert drafter.target_layer_ids == (3, 7, 15, 19, 23)
    assert drafter.num_target_layers == 5 and drafter.target_num_layers == 27
    assert drafter.mask_token_id == 163839 and drafter.rope_scaling is None
    assert target.architecture == "KimiLinearForCausalLM"
    assert target.eos_token_ids == (163586,) and target.pad_token_id == 163839
    mla = [i for i, kind in enumerate(target.layer_kinds) if kind == "mla"]
    assert mla == [3, 7, 11, 15, 19, 23, 26]
    assert target.layer_kinds.count("kda") == 20
    assert all(target.layer_kinds[i] == "mla" for i in drafter.target_layer_ids)
    assert validate_pair(drafter, target, "d", "t") == []


@pytest.mark.parametrize("where", ["nested", "top", "both"])
def test_dflash_fields_at_either_level(where):
    d = tiny_drafter()
    nested = d.pop("dflash_config")
    nested["block_size"] = d.pop("block_size")
    if where in ("top", "both"):
        d.update(nested)
    if where in ("nested", "both"):
        d["dflash_config"] = nested
    cfg = drafter_config_from_dict(d, SRC)
    assert (cfg.mask_token_id, cfg.target_layer_ids, cfg.block_size) == (299, (1, 3, 7), 16)


def test_dflash_fields_disagreeing_between_levels():
    d = tiny_drafter()
    d["mask_token_id"] = 5
    d["dflash_config"]["block_size"] = 8
    msg = problems_of(drafter_config_from_dict, d)
    assert SRC in msg and "dflash_config.mask_token_id" in msg and "5" in msg and "299" in msg
    assert "dflash_config.block_size" in msg and "16" in msg


def test_rope_parameters_transformers5_and_legacy_agree():
    legacy = drafter_config_from_dict(tiny_drafter(), SRC)
    d = tiny_drafter()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert drafter_config_from_dict(d, SRC) == legacy


def test_rope_scaling_kept_hashable():
    d = tiny_drafter()
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    yarn = drafter_config_from_dict(d, SRC)
    d = tiny_drafter()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_theta": 10000.0, "factor": 4.0, "rope_type": "yarn",
                            "original_max_position_embeddings": 1024}
    tf5 = drafter_config_from_dict(d, SRC)
    assert yarn.rope_scaling == tf5.rope_scaling == (
        ("factor", 4.0), ("original_max_position_embeddings", 1024), ("rope_type", "yarn"))
    assert hash(yarn) == hash(tf5)


def test_rope_theta_disagreeing_refused_and_absent_defaulted():
    d = tiny_drafter()
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert "rope_theta" in problems_of(drafter_config_from_dict, d)
    d = tiny_drafter()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "default"}
    cfg, problems, notes = parse_drafter(d, SRC)
    assert problems == [] and cfg.rope_theta == 10000.0
    assert notes == [f"{SRC}: field `rope_parameters.rope_theta` absent; using 10000.0 (the Qwen3 default)"]


def test_qwen3_defaults_filled_with_one_logged_note(caplog):
    d = tiny_drafter()
    del d["rope_theta"], d["max_position_embeddings"], d["head_dim"]
    d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"] = 72, 3, 3
    with caplog.at_level(logging.INFO, logger="sglang_dflash"):
        cfg = drafter_config_from_dict(d, SRC)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.head_dim) == (10000.0, 32768, 24)
    [record] = [r for r in caplog.records if "absent" in r.getMessage()]
    line = record.getMessage()
    for needle in (f"{SRC}: field `rope_theta` absent; using 10000.0",
                   "`max_position_embeddings` absent; using 32768",
                   "`head_dim` absent; using 24 (hidden_size 72 / num_attention_heads 3)"):
        assert needle in line, (needle, line)
    # a config that states them gets no note
    assert parse_drafter(tiny_drafter(), SRC)[2] == []


def test_head_dim_without_a_whole_default_refused():
    d = tiny_drafter()
    del d["head_dim"]
    d["num_attention_heads"], d["num_key_value_heads"] = 5, 5  # 64 / 5 is not whole
    msg = problems_of(drafter_config_from_dict, d)
    assert f"{SRC}: field `head_dim`: absent, and hidden_size 64 is not a multiple of " \
           "num_attention_heads 5" in msg


@pytest.mark.parametrize("archs", [["DFlash2DraftModel"], ["Qwen3ForCausalLM"], None,
                                   ["DFlashDraftModel", "X"]], ids=str)
def test_architectures_must_be_dflash(archs):
    d = tiny_drafter()
    d["architectures"] = archs
    msg = problems_of(drafter_config_from_dict, d)
    assert SRC in msg and "`architectures`" in msg and repr(archs) in msg


VARIANTS = [
    ("causal_head", True, "dflash_config.causal_head", True),
    ("causal_head", True, "causal_head", False),
    ("is_causal", True, "is_causal", False),
    ("conv_kernel_size", 4, "dflash_config.conv_kernel_size", True),
    ("selector_rank", 64, "dflash_config.selector_rank", True),
    ("output_multiplier", 2.0, "dflash_config.output_multiplier", True),
    ("final_logit_softcapping", 30.0, "dflash_config.final_logit_softcapping", True),
    ("projector_type", "domino", "dflash_config.projector_type", True),
    ("has_embed_tokens", True, "has_embed_tokens", False),
    ("quantization_config", {"quant_method": "fp8"}, "quantization_config", False),
    ("hidden_act", "gelu", "hidden_act", False),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types", False),
    ("mystery_switch", 1, "dflash_config", True),
]


@pytest.mark.parametrize("key,value,field,nested", VARIANTS, ids=[f"{v[2]}" for v in VARIANTS])
def test_unimplemented_variants_refused_by_name(key, value, field, nested):
    d = tiny_drafter()
    (d["dflash_config"] if nested else d)[key] = value
    msg = problems_of(drafter_config_from_dict, d)
    assert SRC in msg and f"`{field}`" in msg and key in msg


def test_sliding_window_derived_like_transformers():
    d = tiny_drafter()
    d.update(use_sliding_window=True, sliding_window=4096, max_window_layers=1)
    assert "`use_sliding_window`" in problems_of(drafter_config_from_dict, d)
    # at or below max_window_layers nothing slides (transformers' rule): accepted
    d["max_window_layers"] = 2
    assert drafter_config_from_dict(d, SRC).num_hidden_layers == 2


def test_benign_known_and_unknown_fields_accepted():
    d = tiny_drafter()
    d.update(use_sliding_window=False, sliding_window=4096, layer_types=["full_attention"] * 2,
             tie_word_embeddings=True, torch_dtype="bfloat16", auto_map={"AutoModel": "dflash.X"},
             hidden_act="silu", use_tree_pos_emb=True, attention_dropout=0.0)
    d["dflash_config"].update(causal_head=False, output_multiplier=1.0, mask_token="<|MASK|>")
    assert drafter_config_from_dict(d, SRC) == drafter_config_from_dict(tiny_drafter(), SRC)


def test_missing_required_fields_all_listed():
    d = tiny_drafter()
    for key in ("hidden_size", "head_dim", "rms_norm_eps", "block_size"):
        del d[key]
    del d["dflash_config"]["target_layer_ids"]
    msg = problems_of(drafter_config_from_dict, d)
    for key in ("hidden_size", "head_dim", "rms_norm_eps", "block_size", "target_layer_ids"):
        assert key in msg, key


@pytest.mark.parametrize("key,value", [("block_size", 1), ("block_size", 0), ("hidden_size", "64"),
                                       ("num_hidden_layers", 0), ("rms_norm_eps", -1.0),
                                       ("attention_bias", "no"), ("num_key_value_heads", 3)],
                         ids=lambda v: str(v))
def test_bad_values_named(key, value):
    d = tiny_drafter()
    d[key] = value
    msg = problems_of(drafter_config_from_dict, d)
    assert SRC in msg and f"`{key}`" in msg and repr(value) in msg


@pytest.mark.parametrize("ids,expect", [([1, 1, 3], "duplicate"), ([-1, 3], "negative"),
                                        ([1, 8], "num_target_layers"), ([], "at least one"),
                                        ([3, 1, 7], "strictly increasing"),
                                        ([1, 7, 6], "strictly increasing")])
def test_layer_ids_checked_in_the_drafter_file(ids, expect):
    d = tiny_drafter()
    d["dflash_config"]["target_layer_ids"] = ids
    msg = problems_of(drafter_config_from_dict, d)
    assert f"{SRC}: field `dflash_config.target_layer_ids`" in msg and expect in msg


def test_layer_id_bound_at_its_edge():
    # num_target_layers 8: ids 0..7 are layers, 8 is not
    d = tiny_drafter()
    d["dflash_config"]["target_layer_ids"] = [0, 7]
    assert drafter_config_from_dict(d, SRC).target_layer_ids == (0, 7)
    d["dflash_config"]["target_layer_ids"] = [0, 8]
    assert "id(s) [8] not below `num_target_layers` 8" in problems_of(drafter_config_from_dict, d)


def test_mask_id_bound_by_the_drafters_own_vocab_at_its_edge():
    d = tiny_drafter()  # vocab_size 300
    d["dflash_config"]["mask_token_id"] = 300
    msg = problems_of(drafter_config_from_dict, d)
    assert f"{SRC}: field `dflash_config.mask_token_id`: 300 outside the drafter's own " \
           "vocabulary (field `vocab_size` 300" in msg
    d["dflash_config"]["mask_token_id"] = 299
    assert drafter_config_from_dict(d, SRC).mask_token_id == 299
    # a config built in code goes through the same bound
    fields = {**drafter_config_from_dict(tiny_drafter(), SRC).__dict__, "mask_token_id": 300}
    target = target_config_from_dict(dict(tiny_kimi(), vocab_size=301), TSRC)
    problems = validate_pair(DrafterConfig(**fields), target, SRC, TSRC)
    assert any("`mask_token_id`: 300 outside the drafter's own" in p for p in problems), problems


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_drafter_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid UTF-8 JSON"):
        load_drafter_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_target_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_kimi()))
    assert load_target_config(tmp_path).num_hidden_layers == 8


def test_kimi_layer_kinds_from_one_based_lists():
    t = target_config_from_dict(tiny_kimi(), TSRC)
    assert t.layer_kinds == ("kda", "kda", "kda", "mla", "kda", "kda", "kda", "mla")
    d = tiny_kimi()
    d["linear_attn_config"] = None
    assert target_config_from_dict(d, TSRC).layer_kinds == ("mla",) * 8


@pytest.mark.parametrize("kda,full,expect", [
    ([0, 1, 2, 4, 5, 6], [3, 7], "outside 1..8"),  # 0-based lists by mistake
    ([1, 2, 3, 4, 5, 6, 7], [4, 8], "also listed in kda_layers"),
    ([1, 2, 3, 5, 6], [4, 8], "in neither"),
    ([1, 1, 2, 3, 5, 6, 7], [4, 8], "duplicate"),
])
def test_kimi_bad_layer_lists(kda, full, expect):
    d = tiny_kimi()
    d["linear_attn_config"] = {"kda_layers": kda, "full_attn_layers": full}
    msg = problems_of(target_config_from_dict, d, TSRC)
    assert TSRC in msg and "linear_attn_config." in msg and expect in msg


@pytest.mark.parametrize("model_type,arch", [
    ("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"), ("mistral", "MistralForCausalLM"),
])
def test_standard_targets_all_attention(model_type, arch):
    d = {"model_type": model_type, "architectures": [arch], "hidden_size": 64, "num_hidden_layers": 5,
         "vocab_size": 300, "eos_token_id": [2, 7]}
    t = target_config_from_dict(d, TSRC)
    assert t.layer_kinds == ("attention",) * 5 and t.eos_token_ids == (2, 7) and t.architecture == arch
    d["architectures"] = ["Qwen3MoeForCausalLM"]
    assert "`architectures`" in problems_of(target_config_from_dict, d, TSRC)


def test_target_errors_named():
    msg = problems_of(target_config_from_dict, dict(tiny_kimi(), model_type="deepseek_v3"), TSRC)
    assert TSRC in msg and "`model_type`" in msg and "deepseek_v3" in msg
    d = tiny_kimi()
    del d["eos_token_id"], d["vocab_size"]
    msg = problems_of(target_config_from_dict, d, TSRC)
    assert "eos_token_id" in msg and "vocab_size" in msg
    for bad in ([], [1, "2"], True):
        msg = problems_of(target_config_from_dict, dict(tiny_kimi(), eos_token_id=bad), TSRC)
        assert "`eos_token_id`" in msg


def test_validate_pair_reports_every_incompatibility():
    drafter = drafter_config_from_dict(tiny_drafter(), SRC)
    target = target_config_from_dict(tiny_kimi(), TSRC)
    assert validate_pair(drafter, target, SRC, TSRC) == []
    bad_target = copy.deepcopy(tiny_kimi())
    # hidden mismatch, vocab mismatch, mask id 299 outside vocab 200, layer 7 missing, 6 layers != 8
    bad_target.update(hidden_size=48, vocab_size=200, num_hidden_layers=6,
                      linear_attn_config={"kda_layers": [1, 2, 3, 5, 6], "full_attn_layers": [4]})
    problems = validate_pair(drafter, target_config_from_dict(bad_target, TSRC), SRC, TSRC)
    assert len(problems) == 5, problems
    for field in ("hidden_size", "vocab_size", "mask_token_id", "target_layer_ids", "num_target_layers"):
        hits = [p for p in problems if f"`{field}`" in p]
        assert hits and all(SRC in p for p in hits), field
    with pytest.raises(ConfigError) as info:
        check_pair(drafter, target_config_from_dict(bad_target, TSRC), SRC, TSRC)
    assert info.value.problems == problems and "5 problems" in str(info.value)


def test_validate_pair_checks_configs_built_in_code():
    base = drafter_config_from_dict(tiny_drafter(), SRC)
    fields = {**base.__dict__, "target_layer_ids": (3, 3, -1), "block_size": 1}
    target = target_config_from_dict(tiny_kimi(), TSRC)
    problems = validate_pair(DrafterConfig(**fields), target, SRC, TSRC)
    text = "\n".join(problems)
    assert "duplicate" in text and "negative" in text and "`block_size`" in text


def test_pair_layer_bound_at_its_edge():
    """Without num_target_layers in the drafter file only the pair check knows the depth."""
    d = tiny_drafter()
    del d["num_target_layers"]
    d["dflash_config"]["target_layer_ids"] = [1, 3, 8]
    drafter = drafter_config_from_dict(d, SRC)
    target = target_config_from_dict(tiny_kimi(), TSRC)  # 8 layers: 0..7
    problems = validate_pair(drafter, target, SRC, TSRC)
    assert len(problems) == 1 and f"{SRC}: field `target_layer_ids`: id(s) [8] are not layers" in problems[0]
    d["dflash_config"]["target_layer_ids"] = [1, 3, 7]
    assert validate_pair(drafter_config_from_dict(d, SRC), target, SRC, TSRC) == []


def test_mask_id_bound_by_the_target_vocab_at_its_edge():
    drafter = drafter_config_from_dict({**tiny_drafter(), "vocab_size": None}, SRC)  # mask 299
    problems = validate_pair(drafter, target_config_from_dict(dict(tiny_kimi(), vocab_size=299), TSRC),
                             SRC, TSRC)
    assert len(problems) == 1 and "`mask_token_id` 299 outside the target vocabulary" in problems[0]
    assert validate_pair(drafter, target_config_from_dict(tiny_kimi(), TSRC), SRC, TSRC) == []


@pytest.mark.parametrize("kind", ["kimi", "qwen3"])
def test_unsorted_layer_ids_refused_for_every_target_kind(kind):
    """SGLang captures llama/qwen features in loop order, Kimi's in tap order: layer order
    both ways, so fc would take an unsorted list's features in the wrong order."""
    fields = {**drafter_config_from_dict(tiny_drafter(), SRC).__dict__, "target_layer_ids": (3, 1, 5)}
    qwen3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
             "num_hidden_layers": 8, "vocab_size": 300, "eos_token_id": 2}
    target = target_config_from_dict(tiny_kimi() if kind == "kimi" else qwen3, TSRC)
    problems = validate_pair(DrafterConfig(**fields), target, SRC, TSRC)
    assert len(problems) == 1 and "[3, 1, 5] must be strictly increasing" in problems[0], problems
    sorted_ids = {**fields, "target_layer_ids": (1, 3, 5)}
    assert validate_pair(DrafterConfig(**sorted_ids), target, SRC, TSRC) == []


def test_last_layer_refused_for_standard_targets_only():
    # the tiny drafter reads layers (1, 3, 7): layer 7 is the last of an 8-layer target
    drafter = drafter_config_from_dict(tiny_drafter(), SRC)
    qwen3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
             "num_hidden_layers": 8, "vocab_size": 300, "eos_token_id": 2}
    problems = validate_pair(drafter, target_config_from_dict(qwen3, TSRC), SRC, TSRC)
    assert len(problems) == 1 and "id 7 is the target's last layer" in problems[0], problems
    # KimiLinearModel snapshots the stream after any layer, the last one included
    kimi = dict(tiny_kimi(), hidden_size=64, vocab_size=300)
    assert validate_pair(drafter, target_config_from_dict(kimi, TSRC), SRC, TSRC) == []
