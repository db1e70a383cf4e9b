"""Stdlib OpenAI-compatible streaming client for `sglang-dflash bench online`.

One request per call: POST to /v1/chat/completions or /v1/completions with
`stream: true`, time the first and every later text chunk, and read the usage and
SGLang's `sglext.spec_tokens_details` chunks. No third-party HTTP package, so it runs
against our plugin, stock SGLang or vLLM.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass, field

from .prompts import PromptItem


class HTTPError(Exception):
    """A non-200 answer, or an error object inside the event stream."""


def _connect(base_url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"expected an http(s)://host[:port] URL, got {base_url!r}")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=timeout), u.path.rstrip("/")


def _headers(api_key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def get_json(base_url: str, path: str, timeout: float, api_key: str | None = None):
    """GET a JSON document; None when the server has no such endpoint or answers non-JSON."""
    conn, prefix = _connect(base_url, timeout)
    try:
        conn.request("GET", prefix + path, headers=_headers(api_key))
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return json.loads(raw) if resp.status == 200 else None
    except ValueError:
        return None


def stream_sse(base_url: str, path: str, body: dict, timeout: float, api_key: str | None):
    """POST `body` and yield each `data:` JSON object of the event stream until [DONE]."""
    conn, prefix = _connect(base_url, timeout)
    try:
        conn.request("POST", prefix + path, json.dumps(body), _headers(api_key))
        resp = conn.getresponse()
        if resp.status != 200:
            raise HTTPError(f"HTTP {resp.status}: {resp.read(400).decode(errors='replace')}")
        while line := resp.readline():
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk and not chunk.get("choices"):
                raise HTTPError(f"error event in the stream: {chunk['error']}")
            yield chunk
    finally:
        conn.close()


@dataclass(frozen=True)
class Settings:
    """What every request to one server shares."""

    model: str
    completions: bool
    max_tokens: int
    temperature: float
    spec_details: bool
    timeout_s: float
    api_key: str | None


@dataclass
class RequestResult:
    id: str
    kind: str
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    tokens_from_usage: bool = False
    ttft_s: float | None = None
    latency_s: float | None = None
    chunks: int = 0
    spec_accept_length: float | None = None
    spec_verify_ct: int | None = None
    spec_correct_drafts_histogram: list[int] | None = None
    finish_reason: str | None = None
    itl_s: list[float] = field(default_factory=list, repr=False)
    text: str = field(default="", repr=False)  # the streamed output


def request_body(item: PromptItem, s: Settings) -> tuple[str, dict]:
    body = {"model": s.model, "max_tokens": s.max_tokens, "temperature": s.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if s.spec_details:
        body["return_spec_tokens_details"] = True
    if s.completions:
        return "/v1/completions", {**body, "prompt": item.completion_prompt()}
    return "/v1/chat/completions", {**body, "messages": item.chat_messages()}


def _apply_chunk(res: RequestResult, chunk: dict, now: float, last: list[float],
                 completions: bool) -> None:
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice if completions else (choice.get("delta") or {})
        text += (delta.get("text" if completions else "content") or "") + \
            (delta.get("reasoning_content") or "")
        res.finish_reason = choice.get("finish_reason") or res.finish_reason
    res.text += text
    if text:
        res.chunks += 1
        if res.ttft_s is None:
            res.ttft_s = now - last[0]
        else:
            res.itl_s.append(now - last[0])
        last[0] = now
    if chunk.get("usage"):
        res.prompt_tokens = chunk["usage"].get("prompt_tokens")
        res.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        res.tokens_from_usage = True
    details = (chunk.get("sglext") or {}).get("spec_tokens_details")
    if isinstance(details, list):  # n > 1 sends one entry per choice; we send n = 1
        details = details[0] if details else None
    if isinstance(details, dict):
        res.spec_accept_length = details.get("spec_accept_length")
        res.spec_verify_ct = details.get("spec_verify_ct")
        res.spec_correct_drafts_histogram = details.get("spec_correct_drafts_histogram") or None


def run_request(base_url: str, item: PromptItem, s: Settings) -> RequestResult:
    """Send one streaming request; every failure lands in the result, never raises."""
    res = RequestResult(id=item.id, kind=item.kind)
    path, body = request_body(item, s)
    t0 = time.perf_counter()
    last = [t0]
    try:
        for chunk in stream_sse(base_url, path, body, s.timeout_s, s.api_key):
            _apply_chunk(res, chunk, time.perf_counter(), last, s.completions)
    except (OSError, HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency_s = time.perf_counter() - t0
    if not res.tokens_from_usage:
        # No usage chunk (a server ignoring stream_options): count one token per chunk.
        res.completion_tokens = res.chunks
    res.ok = res.chunks > 0
    res.error = None if res.ok else "the stream ended without any output text"
    return res
