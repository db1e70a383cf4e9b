# Two commands on a fresh CPU machine (see README):
#   make demo   set up .venv with the lean CPU SGLang stack and serve the bundled tiny pair
#               through two real SGLang servers (plain and DFlash), comparing every answer
#   make test   the same .venv, then the test suite
# A second run reuses .venv; the stamp files record what was installed.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints-cpu.txt
export TRITON_INTERPRET ?= 1

.PHONY: demo test setup setup-sglang clean-venv

$(VENV)/.stamp-base: pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel, so no dependency pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

$(VENV)/.stamp-sglang: $(VENV)/.stamp-base requirements/sglang-0.5.23-lean-cpu.txt
	# the lean CPU path: light requirements, then sglang itself without its CUDA pins
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/sglang-0.5.23-lean-cpu.txt
	$(PIP) install -q --no-deps sglang==0.5.23
	touch $@

setup: $(VENV)/.stamp-base
setup-sglang: $(VENV)/.stamp-sglang

demo: $(VENV)/.stamp-sglang
	$(VENV)/bin/sglang-dflash demo

test: $(VENV)/.stamp-sglang
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
