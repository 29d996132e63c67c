"""llama.cpp's side of the benchmarks that compare against it (benchmarks.generate,
benchmarks.llama): our model exported to GGUF, and llama-bench on that file.

The bin directory of a llama.cpp build is passed as --llama-cpp DIR; `tools/llama_cpp_check.py`
builds one (with llama-bench and llama-finetune) from the llama-cpp-python sdist.
"""
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_TEXT_CHARS = 4_000_000


def export_gguf(cfg, flat, path):
    """Writes the model (cfg, flat weights) to the GGUF file `path`, with a byte-level BPE
    tokenizer of the model's vocabulary size learned from data/corpus.txt (llama.cpp needs one;
    speed does not depend on it)."""
    from cllm_cli.formats.gguf_export import write_gguf
    from cllm_cli.tokenizers import BPETokenizer
    text = (ROOT / "data" / "corpus.txt").read_text(encoding="utf-8")
    tokenizer = BPETokenizer.train([text[:TOKENIZER_TEXT_CHARS]], cfg.vocab_size)
    write_gguf(cfg, flat, tokenizer, path)
    return path


def llama_bench(bins, gguf, threads, repeats=3):
    """llama-bench -p 512 -n 128 on `gguf` at `threads`: {"pp512": tok/s, "tg128": tok/s}
    (its averages over `repeats` runs), or {"error": its last line}."""
    done = subprocess.run([str(Path(bins) / "llama-bench"), "-m", str(gguf), "-p", "512",
                           "-n", "128", "-t", str(threads), "-r", str(repeats), "-o", "json"],
                          capture_output=True, text=True, errors="replace")
    if done.returncode != 0 or "[" not in done.stdout:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    out = {}
    for row in json.loads(done.stdout[done.stdout.index("["):]):
        out["pp512" if row.get("n_prompt") == 512 else "tg128"] = row["avg_ts"]
    return out
