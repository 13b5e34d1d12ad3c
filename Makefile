# Everything a user or CI needs, from a fresh clone. See README.md.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
INSTALLED := $(VENV)/.installed
# Exact versions of every dependency, so a fresh machine, CI and the image get what
# was tested (`make lock` renews them).
CONSTRAINTS := deploy/constraints.txt
# uv installs the pinned packages; pip took 45-60 s of every fresh `make test`
# (a minute of CI's 15), uv takes 5-15 s. Pinned like the rest.
UV_VERSION := 0.13.9
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python -c $(CONSTRAINTS)
# uv reads its own settings, not pip's: a mirror given to pip this way is passed on
# (pip.conf is not read: set UV_INDEX_URL, and SSL_CERT_FILE for its certificate).
ifdef PIP_INDEX_URL
export UV_INDEX_URL ?= $(PIP_INDEX_URL)
endif
KAFKA_HOME := .cache/kafka
KAFKA_PORT ?= 9092
# Kubernetes sets KAFKA_PORT=tcp://10.0.0.1:9092 in pods next to a Service named kafka:
# taken from the environment, only a port number counts.
ifeq ($(origin KAFKA_PORT),environment)
ifneq ($(shell [[ '$(KAFKA_PORT)' =~ ^[0-9]+$$ ]] && echo port),port)
$(warning KAFKA_PORT=$(KAFKA_PORT) in the environment is not a port number: using 9092)
KAFKA_PORT := 9092
endif
endif
# The broker's port + 1 unless set: `make kafka-up KAFKA_PORT=19092` kept 9093, taken
# by the broker already on 9092.
KAFKA_CONTROLLER_PORT ?= $(shell echo $$(( $(KAFKA_PORT) + 1 )))

.PHONY: help install promtool run test lint fmt bench lock kafka-up kafka-down kafka-fetch clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# One change to .venv at a time: `make run` and `make test` started together on a
# fresh clone ran two pips over one venv (util-linux's flock; without it, unlocked).
VENV_LOCK := $(if $(shell command -v flock),flock .cache/venv.lock,)

# What running the bridge needs; `make run` and the kafka-* targets need no more.
# The Makefile too: a .venv made by an older one (pip, no uv) is brought up to date.
$(RUNTIME): pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ needed (set PYTHON=...)"; exit 1; }
	@mkdir -p .cache
	@# --clear: a venv left without pip (python3-venv missing, say) is made again
	$(VENV_LOCK) bash -c 'test -x $(BIN)/pip || $(PYTHON) -m venv --clear $(VENV)'
	$(VENV_LOCK) $(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV_LOCK) $(UV) -e .
	touch $@

# The test, lint and deploy tools on top.
$(INSTALLED): $(RUNTIME)
	$(VENV_LOCK) $(UV) -e '.[dev]'
	touch $@

install: $(INSTALLED) ## create .venv with the bridge and its dev tools

# Installed as root only (apt-get); the package's own service is then stopped and
# disabled: the tests start their own Prometheus, and Debian's would stay on :9090.
promtool: ## Debian's prometheus package (promtool, prometheus) for the deploy/ tests
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if [[ $$(id -u) != 0 ]]; then \
	  echo "make test needs promtool and prometheus (the deploy/ tests): install Debian's" \
	    "prometheus package once (sudo apt-get install prometheus; then sudo systemctl" \
	    "disable --now prometheus if its service should not run), or put both on PATH"; \
	  exit 1; fi; \
	apt-get update -qq; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	if [[ -d /run/systemd/system ]]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi

kafka-fetch: $(RUNTIME) ## download the Kafka broker jars (cached in .cache/kafka)
	$(BIN)/python -m bridge.devkafka fetch --home $(KAFKA_HOME)

kafka-up: $(RUNTIME) ## start a local single-node Kafka on localhost:9092 (background; KAFKA_PORT=... for another port)
	$(BIN)/python -m bridge.devkafka up --home $(KAFKA_HOME) --port $(KAFKA_PORT) --controller-port $(KAFKA_CONTROLLER_PORT)

kafka-down: $(RUNTIME) ## stop the local Kafka
	$(BIN)/python -m bridge.devkafka down --home $(KAFKA_HOME) --port $(KAFKA_PORT)

# With BRIDGE_CONFIG_FILE the file's settings stand: make run adds none of its own
# (they are environment variables, which win over the file), starts the local Kafka
# only when neither the file nor the environment names one, and prints the curl
# with the file's port and first token.
run: $(RUNTIME) ## run the bridge on :8080 (starts a local Kafka unless BRIDGE_KAFKA_BOOTSTRAP is set)
	@file="$${BRIDGE_CONFIG_FILE:-}"; \
	from_file() { \
	  if [[ -n "$$file" ]]; then $(BIN)/python -c 'import sys, tomllib; v = tomllib.loads(open(sys.argv[1], encoding="utf-8-sig").read()).get(sys.argv[2]); v = v[0] if isinstance(v, list) and v else v; print("" if v in (None, []) else v)' "$$file" "$$1" 2>/dev/null || true; fi; }; \
	bootstrap="$${BRIDGE_KAFKA_BOOTSTRAP:-$$(from_file kafka_bootstrap)}"; \
	if [[ -z "$$bootstrap" ]]; then \
	  $(MAKE) --no-print-directory kafka-up; \
	  bootstrap="127.0.0.1:$(KAFKA_PORT)"; export BRIDGE_KAFKA_BOOTSTRAP="$$bootstrap"; fi; \
	if [[ -z "$$file" ]]; then \
	  if [[ -z "$${BRIDGE_TOKENS_FILE:-}" ]]; then export BRIDGE_TOKENS="$${BRIDGE_TOKENS:-dev-token}"; fi; \
	  export BRIDGE_CREATE_TOPICS="$${BRIDGE_CREATE_TOPICS:-true}" \
	    BRIDGE_SPOOL_DIR="$${BRIDGE_SPOOL_DIR:-.cache/spool}" BRIDGE_LOG_FORMAT="$${BRIDGE_LOG_FORMAT:-text}"; fi; \
	token="$${BRIDGE_TOKENS:-$$(from_file tokens)}"; token="$${token%%,*}"; token="$${token:-A-TOKEN-OF-YOUR-TOKENS-FILE}"; \
	port="$${BRIDGE_PORT:-$$(from_file port)}"; port="$${port:-8080}"; \
	echo; echo "Send a test event (in another terminal):"; \
	echo "  curl -i -X POST http://localhost:$$port/webhooks/geins \\"; \
	echo "    -H 'Authorization: Bearer $$token' \\"; \
	echo "    -H \"x-Idempotency-Key: curl-\$$(date +%s)-\$$RANDOM\" \\"; \
	echo "    -H \"x-Timestamp: \$$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \\"; \
	echo "    -d '{\"entity\":\"Order\",\"action\":\"create\",\"id\":\"12345\"}'"; \
	if [[ -n "$$file" ]]; then \
	  settings="BRIDGE_CONFIG_FILE='$$file' $${BRIDGE_KAFKA_BOOTSTRAP:+BRIDGE_KAFKA_BOOTSTRAP=$$BRIDGE_KAFKA_BOOTSTRAP }"; \
	else \
	  settings="$${BRIDGE_TOPIC_TEMPLATE:+BRIDGE_TOPIC_TEMPLATE='$$BRIDGE_TOPIC_TEMPLATE' }BRIDGE_KAFKA_BOOTSTRAP=$$bootstrap "; fi; \
	echo "See it arrive:  $${settings}$(BIN)/bridge tail --from-beginning"; \
	if [[ "$$bootstrap" == "127.0.0.1:$(KAFKA_PORT)" ]]; then \
	  echo "Ctrl-C stops the bridge; the local Kafka runs on until: make kafka-down KAFKA_PORT=$(KAFKA_PORT)"; fi; \
	echo; \
	exec $(BIN)/bridge serve

# The jars first: fetched inside the first Kafka test's fixture, the download counted
# against that test's timeout, and a failure was repeated by every Kafka test.
test: $(INSTALLED) promtool kafka-fetch ## run the whole suite (starts and stops its own Kafka)
	$(BIN)/pytest

lint: $(INSTALLED) ## ruff, format check and mypy --strict; never edits files
	$(BIN)/ruff check bridge tests
	$(BIN)/ruff format --check bridge tests
	$(BIN)/mypy

fmt: $(INSTALLED) ## format and auto-fix
	$(BIN)/ruff format bridge tests
	$(BIN)/ruff check --fix bridge tests

bench: $(INSTALLED) ## bridge vs baselines: throughput, latency, memory (BENCH_QUICK=1: smoke run); writes tests/bench/results.*
	$(VENV_LOCK) $(UV) -e '.[dev,bench]'
	$(BIN)/python -m tests.bench.run

lock: ## renew deploy/constraints.txt: the newest versions pyproject.toml allows (then make test)
	rm -rf .cache/lock-venv
	$(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install --quiet --upgrade pip
	.cache/lock-venv/bin/python -m pip install --quiet '.[dev,bench]'
	{ sed -n '/^#/p' $(CONSTRAINTS); .cache/lock-venv/bin/python -m pip freeze --exclude-editable | \
	  grep -v '^geins-kafka-bridge'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .cache/lock-venv build  # build/: what pip built the wheel in

clean: ## remove the venv and caches (keeps the Kafka jars)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
