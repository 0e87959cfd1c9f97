# The two commands: `make run` (server on embedded defaults) and `make test`.
# Everything installs into .venv; nothing global is touched except, for the
# browser tests, Debian's chromium packages (see scripts/ensure-chromium).
# `make test` starts the machine's PostgreSQL, Redis and a local Redis
# Cluster when they are installed but down (see scripts/ensure-services).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test fuzz lint generate bench compiled wheel clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# buf, and FingerprintJS whose vendored copy a test checks; pinned by package-lock.json.
# (`npm ci` trips over buf's per-platform optional packages.)
node_modules/.installed: package.json package-lock.json
	npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

run: $(BIN)/.installed
	$(BIN)/tether-server serve

# The whole suite, then the guard's tests again on the compiled identity core
# that `make bench` measures and production can run (`make compiled`): the
# same code must decide the same.
test: $(BIN)/.installed node_modules/.installed
	scripts/ensure-services
	scripts/ensure-chromium
	$(BIN)/pytest
	$(BIN)/python scripts/build-compiled
	PYTHONPATH=build/compiled $(BIN)/pytest -q -p no:cacheprovider tests/test_guard_*.py

# Tether with the guard's identity core compiled by mypyc, in build/compiled
# (run from it with PYTHONPATH=build/compiled; see docs/guard.md).
compiled: $(BIN)/.installed
	$(BIN)/python scripts/build-compiled

# A wheel for production, its guard identity core compiled (hatch_build.py),
# in dist/.
wheel: $(BIN)/.installed
	HATCH_BUILD_HOOK_ENABLE_CUSTOM=true $(BIN)/pip wheel --no-deps --wheel-dir dist .

# A long fuzz of every RPC, 100,000 requests by default (`make test` runs a
# short one): no INTERNAL or UNKNOWN, refusals write nothing. Figures in
# .tether/fuzz-figures.txt.
FUZZ_REQUESTS ?= 100000
fuzz: $(BIN)/.installed
	mkdir -p .tether
	TETHER_FUZZ_REQUESTS=$(FUZZ_REQUESTS) TETHER_FUZZ_BATCH=8 TETHER_FUZZ_CHECK_WRITES_EVERY=10 \
	TETHER_FUZZ_FIGURES=.tether/fuzz-figures.txt \
		$(BIN)/pytest tests/test_fuzz.py -q --timeout=0 -p no:cacheprovider
	cat .tether/fuzz-figures.txt

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server clients tests bench

generate: $(BIN)/.installed
	PYTHON=$(BIN)/python scripts/generate-protos

bench: compiled
	TETHER_BENCH_COMPILED=build/compiled $(BIN)/python -m bench --report docs/bench-report.md

clean:
	rm -rf $(VENV) .tether build dist
