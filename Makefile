# The two commands of the README: `make demo` and `make test`.
# Each creates .venv (idempotently) and installs crdtswarm into it with pinned versions.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

NODE_DEPS := tests/interop/node_modules/.package-lock.json

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "crdtswarm needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crdtswarm demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The interop tests drive the real yjs / y-protocols from npm (pinned by package-lock).
$(NODE_DEPS): tests/interop/package.json tests/interop/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/interop --no-audit --no-fund --silent; \
	else echo "npm not found: the yjs interop tests will be skipped"; fi

test: lint $(NODE_DEPS)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/crdtswarm bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis tests/interop/node_modules
