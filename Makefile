# Two entry points: `make demo` and `make test`. Both create (or reuse) .venv and
# install what they need from the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Debian packages the tests drive for real (a Prometheus server and promtool).
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }

demo: venv
	$(BIN)/stream-learner demo

lint: venv
	$(BIN)/ruff check stream_learner tests benchmarks

test: venv system-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Each writes benchmarks/results/<name>.md and a PNG; they need the fetched datasets.
bench: venv
	$(BIN)/stream-learner datasets fetch all
	$(BIN)/python -m benchmarks.learners
	$(BIN)/python -m benchmarks.neural --memory
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.pipeline --transactions --learners nb --repeats 3 --paced 1500
	$(BIN)/python -m benchmarks.metrics_cost
	$(BIN)/python -m benchmarks.adversarial
	$(BIN)/python -m benchmarks.clients
	$(BIN)/python -m benchmarks.scaling --fusion-every 0.05

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
