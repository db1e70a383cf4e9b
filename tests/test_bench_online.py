"""Online benchmark client against a stub OpenAI server on 127.0.0.1.

The stub is not under test: like SGLang it streams the token sampled by the prefill
first, then one chunk per "verify step" following a fixed pattern of commit lengths
chosen from the prompt text (none when max_tokens is 1), and reports SGLang-shaped
per-request stats (sglext.spec_tokens_details: completion tokens include the prefill
token) derived from the same pattern, so the expected tau and histogram are computed
here independently of the client.
"""

import json
import sys
import threading
import time
import zlib
from argparse import ArgumentParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_dflash.bench import client as bench_http, prompts as bench_prompts
from sglang_dflash.bench import online as bo

# commit lengths (accept_len + 1) of each verify step; picked by a hash of the prompt
PATTERNS = ([3, 1, 4, 2], [1, 1, 2, 6], [5, 16, 1, 3, 2], [2, 2])
SERVER_LIFETIME_TAU = 2.75


def pattern_for(text: str) -> list[int]:
    return PATTERNS[zlib.crc32(text.encode()) % len(PATTERNS)]


def _prompt_text(body: dict) -> str:
    return body["prompt"] if "prompt" in body else body["messages"][-1]["content"]


class StubServer:
    """SGLang-shaped streaming server; `spec` adds per-request stats and /server_info."""

    def __init__(self, spec: bool, delay_s: float, sglext: bool = True):
        self.spec, self.delay_s, self.sglext = spec, delay_s, sglext
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.bodies = []
        # server-wide accepted-draft counts, as the plugin's worker keeps them (W = 16)
        self.served = [0] * 16
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "stub-model"}]})
                elif self.path == "/server_info" and stub.spec:
                    with stub.lock:
                        counts = {"block_size": 16, "verify_width": 16,
                                  "accepted_drafts_histogram": list(stub.served)}
                    self._json(200, {"version": "stub", "speculative_algorithm": "DFLASH",
                                     "internal_states": [
                                         {"avg_spec_accept_length": SERVER_LIFETIME_TAU,
                                          "dflash_acceptance": counts}]})
                else:
                    self._json(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.peak = max(stub.peak, stub.in_flight)
                try:
                    stub.stream(self, body)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stream(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(obj) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
            data += b"\n\n"
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        steps = pattern_for(_prompt_text(body)) if body["max_tokens"] > 1 else []
        chat = "messages" in body
        for n in [1] + steps:  # the prefill's token, then one chunk per verify step
            time.sleep(self.delay_s)
            text = "tok " * n
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0,
                                                                            "text": text}
            send({"id": "x", "choices": [choice]})
        tokens = 1 + sum(steps)
        with self.lock:
            for n in steps:
                self.served[n - 1] += 1
        # like SGLang, no stats for a request that never reached a verify step
        if self.spec and self.sglext and body.get("return_spec_tokens_details") and steps:
            hist = [0] * max(steps)
            for n in steps:
                hist[n - 1] += 1
            send({"id": "x", "choices": [], "sglext": {"spec_tokens_details": {
                "spec_accept_length": tokens / len(steps),
                "spec_verify_ct": len(steps), "spec_correct_drafts_histogram": hist}}})
        if body.get("stream_options", {}).get("include_usage"):
            send({"id": "x", "choices": [], "usage": {
                "prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}})
        send(b"[DONE]")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def spec_server():
    s = StubServer(spec=True, delay_s=0.003)
    yield s
    s.close()


@pytest.fixture
def plain_server():
    s = StubServer(spec=False, delay_s=0.006)
    yield s
    s.close()


def _args(tmp_path, url, *extra):
    p = ArgumentParser()
    bo.add_online_args(p)
    return p.parse_args(["--url", url, "--out", str(tmp_path / "out"), *extra])


def _expected(items, n):
    """tau (verify steps only), SGLang's accept length (prefill token counted) and the
    accept_len histogram of a level of n requests cycling `items`."""
    steps = [pattern_for(items[i % len(items)].chat_messages()[-1]["content"])
             for i in range(n)]
    hist = [0] * 16
    for pat in steps:
        for c in pat:
            hist[c - 1] += 1
    while hist and hist[-1] == 0:
        hist.pop()
    n_steps = sum(map(len, steps))
    return sum(map(sum, steps)) / n_steps, (sum(map(sum, steps)) + n) / n_steps, hist


LEVEL_KEYS = {"concurrency", "requests", "ok", "failed", "errors", "wall_s", "output_tokens",
              "output_tok_s", "requests_per_s", "tokens_from_usage", "tau", "tau_source",
              "tau_requests", "verify_steps", "no_verify_requests", "no_stats_requests",
              "sglang_accept_length", "sglang_accept_length_request_mean",
              "accept_len_histogram", "position_accept_rate",
              "server_info_avg_spec_accept_length", "server_acceptance", "ttft_s", "itl_s", "tpot_s",
              "latency_s", "per_request"}
PCT_KEYS = {"p50", "p90", "p99", "mean", "n"}


def test_sweep_json_plots_and_speedup(tmp_path, spec_server, plain_server, capsys):
    args = _args(tmp_path, spec_server.url, "--baseline-url", plain_server.url,
                 "--concurrency", "1,3,5", "--num-prompts", "8", "--max-tokens", "32")
    assert bo.main_online(args) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    items = bench_prompts.load_prompts(None, None, 8, False)

    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3, 5]
    for lv in result["levels"]:
        assert set(lv) == LEVEL_KEYS
        for key in ("ttft_s", "itl_s", "tpot_s", "latency_s"):
            assert set(lv[key]) == PCT_KEYS and lv[key]["p50"] <= lv[key]["p99"]
        n = max(8, 2 * lv["concurrency"])
        tau, sglang_tau, hist = _expected(items, n)
        assert (lv["requests"], lv["ok"], lv["failed"]) == (n, n, 0)
        assert lv["tau"] == pytest.approx(tau, rel=1e-12)
        assert lv["sglang_accept_length"] == pytest.approx(sglang_tau, rel=1e-12)
        assert (lv["tau_requests"], lv["no_verify_requests"], lv["no_stats_requests"]) == (n, 0, 0)
        assert lv["tau_source"].startswith("per-request")
        assert lv["accept_len_histogram"] == hist
        # P(draft j accepted) from the same histogram, by hand
        assert lv["position_accept_rate"] == pytest.approx(
            [sum(hist[j:]) / sum(hist) for j in range(1, 16)], rel=1e-12)
        assert lv["server_info_avg_spec_accept_length"] == SERVER_LIFETIME_TAU
        # the server's own counts over the level (the warm-up request before it left out)
        server = lv["server_acceptance"]
        assert server["accepted_drafts_histogram"] == hist + [0] * (16 - len(hist))
        assert server["steps"] == sum(hist) and server["tau"] == pytest.approx(tau, rel=1e-12)
        assert server["position_accept_rate"] == pytest.approx(lv["position_accept_rate"], rel=1e-12)
        assert lv["tokens_from_usage"] is True
        assert lv["output_tokens"] == sum(r["completion_tokens"] for r in lv["per_request"])
        assert all(r["spec_verify_ct"] for r in lv["per_request"])

    base = result["baseline"]["levels"]
    assert [lv["tau"] for lv in base] == [None, None, None]
    assert [lv["accept_len_histogram"] for lv in base] == [None, None, None]
    assert [lv["server_acceptance"] for lv in base] == [None, None, None]
    for row, lv, b in zip(result["speedup"], result["levels"], base):
        assert row["speedup"] == pytest.approx(lv["output_tok_s"] / b["output_tok_s"])
    assert result["server"]["model"] == "stub-model"
    assert result["server"]["server_info"]["version"] == "stub"
    assert result["baseline"]["server_info"] is None
    assert result["config"]["concurrency"] == [1, 3, 5]

    assert result["plots"] == ["tau_and_throughput.png", "accept_len_histogram.png",
                               "position_acceptance.png"]
    for name in result["plots"]:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert f"server under test {spec_server.url} c=5: 10/10 done" in err
    assert f"baseline {plain_server.url} c=5: 10/10 done" in err


def test_requests_carry_sglang_fields_and_levels_run_concurrently(spec_server):
    items = bench_prompts.load_prompts(None, None, None, False)
    s = bench_http.Settings(model="m", completions=False, max_tokens=16, temperature=0.0,
                            spec_details=True, timeout_s=30, api_key=None)
    for c in (1, 4):
        spec_server.peak = 0
        lv = bo.run_level(spec_server.url, items, c, 2 * c + 1, s)
        assert spec_server.peak == c and lv["ok"] == 2 * c + 1
    body = spec_server.bodies[-1]
    assert body["stream"] is True and body["return_spec_tokens_details"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "m"
    assert len(items) == 40 and {i.kind for i in items} == {"math", "gsm8k", "code", "chat"}


def test_completions_mode_templates(tmp_path, spec_server):
    args = _args(tmp_path, spec_server.url, "--completions", "--concurrency", "2",
                 "--num-prompts", "4", "--warmup", "0")
    assert bo.main_online(args) == 0
    prompts = [b["prompt"] for b in spec_server.bodies]
    assert all("messages" not in b for b in spec_server.bodies)
    assert prompts[0].endswith("put your final answer within \\boxed{}.\n")
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["levels"][0]["ok"] == 4 and result["levels"][0]["tau"] is not None


def test_without_per_request_stats_tau_is_na_never_the_server_figure(tmp_path):
    server = StubServer(spec=True, delay_s=0.001, sglext=False)
    try:
        args = _args(tmp_path, server.url, "--concurrency", "2", "--num-prompts", "3")
        assert bo.main_online(args) == 0
    finally:
        server.close()
    lv = json.loads((tmp_path / "out" / "result.json").read_text())["levels"][0]
    assert lv["tau"] is None and lv["tau_source"] is None and lv["no_stats_requests"] == 4
    assert lv["server_info_avg_spec_accept_length"] == SERVER_LIFETIME_TAU
    assert lv["accept_len_histogram"] is None and lv["position_accept_rate"] is None
    assert not (tmp_path / "out" / "accept_len_histogram.png").exists()


def test_requests_without_verify_steps_are_counted_not_averaged(tmp_path, spec_server, capsys):
    args = _args(tmp_path, spec_server.url, "--concurrency", "2", "--num-prompts", "3",
                 "--max-tokens", "1")
    assert bo.main_online(args) == 0
    lv = json.loads((tmp_path / "out" / "result.json").read_text())["levels"][0]
    assert lv["tau"] is None and lv["sglang_accept_length"] is None
    assert (lv["tau_requests"], lv["no_verify_requests"], lv["no_stats_requests"]) == (0, 4, 0)
    # the table's tau column says n/a; the server's running figure is not shown there
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["2"]][0]
    assert row.split()[2:4] == ["n/a", "n/a"] and str(SERVER_LIFETIME_TAU) not in row
    # a server that does not say it speculates: those requests simply carry no stats
    s = bench_http.Settings(model="m", completions=False, max_tokens=1, temperature=0.0,
                            spec_details=True, timeout_s=30, api_key=None)
    items = bench_prompts.load_prompts(None, None, 2, False)
    plain = bo.run_level(spec_server.url, items, 1, 2, s, server_info={"speculative_algorithm": None})
    assert (plain["no_verify_requests"], plain["no_stats_requests"]) == (0, 2)


def test_num_prompts_takes_the_kinds_round_robin():
    items = bench_prompts.load_prompts(None, None, 4, False)
    assert [i.kind for i in items] == ["math", "gsm8k", "code", "chat"]
    everything = bench_prompts.load_prompts(None, None, None, False)
    kinds = [i.kind for i in everything]
    firsts = [everything[kinds.index(k)].id for k in ("math", "gsm8k", "code", "chat")]
    assert [i.id for i in items] == firsts
    nine = bench_prompts.load_prompts(None, None, 9, False)
    assert [i.kind for i in nine] == ["math", "gsm8k", "code", "chat"] * 2 + ["math"]
    assert len({i.id for i in nine}) == 9


def test_no_spec_details_flag_and_failures_are_reported(tmp_path, spec_server):
    args = _args(tmp_path, spec_server.url, "--no-spec-details", "--concurrency", "1",
                 "--num-prompts", "2", "--warmup", "0")
    assert bo.main_online(args) == 0
    assert all("return_spec_tokens_details" not in b for b in spec_server.bodies)
    s = bench_http.Settings(model="m", completions=False, max_tokens=4, temperature=0.0,
                            spec_details=True, timeout_s=5, api_key=None)
    hi = bench_prompts.PromptItem("x", "raw", text="hi")
    dead = bench_http.run_request("http://127.0.0.1:9", hi, s)
    assert not dead.ok and dead.error.startswith(("ConnectionRefusedError", "OSError"))
    with pytest.raises(SystemExit, match="cannot reach http://127.0.0.1:9"):
        bo.main_online(_args(tmp_path, "http://127.0.0.1:9"))


@pytest.mark.parametrize("lines, where, field", [
    (['{"prompt": "a"}', "{not json"], "line 2", "not JSON"),
    (['{"prompt": "a"}', "", '{"text": "b"}'], "line 3", "field 'prompt'"),
    (['{"messages": [{"role": "user"}]}'], "line 1", "field 'messages'"),
    (['{"messages": "hi"}'], "line 1", "field 'messages'"),
    (['{"prompt": "a", "kind": "poetry"}'], "line 1", "field 'kind'"),
    (['["a"]'], "line 1", "expected a JSON object"),
], ids=["bad-json", "missing-prompt", "message-no-content", "messages-not-list", "bad-kind",
        "not-object"])
def test_jsonl_errors_name_line_and_field(tmp_path, lines, where, field):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        bench_prompts.read_jsonl(path, completions=False)
    assert str(path) in str(e.value) and where in str(e.value) and field in str(e.value)


def test_jsonl_messages_need_chat_endpoint_and_are_sent_as_is(tmp_path):
    path = tmp_path / "p.jsonl"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"messages": msgs, "id": "m1"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'messages' needs the chat endpoint"):
        bench_prompts.read_jsonl(path, completions=True)
    (item,) = bench_prompts.read_jsonl(path, completions=False)
    assert item.id == "m1" and item.chat_messages() == msgs


def test_percentiles_and_bad_arguments():
    p = bo.percentiles([4.0, 1.0, 3.0, 2.0])
    assert (p["p50"], p["n"], p["mean"]) == (2.5, 4, 2.5)
    assert p["p90"] == pytest.approx(3.7) and p["p99"] == pytest.approx(3.97)
    assert bo.percentiles([])["p50"] is None
    parser = ArgumentParser()
    bo.add_online_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--concurrency", "4,0"])


def test_dataset_without_datasets_package_is_a_clear_error(monkeypatch, tmp_path):
    # None in sys.modules makes `import datasets` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "datasets", None)
    args = _args(tmp_path, "http://127.0.0.1:9", "--dataset", "gsm8k")
    with pytest.raises(SystemExit, match="--dataset gsm8k: needs the `datasets` package"):
        bo.main_online(args)
