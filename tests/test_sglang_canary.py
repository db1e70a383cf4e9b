"""Canary: SGLang's speculative-decoding module imports, with the seams plugin.py hooks.

Under CI (``CI=true``) SGLang must be installed, so its absence fails here instead of
quietly skipping every SGLang test; elsewhere a machine without SGLang skips.
"""

import importlib.util
import os

import pytest


def test_sglang_spec_info_imports():
    if importlib.util.find_spec("sglang") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but sglang is not installed: the SGLang tests would all skip "
                        "(install it with `make setup-sglang`)")
        pytest.skip("sglang is not installed here (outside CI)")
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_dflash.plugin import CREATE_WORKER

    assert SpeculativeAlgorithm.from_string("dflash") is SpeculativeAlgorithm.DFLASH
    assert CREATE_WORKER.endswith("SpeculativeAlgorithm.create_worker")
    assert callable(SpeculativeAlgorithm.DFLASH.create_worker)
