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

# ThreadSanitizer over a short multi-sphere training of a TSan build kept in build/tsan
# (no suppressions are needed: the interpreter reports nothing either)
racecheck: $(DEPS)
	rm -rf build/tsan && mkdir -p build/tsan && cp -r cllm_cli build/tsan/
	rm -f build/tsan/cllm_cli/*.so
	CLLM_SANITIZE=thread $(PY) setup.py -q build_ext --build-lib build/tsan --build-temp build/tsan-tmp
	PYTHONPATH=$(CURDIR)/build/tsan LD_PRELOAD=$$(gcc -print-file-name=libtsan.so) \
	  TSAN_OPTIONS="halt_on_error=0 exitcode=66" \
	  $(PY) tools/racecheck.py --expect-engine build/tsan 2>&1 | tee build/racecheck.log
	@races=$$(grep -c "WARNING: ThreadSanitizer" build/racecheck.log); \
	  echo "racecheck: $$races ThreadSanitizer report(s) (log: build/racecheck.log)"; \
	  test $$races -eq 0

clean:
	rm -rf build dist *.egg-info cllm_cli/*.so pyx/*.c pyx/*.html man .pytest_cache checkpoints
