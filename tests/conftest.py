import os

import pytest

# Triton kernels run on CPU through the interpreter; the variable must be set before
# any @triton.jit function is defined, i.e. before the project's kernels are imported.
if os.environ.get("SGLANG_DFLASH_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# session-wide plain servers the server test modules compare against (tests/plain_servers.py)
from plain_servers import kimi_plain, qwen3_plain  # noqa: E402,F401
