# Two entry points that work on a fresh machine with Python 3.10+ and make:
#   make demo   -- runs the main job on an embedded default (no download)
#   make test   -- runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo showcase test test-timm gpu-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf output/quickstart
	$(PY) tools/train.py -c configs/train/quickstart.yaml
	$(PY) tools/validate.py output/quickstart/mavit_digits/model_best.safetensors

showcase: $(STAMP)
	$(PY) tools/showcase.py

test: $(STAMP)
	$(PY) -m ruff check visionattn tools tests
	$(PY) tools/check_file_length.py
	$(PY) -m pytest -n $${PYTEST_WORKERS:-auto} -m "not gpu and not slow" tests

# timm's own tests/test_models.py (from the installed version's sdist) for every visionattn model name.
test-timm: $(STAMP)
	VISIONATTN_TIMM_SUITE=1 $(PY) -m pytest -n $${PYTEST_WORKERS:-2} tests/backbones/test_timm_suite.py

gpu-test: $(STAMP)
	VISIONATTN_AUTOTUNE=0 $(PY) -m pytest -m gpu -rf --durations=15 tests

clean:
	rm -rf $(VENV) .pytest_cache
