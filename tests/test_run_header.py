"""What train_model's header says about the run: a LoRA run names its rank, alpha, targets and
trained parameters; a corpus with many <unk> tokens warns; a word model exported to a
transformers directory and read back is named for what its tokenizer.json holds, and decodes
as the .cllm does."""
import json

import numpy as np
import pytest
from helpers import TINY_RUN, call, corpus_text, gpt2_directory, write
from transformers import AutoTokenizer, GPT2LMHeadModel

from cllm_cli import Tokenizer
from cllm_cli.cli.export import main as export_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.formats.model_files import load_model_files

SHORT = ["--max-steps", "1", "--warmup-steps", "0", "--eval-interval", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def text():
    return corpus_text(200, seed=4)


def test_a_lora_run_names_its_adapters_in_the_header(capsys, tmp_path, text):
    base = gpt2_directory(tmp_path / "base", text)
    corpus = write(tmp_path / "corpus.txt", text)
    code, out, err = call(capsys, train_main, corpus, "--init-from", base, "--checkpoint-dir",
                          tmp_path / "run", "--lora-rank", "4", "--lora-alpha", "8",
                          "--lora-targets", "attn,mlp", "--batch-size", "4", "--micro-batch", "2",
                          *SHORT)
    assert code == 0, err
    model = GPT2LMHeadModel.from_pretrained(base)
    d, inner, layers = model.config.n_embd, 4 * model.config.n_embd, model.config.n_layer
    # rank x (fan-in + fan-out) for c_attn (d -> 3d), mlp.c_fc (d -> 4d), mlp.c_proj (4d -> d)
    trained = layers * 4 * ((d + 3 * d) + (d + inner) + (inner + d))
    total = sum(p.numel() for p in model.parameters()) + trained
    lines = [line for line in out.splitlines() if line.startswith("lora:")]
    assert lines == [f"lora: rank 4, alpha 8, dropout 0, targets attn.c_attn, mlp.c_fc, "
                     f"mlp.c_proj; {trained:,} trained parameters of {total:,} "
                     f"({trained / total:.2%}), the base model's {total - trained:,} frozen"]


@pytest.mark.parametrize("vocab_size, warns", [(40, True), (200, False)])
def test_many_unknown_tokens_warn_once(capsys, tmp_path, text, vocab_size, warns):
    corpus = write(tmp_path / "corpus.txt", text)
    run = tmp_path / "run"
    code, out, err = call(capsys, train_main, corpus, "--checkpoint-dir", run, "--tokenizer", "word",
                          "--vocab-size", vocab_size, "--embed-dim", "16", "--num-layers", "1",
                          "--num-heads", "2", "--seq-len", "16", "--batch-size", "4", *SHORT)
    assert code == 0, err
    tok = Tokenizer.load(run / "vocab.txt", "word")
    ids = tok.encode_document(text)
    unknown = int(np.count_nonzero(ids == tok.unk_id))
    assert (unknown > 0.01 * len(ids)) == warns             # premise: which side of 1%
    lines = err.splitlines()
    if warns:
        assert lines == [f"train_model: warning: {unknown / len(ids):.1%} of the corpus's "
                         f"{len(ids):,} tokens are <unk> (not in the vocabulary of {len(tok):,}): "
                         f"the model learns little from them; raise --vocab-size, or use "
                         f"--tokenizer bpe, which has no <unk>"]
    else:
        assert lines == []
    assert not [line for line in out.splitlines() if line.startswith("lora:")]    # not LoRA


@pytest.mark.parametrize("warmup, warns", [(2, False), (3, True)])
def test_the_warm_up_warning_only_for_a_run_that_never_reaches_the_peak(capsys, tmp_path, text,
                                                                         warmup, warns):
    """The warm-up of N steps reaches the peak learning rate at its N-th step (lr x N / N), so a
    run of N steps reaches it and only a shorter run is warned about."""
    corpus = write(tmp_path / "corpus.txt", text)
    metrics = tmp_path / "m.jsonl"
    code, out, err = call(capsys, train_main, corpus, "--checkpoint-dir", tmp_path / "run",
                          "--tokenizer", "word", "--embed-dim", "16", "--num-layers", "1",
                          "--num-heads", "2", "--seq-len", "16", "--batch-size", "4",
                          "--max-steps", "2", "--warmup-steps", warmup, "--learning-rate", "0.002",
                          "--eval-interval", "0", "--threads", "1", "--metrics-file", metrics)
    assert code == 0, err
    lrs = [json.loads(line)["lr"] for line in metrics.read_text().splitlines()
           if '"lr"' in line]
    assert (lrs[-1] < 0.002) == warns                   # premise: whether the peak is reached
    assert ("never reaches its peak" in err) == warns, err


def test_an_exported_word_model_reads_back_as_what_it_is(capsys, tmp_path, text):
    # 300 more words: train_model reads a tokenizer.json of fewer than 260 ids as too small
    extra = " ".join(f"w{i}" for i in range(300)) + "\n"
    corpus = write(tmp_path / "corpus.txt", text + extra + 'he said, "the (old) well-known dog." '
                   '"yes" - and/or\n')
    run = tmp_path / "run"
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", run, *TINY_RUN,
                        "--vocab-size", "500")
    assert code == 0, err
    code, _, err = call(capsys, export_main, run, tmp_path / "hf")
    assert code == 0, err

    ours = Tokenizer.load(run / "vocab.txt", "word")
    ids = ours.encode_document(text + 'he said, "the (old) well-known dog." "yes" - and/or')
    expected = ours.decode(ids)
    assert "dog.\"" in expected and " ." not in expected        # premise: our spacing rules
    read_back = load_model_files(tmp_path / "hf").tokenizer
    assert read_back.decode(ids) == expected
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").decode(ids.tolist()) == expected

    code, out, err = call(capsys, train_main, corpus, "--init-from", tmp_path / "hf",
                          "--checkpoint-dir", tmp_path / "tuned", "--batch-size", "4", *SHORT)
    assert code == 0, err
    vocab = [line for line in out.splitlines() if line.startswith("vocab:")]
    assert len(vocab) == 1 and vocab[0].startswith(f"vocab: {len(ours):,} WordLevel "
                                                   f"(tokenizer.json) tokens |"), vocab
