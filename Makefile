# Everything a fresh machine needs: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint typecheck scan check check-platforms bench image image-test clean

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Security scanners in their own virtualenv, so their dependencies never meet the project's pins.
SCANNERS   := checkov==3.3.30 bandit==1.9.4
SCAN_VENV  := .tools/scan-venv
SCAN_STAMP := $(SCAN_VENV)/.installed-$(subst ==,-,$(subst $() ,_,$(SCANNERS)))

$(SCAN_STAMP):
	rm -rf $(SCAN_VENV)
	$(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet --disable-pip-version-check --no-compile $(SCANNERS)
	touch $@

# make demo MODE=custom | MODE=saas: sample usage on a fast clock, then what AWS billed;
# MODE=contract: a License Manager checkout.
MODE ?= hourly
demo: $(STAMP)
	$(BIN)/marketplace-sidecar demo --mode $(MODE)

# Parallel workers (pytest-xdist): the tests mostly wait on sockets, child processes and clocks,
# so more workers than cores pays. `make test` leaves out the slow set (chaos, fleet and soak
# scenarios; it prints how many); CI runs `make test-all` (both sets).
TEST_WORKERS ?= 4
# pytest keeps its assertion-rewritten test modules in __pycache__; with PYTHONDONTWRITEBYTECODE
# set (some shells and CI images set it) every worker rewrites every module on every run.
TEST_ENV := PYTHONDONTWRITEBYTECODE=

test: $(STAMP)
	$(TEST_ENV) $(BIN)/pytest -q -n $(TEST_WORKERS)

# One at a time: each slow scenario (several sidecars, kill -9 rounds, a one-minute soak, a
# fuzzing campaign) already loads the machine, and its deadlines assume it is not shared.
test-slow: $(STAMP)
	$(TEST_ENV) $(BIN)/pytest -q -m slow

test-all: test test-slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

scan: $(SCAN_STAMP)
	scripts/scan.sh $(SCAN_VENV)/bin

check: lint typecheck scan test-all

# Every pinned runtime dependency has a wheel for linux/amd64 and linux/arm64 (asks PyPI).
check-platforms:
	scripts/check-platforms.sh

image: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/build-image.sh

image-test: image
	$(BIN)/hadolint Dockerfile
	$(BIN)/pytest -q image_tests

# Every seller/maintainer benchmark in a quick mode, one after the other, loopback only:
# start-up and idle RSS (startup.py), the readiness gate (gate.py), API req/s and probe p99
# under load (throughput.py), the SIGTERM window (signal_window.py), fleet cold start
# (fleet.py), durable ingest (ingest.py), hourly MeterUsage of a fleet (metering_fleet.py), the
# kill -9 audit (crash_usage.py). Each prints ratios to a floor measured in the same run; see
# benchmarks/run_all.py. Not part of `make test`.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .mypy_cache .ruff_cache
