"""Plain (no speculation) CPU servers of the two bundled targets, one of each per test session.

A plain server's greedy answers depend only on the requests it gets, so the server test
modules ask the same one instead of starting their own: a start costs ~30 s on two
cores, and a session has about ten of them to compare against. Each is started when a
module first asks for it, sleeps while idle (``--sleep-on-idle``) and stops at the end.
A module's DFlash servers use the common flags of their target.
"""

from __future__ import annotations

import pytest
from sglang_env import require_sglang

QWEN3_COMMON_ARGS = ("--max-total-tokens", "16384", "--max-running-requests", "16", "--sleep-on-idle")
# Without overlap: SGLang's overlap scheduler feeds the plain server's penalizers the output one
# token late (ScheduleBatch.cumulate_penalty_output_tokens reads req.output_ids before the last
# step lands), so only the non-overlap server is the penalties' definition (test_soak). Greedy
# answers without penalties are the same either way.
QWEN3_PLAIN_ARGS = QWEN3_COMMON_ARGS + ("--disable-overlap-schedule",)
KIMI_CTX = 512  # short, so that requests reach the context length cheaply
KIMI_COMMON_ARGS = ("--max-total-tokens", "8192", "--max-running-requests", "16", "--sleep-on-idle",
                    "--context-length", str(KIMI_CTX))
# SGLang's Kimi-Linear on CPU: radix caching of linear state needs no_buffer (test_kimi_server)
KIMI_PLAIN_ARGS = KIMI_COMMON_ARGS + ("--disable-radix-cache",)


def _serve(tmp_path_factory, name: str, model, args):
    require_sglang()
    from sglang_dflash.dev.server import Server

    srv = Server(model, tmp_path_factory.mktemp(name) / "server.log", args)
    print(f"\n{name} server start-up: {srv.startup_s:.1f} s (shared by the session)")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def qwen3_plain(tmp_path_factory):
    """The bundled tiny Qwen3 target, plain, with ``QWEN3_PLAIN_ARGS``."""
    from sglang_dflash.reference.tiny_qwen3 import TARGET_DIR

    yield from _serve(tmp_path_factory, "qwen3-plain", TARGET_DIR, QWEN3_PLAIN_ARGS)


@pytest.fixture(scope="session")
def kimi_plain(tmp_path_factory):
    """The bundled tiny Kimi-Linear target, plain, with ``KIMI_PLAIN_ARGS``."""
    from sglang_dflash.reference.tiny_pair import TARGET_DIR

    yield from _serve(tmp_path_factory, "kimi-plain", TARGET_DIR, KIMI_PLAIN_ARGS)
