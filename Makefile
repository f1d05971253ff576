PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-chat install-dev test test-fast lint typecheck chat binary binary-smoke bench

install:
	$(PIP) install -q -e .

# The chat and the demo build: the runtime + the export extra (torch); no dev tools.
install-chat:
	$(PIP) install -q -e '.[export]'

install-dev:
	$(PIP) install -q -e '.[export,dev]'

lint: typecheck
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# mypy (pyproject.toml [tool.mypy]) reads the source folders under their import names
# (app/ is moechat.app, ...: pyproject's package-dir) through links in build/typecheck.
typecheck:
	@rm -rf build/typecheck && mkdir -p build/typecheck/moechat
	@for f in moechat/*.py app export runtime models; do ln -s "$$PWD/$$f" build/typecheck/moechat/; done
	$(PYTHON) -m mypy

# Everything (CI too); -rs lists each skipped test with its reason.
test: install-dev lint
	$(PYTHON) -m pytest -q -rs

# While developing: without the minutes-long and the PyPI-dependent tests.
test-fast:
	$(PYTHON) -m pytest -q -rs -m "not slow and not network"

chat: install-chat
	$(PYTHON) -m moechat --yes

# Single-file binary of the runtime and the app (no torch): dist/moechat. See docs/packaging.md.
binary: install
	PYTHON=$(PYTHON) bash packaging/build.sh

# CI: build the binary, then smoke-test it in an empty dir with a minimal environment.
binary-smoke: binary
	$(PYTHON) packaging/smoke_test.py dist/moechat
