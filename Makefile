# Flowtrail: the verbs a newcomer looks for.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never

.PHONY: setup browser redis kustomize promtool run up down status demo test test-unit fuzz lint fmt schemas soak chaos chaos-smoke bench bench-smoke clean

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check uv
	uv sync --frozen --compile-bytecode --python python3.11
	@# Bytecode written once here: with PYTHONDONTWRITEBYTECODE set, every service start would compile faust and
	@# the services from source (about 1.2 s of CPU each start; docs/operations.md, recovery).
	$(PY) -m compileall -q -j 0 schemas services deploy >/dev/null
	@touch $@

# The web console's JavaScript packages (docs/console.md), from the npm registry as locked; without npm the API
# still runs and its console page says how to install them.
CONSOLE := services/api/console
$(CONSOLE)/node_modules/.package-lock.json: $(CONSOLE)/package.json $(CONSOLE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd $(CONSOLE) && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the web console stays uninstalled (install Node.js 20 and npm, then make setup)"; fi

setup: $(VENV)/.synced $(CONSOLE)/node_modules/.package-lock.json ## .venv with the locked dependencies; the console's packages

browser: setup ## Debian's chromium for the console's browser tests, installed with apt-get when missing
	@test -x /usr/bin/chromium || $(PY) -c "from tests.browser import chromium; chromium()"

redis: setup ## Debian's redis-server for the redis_get / redis_set tests, installed with apt-get when missing
	@test -x /usr/bin/redis-server || $(PY) -c "from tests.redis_server import redis_server_binary; redis_server_binary()"

# Go tools the tests run (docs/kubernetes.md, docs/observability.md), built from the Go module proxy into
# .state/tools/bin when missing or of another version.
TOOLS := $(CURDIR)/.state/tools/bin
KUSTOMIZE_VERSION := v5.7.1
PROMTOOL_VERSION := v0.316.0
# Prometheus's build tag that leaves out the cloud service-discovery plugins promtool's rule checks never use: half
# the build's CPU (about 3.5 min instead of 8 on this machine, docs/observability.md).
PROMTOOL_TAGS := remove_all_sd
kustomize: ## kustomize $(KUSTOMIZE_VERSION) for the Kubernetes manifests' tests (go install, about 2 min the first time)
	@$(TOOLS)/kustomize version 2>/dev/null | grep -qx $(KUSTOMIZE_VERSION) || \
		GOBIN=$(TOOLS) GOTOOLCHAIN=local go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

promtool: ## Prometheus's promtool ($(PROMTOOL_VERSION)) for the alert rules' tests (go install, several minutes the first time)
	@test "$$(cat $(TOOLS)/.promtool-version 2>/dev/null)" = "$(PROMTOOL_VERSION) $(PROMTOOL_TAGS)" -a -x $(TOOLS)/promtool || { \
		GOBIN=$(TOOLS) GOTOOLCHAIN=local go install -tags $(PROMTOOL_TAGS) \
			github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION) && \
		echo "$(PROMTOOL_VERSION) $(PROMTOOL_TAGS)" > $(TOOLS)/.promtool-version; }

run: setup ## Kafka + PostgreSQL + all services + demo flows; prints the API URL and key; Ctrl-C stops it
	$(VENV)/bin/flowtrail up

up: setup ## the same, left running in the background
	$(VENV)/bin/flowtrail up --detach

down: setup
	$(VENV)/bin/flowtrail down

status: setup
	$(VENV)/bin/flowtrail status

demo: setup
	$(VENV)/bin/flowtrail demo

test: setup browser redis kustomize promtool ## every test, on a real Kafka broker and PostgreSQL that the session starts or reuses
	$(VENV)/bin/pytest -q --durations=25

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

fuzz: setup ## schemathesis over the API's and ingest's OpenAPI, 20,000 cases (FLOWTRAIL_FUZZ_CASES); output in .state/contract/fuzz/
	rm -rf .state/contract/fuzz
	FLOWTRAIL_FUZZ_CASES=$${FLOWTRAIL_FUZZ_CASES:-20000} FLOWTRAIL_CONTRACT_REPORTS=.state/contract/fuzz \
		$(VENV)/bin/pytest -q -s tests/e2e/test_contract.py -k schemathesis

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

schemas: setup ## regenerate schemas/jsonschema from the pydantic models
	$(PY) -m schemas.generate

soak: setup ## verify equals live after a mixed workload of every run shape, ~400,000 runs (about 30 min; FLOWTRAIL_WORKLOAD_RUNS); not in make test
	FLOWTRAIL_WORKLOAD_RUNS=$${FLOWTRAIL_WORKLOAD_RUNS:-400000} $(VENV)/bin/pytest -q -s tests/e2e/test_mixed_workload.py

chaos: setup ## a load of four flow shapes while kill -9, broker kills, PostgreSQL restarts and SIGSTOPs land; every accepted trigger checked on the ledger; verify equal; one table of faults, runs and recovery p50/p99/max (20,000 runs on 3 brokers, 2 executors, 2 projectors; about 30 min; docs/operations.md); not in make test
	FLOWTRAIL_CHAOS_SCALE=$${FLOWTRAIL_CHAOS_SCALE:-default} $(VENV)/bin/pytest -q -s tests/chaos/chaos.py

chaos-smoke: setup ## the same, small: a few faults of each kind, ~1,500 runs on one broker, 4-7 min (CI)
	FLOWTRAIL_CHAOS_SCALE=small $(VENV)/bin/pytest -q -s tests/chaos/chaos.py

bench: setup ## figures vs raw Kafka/PostgreSQL ceilings; one table, also .state/bench/latest.json (FLOWTRAIL_BENCH_SCALE=smoke|default|full)
	$(VENV)/bin/pytest -q -s tests/bench

bench-smoke: setup ## the same, tiny: keeps the harness working (CI), under a minute
	FLOWTRAIL_BENCH_SCALE=smoke $(VENV)/bin/pytest -q -s tests/bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
