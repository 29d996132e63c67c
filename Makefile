# make train: set up, build and train on the bundled corpus. make test: set up, build, test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
TRAIN_ARGS ?= --epochs 6 --eval-interval 100 --save-interval 200

.PHONY: build debug test train bench man racecheck clean

$(DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=64" wheel "cython>=3.0" numpy scipy "safetensors>=0.4" pytest argparse-manpage
	touch $@

build: $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

debug: $(DEPS)
	CLLM_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

test: build
	$(PY) -m pytest -q

train: build
	$(VENV)/bin/train_model data/corpus.txt --checkpoint-dir checkpoints $(TRAIN_ARGS)

clean:
	rm -rf build dist *.egg-info cllm_cli/*.so pyx/*.c pyx/*.html man .pytest_cache checkpoints
