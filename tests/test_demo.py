"""`sglang-dflash demo`, the README's first command: two real CPU servers, every answer equal."""

import subprocess
import sys

import pytest
from sglang_env import require_sglang

require_sglang()
pytestmark = pytest.mark.slow


def test_demo_serves_through_sglang_and_reports(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sglang_dflash", "demo", "--max-new-tokens", "24",
                          "--logs", str(tmp_path)], capture_output=True, text=True, timeout=600)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "sglang_dflash.dev.cpu_shims" in text and "CPU, tiny model" in text
    assert "every DFlash answer equal to the plain server's: yes (6/6)" in text
    assert "P(draft position j accepted)" in text and "tok/s" in text
    assert "both servers stopped" in text
    # the DFlash server really ran this plugin's worker
    assert "DFlash worker: drafter" in (tmp_path / "dflash.log").read_text()
