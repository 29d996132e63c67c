"""lm-evaluation-harness's model `cllm` (cllm_cli.evaluation.harness) and `python -m
cllm_cli.lm_eval`: loglikelihood against lm-eval's own pair split with numpy log-softmax of
CLLMModel.logits, rolling log-likelihoods against windows of seq_len computed here,
generate_until against CLLMModel.generate, the same answers for 1 and 2 threads, and the
command line end to end on a local multiple-choice task, offline, against lm-eval's `hf`
model on the run's transformers export."""
import glob
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import TINY_RUN, assert_one_error_line, call, checkout_env, corpus_text
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from cllm_cli.api import load_model
from cllm_cli.cli.export import main as export_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.errors import UsageError
from cllm_cli.evaluation.harness import HarnessModel

BPE_RUN = [{"word": "bpe", "120": "300"}.get(a, a) for a in TINY_RUN]
TOLERANCE = 1e-5


# each family: GPT-2, and the Llama form (2 query heads over 1 key/value head, untied)
FAMILY_ARGS = {"gpt2": [], "llama": ["--arch", "llama", "--num-kv-heads", "1",
                                     "--no-tie-embeddings"]}


@pytest.fixture(scope="module", params=sorted(FAMILY_ARGS))
def run(request, tmp_path_factory):
    """A 4-step bpe run (seq_len 16, 300 tokens) on 200 seeded sentences, of each family."""
    d = tmp_path_factory.mktemp("lm_eval_run")
    (d / "corpus.txt").write_text(corpus_text(200), encoding="utf-8")
    assert train_main([str(d / "corpus.txt"), "--checkpoint-dir", str(d / "run"), *BPE_RUN,
                       *FAMILY_ARGS[request.param]]) == 0
    return d / "run"


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def log_softmax(logits):
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Reference(TemplateLM):
    """lm-eval's own pair split (TemplateLM.loglikelihood) over numpy log-probabilities of
    CLLMModel.logits on the last seq_len + 1 ids."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    @property
    def eot_token_id(self):
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self):
        """As lm-eval's `hf` model: the begin-of-text id (ours is the end-of-text id when the
        tokenizer has none)."""
        return int(self.tokenizer.bos_id)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return [int(i) for i in self.tokenizer.encode(string)]

    def _loglikelihood_tokens(self, requests, **kwargs):
        T = self.model.config.seq_len
        out = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(T + 1):]
            logp = log_softmax(self.model.logits(ids[:-1])[0])[-len(continuation):]
            out.append((float(logp[np.arange(len(continuation)), continuation].sum()),
                        bool((logp.argmax(-1) == continuation).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each token scored once: blocks of seq_len tokens, each with the seq_len ids that
        end just before its last token (the prefix id first)."""
        T = self.model.config.seq_len
        out = []
        for (text,) in (r.args for r in requests):
            ids = self.tok_encode(text)
            full = [self.prefix_token_id] + ids
            total = 0.0
            for start in range(0, len(ids), T):
                end = min(start + T, len(ids))
                logp = log_softmax(self.model.logits(full[max(0, end - T):end])[0])
                total += float(logp[np.arange(end - start) + logp.shape[0] - (end - start),
                                    ids[start:end]].sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


PAIRS = [("The old miller", " walked to the town"), ("The old miller", " sang"),
         ("The old miller ", "sang."), ("", "The baker"), ("A quiet river", " ran under the bridge"),
         # a context longer than seq_len (16): cut from the left
         (corpus_text(3, seed=5), " and the dog"), (corpus_text(3, seed=5), " the")]


def test_loglikelihood_equals_numpy_log_softmax_with_the_harness_split(run):
    ours = HarnessModel(str(run), threads="2").loglikelihood(
        [request("loglikelihood", *pair) for pair in PAIRS])
    model, tokenizer, _ = load_model(run)
    assert len(tokenizer.encode(PAIRS[-1][0])) > model.config.seq_len
    reference = Reference(model, tokenizer).loglikelihood(
        [request("loglikelihood", *pair) for pair in PAIRS])
    for (logp, greedy), (ref_logp, ref_greedy) in zip(ours, reference):
        assert abs(logp - ref_logp) < TOLERANCE * max(1.0, abs(ref_logp))
        assert greedy == ref_greedy


def test_a_context_of_white_space_only_is_the_start_of_a_text(run):
    """Its white space moves to the continuation, leaving no context: scored as an empty
    context (after the begin-of-text id) with that white space leading the continuation."""
    lm = HarnessModel(str(run))
    pairs = [("  ", "The baker"), ("", "  The baker"), ("\n", " sang"), ("", "\n sang")]
    got = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    assert got[0] == got[1] and got[2] == got[3]


def test_greedy_flag_is_true_for_the_greedy_continuation(run):
    model, tokenizer, _ = load_model(run)
    prompt = tokenizer.encode("The old miller")
    greedy_ids = list(model.generate(prompt, max_tokens=3, temperature=0))
    lm = HarnessModel(str(run))
    context_ids = [int(i) for i in prompt]
    (_, flag), = lm.score_pairs([(context_ids, greedy_ids)])
    (_, other), = lm.score_pairs([(context_ids, greedy_ids[:2] + [(greedy_ids[2] + 1) % 300])])
    assert flag and not other


def test_loglikelihood_rolling_scores_each_token_once_in_windows_of_seq_len(run):
    text = corpus_text(4, seed=3)
    model, tokenizer, _ = load_model(run)
    assert len(tokenizer.encode(text)) > 2 * model.config.seq_len
    requests = [request("loglikelihood_rolling", t) for t in (text, "The baker", "")]
    ours = HarnessModel(str(run)).loglikelihood_rolling(requests)
    reference = Reference(model, tokenizer).loglikelihood_rolling(requests)
    assert ours[2] == 0.0 and isinstance(ours[2], float)     # lm-eval sums floats
    assert np.allclose(ours, reference, rtol=TOLERANCE, atol=TOLERANCE)


def test_generate_until_is_greedy_generation_cut_at_the_first_stop_string(run):
    model, tokenizer, _ = load_model(run)
    context = "The old miller"
    # the context cut on the left to max_length - max_gen_toks ids, as lm-eval's hf model cuts it
    prompt = tokenizer.encode(context)[-(model.config.seq_len - 12):]
    ids = list(model.generate(prompt, max_tokens=12, temperature=0,
                              stop_ids=(tokenizer.eos_id,)))
    ids = ids[:-1] if ids[-1] == tokenizer.eos_id else ids
    full = tokenizer.decode(ids)
    stop = tokenizer.decode(ids[5:7])
    expected = full.split(stop)[0]
    assert len(expected) < len(full)
    lm = HarnessModel(str(run))
    assert lm.generate_until([
        request("generate_until", context, {"until": [stop], "max_gen_toks": 12}),
        request("generate_until", context, {"until": ["\u2603"], "max_gen_toks": 12,
                                            "do_sample": False, "temperature": 0.7}),
    ]) == [expected, full]


@pytest.mark.parametrize("value", [-1, "many"])
def test_a_task_asking_for_a_bad_number_of_tokens_is_one_error(run, value):
    with pytest.raises(UsageError, match="max_gen_toks must be a whole number of at least 0"):
        HarnessModel(str(run)).generate_until([
            request("generate_until", "The old", {"until": ["."], "max_gen_toks": value})])


def answers(lm):
    return (lm.loglikelihood([request("loglikelihood", *pair) for pair in PAIRS]),
            lm.loglikelihood_rolling([request("loglikelihood_rolling", corpus_text(4, seed=3))]),
            lm.generate_until([request("generate_until", "The old", {"until": ["."],
                                                                     "max_gen_toks": 20})]))


def test_answers_do_not_depend_on_threads(run):
    assert answers(HarnessModel(str(run), threads=1)) == answers(HarnessModel(str(run), threads=2))


# ----------------------------------------------------------------------------------------
# The command line

TASK = """task: cllm_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


ROLLING_TASK = """task: cllm_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

GENERATE_TASK = """task: cllm_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def task_dir(tmp_path):
    """A local multiple-choice task of 6 items (lm-eval's json dataset) in tmp_path/task."""
    items = tmp_path / "items.jsonl"
    with open(items, "w", encoding="utf-8") as f:
        for i in range(6):
            sentences = corpus_text(3, seed=20 + i).split("\n")
            f.write(json.dumps({"context": sentences[0],
                                "choices": [" " + " ".join(s.split()[:3]) for s in sentences[1:3]]
                                + [" the end."],
                                "label": i % 3}) + "\n")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "cllm_tiny_choice.yaml").write_text(TASK.format(items=items))
    # texts longer than the context (rolling windows), short prompts (generation within it)
    texts, prompts = tmp_path / "texts.jsonl", tmp_path / "prompts.jsonl"
    texts.write_text("".join(json.dumps({"text": corpus_text(4, seed=40 + i)}) + "\n"
                             for i in range(3)), encoding="utf-8")
    prompts.write_text("".join(json.dumps({"context": " ".join(corpus_text(1, seed=50 + i)
                                                                .split()[:3]),
                                           "answer": "x"}) + "\n" for i in range(4)),
                       encoding="utf-8")
    (tmp_path / "task" / "cllm_tiny_rolling.yaml").write_text(ROLLING_TASK.format(items=texts))
    (tmp_path / "task" / "cllm_tiny_generate.yaml").write_text(
        GENERATE_TASK.format(items=prompts))
    return tmp_path / "task"


def harness(tmp_path, *argv, module="cllm_cli.lm_eval"):
    env = checkout_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                       HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], env=env,
                          capture_output=True, text=True, cwd=tmp_path)


def samples(out_dir, task):
    """The documents' filtered responses of `task` from lm-eval's --log_samples file."""
    (path,) = glob.glob(str(out_dir / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    with open(path, encoding="utf-8") as f:
        return [s["filtered_resps"] for s in sorted((json.loads(line) for line in f),
                                                    key=lambda s: s["doc_id"])]


def sample_loglikelihoods(out_dir):
    """Each document's [log-likelihood of each choice] from lm-eval's --log_samples file."""
    return np.array([[float(r[0]) for r in resps]
                     for resps in samples(out_dir, "cllm_tiny_choice")])


def figures(out_dir, task="cllm_tiny_choice", names=("acc,none", "acc_norm,none")):
    (path,) = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    with open(path, encoding="utf-8") as f:
        result = json.load(f)["results"][task]
    return {k: result[k] for k in names}


def test_command_line_runs_a_local_task_offline(run, task_dir, tmp_path):
    proc = harness(tmp_path, "run", "--model", "cllm", "--model_args",
                   f"pretrained={run},threads=2", "--tasks", "cllm_tiny_choice",
                   "--include_path", task_dir, "--output_path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cllm_tiny_choice" in proc.stdout and "acc" in proc.stdout
    got = figures(tmp_path / "out")
    assert all(0.0 <= v <= 1.0 for v in got.values())


@pytest.mark.slow
def test_command_line_figures_equal_the_hf_model_on_the_export(run, task_dir, tmp_path, capsys):
    assert call(capsys, export_main, run, tmp_path / "hf")[0] == 0
    ours = harness(tmp_path, "run", "--model", "cllm", "--model_args", f"pretrained={run}",
                   "--tasks", "cllm_tiny_choice", "--include_path", task_dir,
                   "--output_path", tmp_path / "ours", "--log_samples")
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = harness(tmp_path, "run", "--model", "hf", "--model_args",
                     f"pretrained={tmp_path / 'hf'},dtype=float32", "--device", "cpu",
                     "--tasks", "cllm_tiny_choice", "--include_path", task_dir,
                     "--output_path", tmp_path / "theirs", "--log_samples", module="lm_eval")
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    assert figures(tmp_path / "ours") == figures(tmp_path / "theirs")
    ours, theirs = sample_loglikelihoods(tmp_path / "ours"), sample_loglikelihoods(tmp_path / "theirs")
    assert ours.shape == (6, 3) and np.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rolling_and_generated_figures_equal_the_hf_model_on_the_export(run, task_dir, tmp_path,
                                                                        capsys):
    """byte_perplexity (and word perplexity, bits per byte) of texts longer than the context,
    and the greedy strings of generate_until, from `cllm` and from lm-eval's `hf` model on
    our transformers export."""
    assert call(capsys, export_main, run, tmp_path / "hf")[0] == 0
    tasks = "cllm_tiny_rolling,cllm_tiny_generate"
    ours = harness(tmp_path, "run", "--model", "cllm", "--model_args", f"pretrained={run}",
                   "--tasks", tasks, "--include_path", task_dir, "--output_path",
                   tmp_path / "ours", "--log_samples")
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = harness(tmp_path, "run", "--model", "hf", "--model_args",
                     f"pretrained={tmp_path / 'hf'},dtype=float32", "--device", "cpu",
                     "--tasks", tasks, "--include_path", task_dir,
                     "--output_path", tmp_path / "theirs", "--log_samples", module="lm_eval")
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    rolling = ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")
    got = figures(tmp_path / "ours", "cllm_tiny_rolling", rolling)
    want = figures(tmp_path / "theirs", "cllm_tiny_rolling", rolling)
    assert got == pytest.approx(want, rel=1e-5)
    strings = samples(tmp_path / "ours", "cllm_tiny_generate")
    assert strings == samples(tmp_path / "theirs", "cllm_tiny_generate")
    assert any(s[0] for s in strings), "something was generated"


def test_command_line_without_lm_eval_says_how_to_install_it(tmp_path):
    hide = ("import runpy, sys; sys.modules['lm_eval'] = None; "
            "sys.argv = ['cllm_cli.lm_eval', 'run']; "
            "runpy.run_module('cllm_cli.lm_eval', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True)
    assert_one_error_line(proc.returncode, proc.stderr, "cllm_cli.lm_eval",
                          "pip install '.[lm-eval]'")


@pytest.mark.parametrize("model_args, fragment, task", [
    ("pretrained={missing}", "{missing}", "cllm_tiny_choice"),
    ("pretrained={run},threads=two", "threads", "cllm_tiny_choice"),
    ("pretrained={run},therads=2", "therads", "cllm_tiny_choice"),
    ("pretrained={run}", "no_such_task", "no_such_task")])
def test_a_model_that_cannot_be_read_ends_the_run_in_one_line(run, task_dir, tmp_path,
                                                              model_args, fragment, task):
    """lm-eval logs its own progress on stderr; the run ends with our one line, no traceback."""
    names = {"missing": tmp_path / "no-such-run", "run": run}
    proc = harness(tmp_path, "run", "--model", "cllm", "--model_args", model_args.format(**names),
                   "--tasks", task, "--include_path", task_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cllm_cli.lm_eval: error: ") and fragment.format(**names) in last, last
