# Two commands do all the set-up on a fresh machine:
#   make demo   — the main job on the built-in default (shapes data + built-in teacher, CPU)
#   make test   — the whole test suite
#   make docs   — the documentation site, built into site/ (mkdocs build --strict)
VENV ?= .venv
TORCH_PIP_ARGS ?=  # e.g. --index-url https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.milan-installed

.PHONY: install demo test lint docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/milan demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf runs site .pytest_cache .ruff_cache
