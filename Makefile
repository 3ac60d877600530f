# The two Quick-start commands (README): `make demo` and `make test`. Both set up the
# environment first; a second run reuses it (the stamp changes only when the pins do).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PINS := $(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(PINS)
DEMO_DIR ?= data/demo

.PHONY: venv demo test clean-data

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-cache-dir -r requirements-dev.txt
	$(BIN)/pip install --no-deps --no-build-isolation -e . || $(BIN)/pip install --no-deps -e .
	$(BIN)/python -c "import torch, torchaudio, timm, ray, deepspeed, webdataset; print('stack ok: torch', torch.__version__, 'ray', ray.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

# Generate a synthetic AVE dataset, pack it, verify and inspect the shards, then train the tiny
# AVE preset on them: jobs/ave.py with no arguments (embedded loopback Ray, 2 CPU workers, ZeRO 0);
# it prints the per-epoch, best-on-validation and test metrics.
demo: venv
	scripts/loopback $(BIN)/python -m data_pipeline.demo --out $(DEMO_DIR)
	AVMOE_DEMO_DIR=$(DEMO_DIR) scripts/loopback $(BIN)/python jobs/ave.py

test: venv
	scripts/install-prometheus
	scripts/loopback $(BIN)/python -m pytest -q -ra tests

clean-data:
	rm -rf data
