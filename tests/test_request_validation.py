"""The plugin's request checks: unit cases, then a real plain CPU server with the plugin loaded.

A stock SGLang 0.5.23 server dies of, or misserves, every request in
``request_cases.REFUSED_BY_PLUGIN`` (measured with ``SGLANG_PLUGINS`` set so that the
plugin is not loaded); with the plugin each one gets a 400 naming the field, the value and
the allowed range, and the server keeps serving. Requests SGLang refuses itself keep their
4xx, and the valid edge of every checked range is still served. The DFlash server gets
the same requests in the soak test.
"""

from __future__ import annotations

import http.client
import json
import types

import pytest
from request_cases import REFUSED_BY_PLUGIN, REFUSED_BY_SGLANG, STILL_SERVED, VOCAB
from sglang_env import require_sglang

from sglang_dflash import request_validation as rv

# ---- the checks alone ----


def request(**fields):
    base = dict(return_logprob=False, top_logprobs_num=0, logprob_start_len=-1, sampling_params={})
    return types.SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize("ids, bad", [([256, 264], "264 at index 1"), ([-1], "-1 at index 0"),
                                      ([3, 2.0], "2.0 at index 1"), ([1, True], "True at index 1")],
                         ids=["past-vocab", "negative", "float", "bool"])
def test_token_ids_outside_vocab(ids, bad):
    with pytest.raises(ValueError, match=rf"input_ids.*token id {bad}.*\[0, 264\)"):
        rv.check_request(request(), ids, VOCAB)


def test_valid_request_passes():
    rv.check_request(request(return_logprob=True, top_logprobs_num=VOCAB, logprob_start_len=0,
                             sampling_params={"stop_token_ids": [257, None], "stop": "x",
                                              "stop_regex": [r"\d+"], "n": 2}), [0, 263], VOCAB)
    rv.check_request(request(), None, VOCAB)  # input_embeds: no ids to check
    # without return_logprob SGLang ignores the logprob fields
    rv.check_request(request(top_logprobs_num=10**6, logprob_start_len=-9), [1], VOCAB)
    rv.check_parallel_sample_num(1)


@pytest.mark.parametrize("fields, words", [
    (dict(top_logprobs_num=VOCAB + 1), "top_logprobs_num .* in \\[0, 264\\].* got 265"),
    (dict(top_logprobs_num=-1), "top_logprobs_num .* got -1"),
    (dict(logprob_start_len=-2), "logprob_start_len must be -1 .* got -2"),
], ids=["top-265", "top-neg", "start-neg"])
def test_logprob_fields(fields, words):
    with pytest.raises(ValueError, match=words):
        rv.check_request(request(return_logprob=True, **fields), [1], VOCAB)


@pytest.mark.parametrize("params, words", [
    ({"stop_token_ids": [1, 264]}, r"stop_token_ids: token id 264 at index 1"),
    ({"stop": ["a", ""]}, "empty stop string"),
    ({"stop": ""}, "empty stop string"),
    ({"stop_regex": "[a"}, r"stop_regex '\[a' is not a valid regular expression"),
], ids=["stop-id", "stop-empty-list", "stop-empty", "regex"])
def test_sampling_params(params, words):
    with pytest.raises(ValueError, match=words):
        rv.check_request(request(sampling_params=params), [1], VOCAB)


@pytest.mark.parametrize("n", [0, -1, True, 1.0])
def test_parallel_sample_num(n):
    with pytest.raises(ValueError, match=rf"n must be an integer >= 1 .* got {n!r}"):
        rv.check_parallel_sample_num(n)


# ---- through a real server ----


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_sglang()
    from sglang_dflash.dev.server import Server
    from sglang_dflash.reference.tiny_qwen3 import TARGET_DIR

    log = tmp_path_factory.mktemp("validation") / "server.log"
    srv = Server(TARGET_DIR, log, ("--max-total-tokens", "8192", "--sleep-on-idle"))
    yield srv
    srv.stop()


def send(server, path: str, body: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.mark.slow
def test_plugin_refuses_what_sglang_would_crash_on(server):
    for name, ((path, body), words) in REFUSED_BY_PLUGIN.items():
        status, text = send(server, path, body)
        assert status == 400, f"{name}: {status} {text[:300]}"
        message = json.loads(text)
        message = message.get("message") or message["error"]["message"]
        for word in words:
            assert word in message, f"{name}: {word!r} not in {message!r}"
    assert server.healthy()


@pytest.mark.slow
def test_streamed_generate_gets_the_error_event(server):
    # SGLang streams /generate errors as an event after a 200 header, ours included
    status, text = send(server, "/generate", {"input_ids": [256, 99999], "stream": True,
                                              "sampling_params": {"max_new_tokens": 4}})
    assert status == 200
    event = json.loads(text.split("data: ", 2)[1])
    assert event["error"]["code"] == 400 and "99999" in event["error"]["message"], event


@pytest.mark.slow
def test_sglang_refusals_and_valid_edges_unchanged(server):
    for name, (path, body) in REFUSED_BY_SGLANG.items():
        status, text = send(server, path, body)
        assert 400 <= status < 500, f"{name}: {status} {text[:300]}"
    for name, (path, body) in STILL_SERVED.items():
        status, text = send(server, path, body)
        assert status == 200, f"{name}: {status} {text[:300]}"
    assert server.healthy()
    assert not server.tracebacks(), server.tracebacks()[0]
