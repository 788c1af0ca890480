# Entry points: `make demo`, `make test` (the full suite CI runs) and `make test-fast`. Each
# creates (or reuses) .venv and installs what it needs from the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# pytest-xdist processes for `make test`: the broker tests mostly wait (group joins, session
# timeouts), so two halve the run on two cores. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast lint bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Debian packages the tests drive for real: a Prometheus server and promtool, docker-compose
# (`config` of the compose file) and kubectl (`kustomize` of deploy/k8s; any kubectl will do).
SYSTEM_PROGRAMS := prometheus:prometheus promtool:prometheus docker-compose:docker-compose kubectl:kubernetes-client
system-deps:
	@missing=; for pair in $(SYSTEM_PROGRAMS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $$(echo $$missing | tr ' ' '\n' | sort -u) >/dev/null; fi

demo: venv
	$(BIN)/stream-learner demo

lint: venv
	$(BIN)/ruff check stream_learner tests benchmarks

test: venv system-deps lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The edit-test loop: no broker, no Prometheus server, no network, nothing slow (under 2 minutes).
FAST := not kafka and not prometheus and not network and not slow
test-fast: venv
	$(BIN)/python -m pytest -m "$(FAST)" $(PYTEST_ARGS)

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
	$(BIN)/python -m benchmarks.revisions

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
