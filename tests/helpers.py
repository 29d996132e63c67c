"""Helpers shared by the tests: files written in one call, generated corpora, in-process calls
of a tool's main(), the one-line error check and the bit-for-bit comparison of checkpoints."""
import os
import random

import safetensors.numpy
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cllm_cli.tokenizers import BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train_model's options for a tiny word-level run of 4 steps on two spheres, quiet
TINY_RUN = ["--embed-dim", "16", "--num-layers", "2", "--num-heads", "2", "--seq-len", "16",
            "--batch-size", "8", "--micro-batch", "2", "--max-steps", "4", "--warmup-steps", "1",
            "--tokenizer", "word", "--vocab-size", "120", "--threads", "2", "--eval-interval", "0",
            "--quiet"]

WORDS = ("the a an old young quiet brave tired small green red cold warm river hill town "
         "village market baker miller fisher weaver smith king queen child dog cat horse "
         "bird boat road bridge house garden door window table bread apple fish stone tree "
         "walked ran saw found gave took made sang told asked carried opened closed watched "
         "slowly quickly often never always today tomorrow there here and but because while "
         "with under over near behind into from to of in on at").split()


def write(path, content):
    """Write `content` (str as UTF-8, or bytes) to `path`, creating its directory; returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def sentences(n_sentences, seed, punct, words=WORDS, max_words=11, capitalize=True):
    """Seeded random text: n_sentences lines of 4 to max_words words drawn from `words`, the
    first capitalised (unless capitalize is False), each ending in a mark drawn from `punct`."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        line = [rng.choice(words) for _ in range(rng.randint(4, max_words))]
        if capitalize:
            line[0] = line[0].capitalize()
        lines.append(" ".join(line) + rng.choice(punct))
    return "\n".join(lines) + "\n"


# the mix of sentence ends of the corpora below
CORPUS_PUNCT = (".", ".", "!", "?")
WINDOW_PUNCT = (".", ".", ".", "!", "?", ",")


def corpus_text(n_sentences, seed=11):
    """Seeded random sentences ending in ".", "!" or "?" (about 50 bytes each)."""
    return sentences(n_sentences, seed, punct=CORPUS_PUNCT)


def window_text(n_sentences, seed=7):
    """Seeded random sentences: a few KB of varied words and punctuation."""
    return sentences(n_sentences, seed, punct=WINDOW_PUNCT)


def call(capsys, main, *argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:      # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err



def checkout_env(**extra):
    """os.environ with this checkout's package first on PYTHONPATH (for processes run outside
    ROOT, which would otherwise load the package an editable install points at), and extra."""
    path = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}

def assert_one_error_line(code, err, prog, *fragments, status=2):
    """The exit status is `status` and stderr is exactly one line "<prog>: error: <message>",
    no traceback, naming every fragment. Returns the line."""
    assert code == status, f"exit status {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert len(lines[0]) > len(f"{prog}: error: ") + 10, lines[0]
    for f in fragments:
        assert str(f) in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def tensors(path):
    return safetensors.numpy.load_file(str(path))


def assert_bit_identical(path_a, path_b):
    """Two checkpoints hold the same tensors (parameters and both AdamW moments), bit for bit."""
    a, b = tensors(path_a), tensors(path_b)
    assert sorted(a) == sorted(b), f"{path_a} and {path_b} hold different tensor names"
    assert any(k.startswith("adam.m.") for k in a) and any(k.startswith("adam.v.") for k in a)
    differ = [k for k in sorted(a)
              if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"{path_b} differs from {path_a} in {len(differ)} tensors: {differ[:5]}"


def gpt2_directory(path, text, vocab_size=None, seed=0, change=None):
    """A small random GPT2LMHeadModel saved by transformers with a 300-token byte-level BPE
    tokenizer.json; vocab_size above 300 pads the embedding as real models do. change(model)
    may edit the weights before saving."""
    tok = BPETokenizer.train([text], 300)
    assert len(tok) == 300
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size or len(tok), n_positions=32, n_embd=32, n_layer=2,
                        n_head=4, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = GPT2LMHeadModel(config).eval()
    if vocab_size:
        with torch.no_grad():   # padding rows that attract the argmax, as untrained rows may
            model.transformer.wte.weight[len(tok):] *= 50
    if change is not None:
        with torch.no_grad():
            change(model)
    model.save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def finish(proc):
    """(stdout, stderr) of a started process; killed if it is still running afterwards."""
    try:
        return proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_terminal(master):
    """Everything written to a pseudo-terminal until its other end is closed (by every
    process that held it), as text."""
    shown = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:                   # the other end is closed: all read
            break
        if not chunk:
            break
        shown += chunk
    return shown.decode()
