# ramdiscard: `make demo` runs the main scenario, `make test` runs every check.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FUZZ_SECONDS ?= 60

.PHONY: setup demo test lint typecheck unit bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cli,test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ramdiscard demo

lint: $(STAMP)
	$(BIN)/ruff check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/ramdiscard bench

# Each fuzz target runs for FUZZ_SECONDS; any finding stops with a non-zero status.
fuzz: $(STAMP)
	for target in $$($(BIN)/python -m ramdiscard.fuzz --list | cut -d' ' -f1); do \
		$(BIN)/python -m ramdiscard.fuzz --seconds $(FUZZ_SECONDS) --target $$target || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
