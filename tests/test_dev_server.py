"""dev/server.py without a server: the retry when another process takes the chosen port."""

import types

import pytest

from sglang_dflash.dev import server as dev_server
from sglang_dflash.dev.server import Server, ServerExited

BIND_ERROR = "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {}): address already in use"


def _fake(tmp_path, monkeypatch, log_text: str, exits: int):
    """A Server whose first ``exits`` processes die at start-up, logging ``log_text``."""
    srv = object.__new__(Server)
    srv.log = tmp_path / "server.log"
    launches = []

    def launch():
        srv.port = 40000 + len(launches)
        srv.proc = types.SimpleNamespace(pid=-1, poll=lambda: None)
        srv.log.write_text(log_text.format(srv.port) if len(launches) < exits else "healthy")
        launches.append(srv.port)

    def healthy():
        if srv.log.read_text() != "healthy":
            raise ServerExited("server exited (rc 3)")
        return True

    monkeypatch.setattr(srv, "_launch", launch, raising=False)
    monkeypatch.setattr(srv, "healthy", healthy, raising=False)
    monkeypatch.setattr(dev_server.os, "killpg", lambda pid, sig: None)
    monkeypatch.setattr(dev_server.time, "sleep", lambda s: None)
    launch()
    return srv, launches


def test_a_lost_port_race_restarts_on_a_fresh_port(tmp_path, monkeypatch):
    srv, launches = _fake(tmp_path, monkeypatch, BIND_ERROR, exits=2)
    srv.wait_healthy(timeout=5)
    assert launches == [40000, 40001, 40002]


def test_other_start_up_failures_and_too_many_races_are_raised(tmp_path, monkeypatch):
    srv, launches = _fake(tmp_path, monkeypatch, "ValueError: bad drafter", exits=1)
    with pytest.raises(ServerExited):
        srv.wait_healthy(timeout=5)
    assert launches == [40000]
    srv, launches = _fake(tmp_path, monkeypatch, BIND_ERROR, exits=dev_server.PORT_RETRIES + 1)
    with pytest.raises(ServerExited):
        srv.wait_healthy(timeout=5)
    assert len(launches) == dev_server.PORT_RETRIES + 1
