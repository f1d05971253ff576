PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-dev test lint chat binary bench

install:
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q -e '.[export,dev]'

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install-dev lint
	$(PYTHON) -m pytest -q

chat: install-dev
	moechat --yes
