# birdwatch's entry points. `make demo` shows the whole job on a local control plane; `make test` runs everything.
# Every install step lives here, so a fresh machine reaches green with `make test` alone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS ?=
SOAK_ARGS ?=
BENCH_ARGS ?= --interval 10 --n 10 --n 100 --n 500 --n 1000
VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/birdwatch/__init__.py)
IMAGE   ?= ghcr.io/otomato-gh/birdwatch

.PHONY: help install assets lint test test-fast sandbox-up sandbox-down demo bench soak wheel-check release clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml sandbox/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -e ./sandbox
	touch $@

install: $(VENV)/.installed ## virtual env in .venv/ with birdwatch, its sandbox (sandbox/) and test tools (.venv/bin/birdwatch)

assets: ## build (once) and cache the control plane's binaries and kwok; fetch Istio's CRDs; make sure of Prometheus
	bash hack/install-control-plane.sh >/dev/null

lint: install ## ruff and mypy --strict
	$(BIN)/ruff check src sandbox tests hack bench
	$(BIN)/ruff format --check src sandbox tests hack bench
	$(BIN)/mypy

test: install assets lint wheel-check ## everything: lint, the wheel's install, unit and integration tests
	$(BIN)/pytest $(PYTEST_ARGS)

wheel-check: ## the container image's install steps without Docker: wheel into a clean venv, --version, run --help
	bash hack/check-wheel.sh

sandbox-up: install assets ## etcd, kube-apiserver, controller-manager, scheduler, kwok nodes, Prometheus in the background (.sandbox/env)
	$(BIN)/birdwatch-sandbox up

demo: sandbox-up ## canaries on the sandbox with the real birdwatch: v04 paused and promoted, v05 rolled back, then promoted against a drifting production (~80 s; log in .demo/)
	$(BIN)/python hack/demo.py $(DEMO_ARGS)

sandbox-down: install ## stop the sandbox
	$(BIN)/birdwatch-sandbox down

release: install ## dist/install.yaml: CRD and controller in one file (IMAGE=ghcr.io/otomato-gh/birdwatch VERSION=<package version>)
	$(BIN)/python hack/release.py --version $(VERSION) --image $(IMAGE) --output dist/install.yaml

clean: sandbox-down ## stop the sandbox and remove local state (keeps .venv/ and the binary cache)
	rm -rf .sandbox .test-logs .demo build dist src/*.egg-info sandbox/*.egg-info sandbox/build

bench: install assets ## the benchmark: 10, 100, 500 and 1000 concurrent canaries, interval 10 s, on the sandbox (~9 min; results in bench/results/)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

soak: install assets ## 50 canaries through faults and leader kills for ~10 minutes: wrong endings, failover (CI runs it)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)
