# Two entry points that work on a fresh machine with Python 3.10+ and make:
#   make demo   -- runs the main job on an embedded default (no download)
#   make test   -- runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo showcase test gpu-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/showcase.py

showcase: $(STAMP)
	$(PY) tools/showcase.py

test: $(STAMP)
	$(PY) -m ruff check visionattn tools tests
	$(PY) tools/check_file_length.py
	$(PY) -m pytest -n $${PYTEST_WORKERS:-auto} -m "not gpu and not slow" tests

gpu-test: $(STAMP)
	$(PY) -m pytest -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache
