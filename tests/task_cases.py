"""What the task-evaluation tests share: a small random transformers GPT-2 with GPT-2's own
vocabulary, task files written for it, and the reference scoring, written out again from
lm-evaluation-harness's rules with transformers and torch (the pair split, left truncation,
log softmax summed over the continuation)."""
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import WORDS
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from cllm_cli.api import CLLMModel
from cllm_cli.formats import load_model_files

N_POSITIONS = 48        # the transformers model's context: some items below are longer
EOT = 50256             # GPT-2's end of text, the harness's prefix for an empty context


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def harness_pair(encode, context, continuation, eos_id):
    """lm-evaluation-harness's split of a (context, continuation) request into ids."""
    if context == "":
        return [eos_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def reference_score(logits_of, ctx, cont, seq_len):
    """(summed log-probability, all greedy) of cont after ctx, the harness's left
    truncation: the last seq_len + 1 ids, the last one only a target."""
    ids = (ctx + cont)[-(seq_len + 1):]
    logits = np.asarray(logits_of(ids[:-1]), dtype=np.float64)[-len(cont):]
    picked = log_softmax(logits)[np.arange(len(cont)), cont]
    return float(picked.sum()), bool((logits.argmax(-1) == cont).all())


def random_gpt2(directory, gpt2_files):
    """(torch model, transformers tokenizer) of a small random GPT2LMHeadModel with GPT-2's
    own 50,257-token vocabulary, saved by transformers into `directory` with vocab.json and
    merges.txt beside it."""
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=N_POSITIONS, n_embd=32,
                                       n_layer=2, n_head=4, n_inner=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(gpt2_files / name, directory / name)
    return model, GPT2TokenizerFast.from_pretrained(gpt2_files)


def torch_logits(model):
    def logits_of(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().numpy()
    return logits_of


def words(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def hellaswag_docs(seed=3, n=12):
    """Items in HellaSwag's own jsonl form: short and long contexts (some longer than the
    model's 48 positions), 1 to 12-word endings, a context ending in a space, extra keys."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ctx = words(rng, 2, 70 if i % 3 == 0 else 15).capitalize() + ("," if i % 4 else ".")
        if i == 5:
            ctx += " "
        endings = [words(rng, 1, 12) + rng.choice([".", "!", ", 42 of them."]) for _ in range(4)]
        docs.append({"ind": i, "activity_label": "Walking", "ctx_a": ctx, "ctx_b": "",
                     "ctx": ctx, "endings": endings, "label": rng.randrange(4),
                     "split": "val"})
    return docs


def greedy_passages(model, tok, rng, wanted=3):
    """Passages whose last word is, token for token, the model's greedy continuation."""
    found = []
    for _ in range(400):
        ctx = words(rng, 3, 20)
        ids = tok.encode(ctx)
        with torch.no_grad():
            g = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        text = tok.decode([g])
        if re.fullmatch(r" [A-Za-z]{2,}", text) and tok.encode(ctx + text) == ids + [g]:
            found.append(ctx + text)
            if len(found) == wanted:
                return found
    pytest.fail("no greedy passage found: the premise of the LAMBADA acc test")


def write_task_files(directory, model, tok):
    """hellaswag.jsonl (12 items) and lambada.txt (12 passages, 3 of them greedy-correct,
    some longer than the model's context) in `directory`."""
    hs = directory / "hellaswag.jsonl"
    hs.write_text("".join(json.dumps(doc) + "\n" for doc in hellaswag_docs()), encoding="utf-8")
    rng = random.Random(9)
    passages = [words(rng, 2, 80 if i % 4 == 0 else 25) for i in range(9)]
    passages[1:1] = greedy_passages(model, tok, rng)
    lam = directory / "lambada.txt"
    lam.write_text("\n".join(passages) + "\n", encoding="utf-8")
    return hs, lam


def reference_hellaswag(hf_model, path):
    _, model, tok = hf_model
    lls, acc, acc_norm = [], 0, 0
    for doc in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
        sums = [reference_score(torch_logits(model),
                                *harness_pair(tok.encode, doc["ctx"], " " + e, EOT),
                                N_POSITIONS)[0] for e in doc["endings"]]
        lls.append(sums)
        acc += int(np.argmax(sums)) == doc["label"]
        norm = np.array(sums) / [len(e) for e in doc["endings"]]
        acc_norm += int(np.argmax(norm)) == doc["label"]
    return lls, acc, acc_norm


def reference_lambada(hf_model, path):
    _, model, tok = hf_model
    out = []
    for text in path.read_text(encoding="utf-8").splitlines():
        words_ = text.split(" ")
        out.append(reference_score(torch_logits(model),
                                   *harness_pair(tok.encode, " ".join(words_[:-1]),
                                                 " " + words_[-1], EOT), N_POSITIONS))
    return out


def load(directory):
    cfg, flat, tokenizer, meta, *_ = load_model_files(directory)
    return CLLMModel.from_flat(cfg, flat, meta), tokenizer
