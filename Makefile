# The two commands: `make run` (server on embedded defaults) and `make test`.
# Everything installs into .venv; nothing global is touched except, for the
# browser tests, Debian's chromium packages (see scripts/ensure-chromium).
# `make test` starts the machine's PostgreSQL and Redis when they are
# installed but down (see scripts/ensure-services).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint generate bench clean

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

test: $(BIN)/.installed node_modules/.installed
	scripts/ensure-services
	scripts/ensure-chromium
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server clients tests bench

generate: $(BIN)/.installed
	PYTHON=$(BIN)/python scripts/generate-protos

bench: $(BIN)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .tether
