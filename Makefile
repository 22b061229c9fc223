# The two commands of the README:
#   make repro   set up (venv, data, model cache) and run the whole DVC pipeline (quick profile by default)
#   make test    set up and run the test suite (unit tests + every notebook in the smoke profile)
#   (make test-reruns: every notebook's smoke run twice, byte-identical; make test reruns one paper per family)
# Both are idempotent: a second run skips what is installed or up to date.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DGLBACKEND := pytorch
# pip on some machines warns about every missing local index folder; keep the log readable
# pytest-xdist workers: notebook smoke runs are mostly kernel start-up, two overlap well on 2 cores; work stealing
# keeps both busy when one draws the long notebook tests
TEST_WORKERS ?= 2
QUIET := grep -v '^WARNING: Location' || true

.PHONY: setup data models nas-groundtruth repro test test-reruns clean-build
setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== installing the pinned environment into $(VENV) (first run: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade "pip>=23" 2>&1 | $(QUIET)
	@$(BIN)/python -m pip install --quiet -e . 2>&1 | $(QUIET)
	@$(BIN)/python -c "import torch, dgl, transformers, opacus, papermill, dvc, flwr, ray, pyspark" || { echo "environment check failed"; exit 1; }
	@$(BIN)/python -m reprolab.distributed.spark || { echo "Spark needs Java 8/11/17 (see the message above)"; exit 1; }
	@git config core.hooksPath .githooks 2>/dev/null || true
	@rm -f $(VENV)/.installed-* && touch $@

data: setup
	@$(BIN)/python -m reprolab.data.materialize --verify

models: data
	@$(BIN)/dvc repro model_cache

repro: models
	@$(BIN)/python -m reprolab.config
	@$(BIN)/python -m reprolab.pipeline --check
	$(BIN)/dvc repro
	@echo "== results: results/<paper>/metrics.json, reports/<paper>.html, reports/index.html"

nas-groundtruth: data
	@$(BIN)/dvc repro nas_groundtruth

test: models nas-groundtruth
	$(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist worksteal

test-reruns: models nas-groundtruth
	REPROLAB_RERUN_ALL=1 $(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist worksteal -m notebook

clean-build:
	rm -rf build
