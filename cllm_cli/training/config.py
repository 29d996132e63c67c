"""train_model's options, declared once: TrainConfig's fields carry their group, help text,
choices and range, and both the argparse parser and TrainConfig.validate are derived from them.

Fields marked `run` are settings of one invocation (threads, logging, saving); the others shape
the result and are stored in checkpoints, from where --resume takes them. Of those, the ones
marked `fixed` (model shape, tokenizer, corpus, batch layout, seed) cannot change on --resume;
the rest (run length, learning-rate schedule, clipping, decay) may be given again and then
replace the stored value.
"""
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, cast

from cllm_cli.corpus.files import ENCODING_ERRORS
from cllm_cli.errors import UsageError
from cllm_cli.model import (
    FAMILIES,
    MAX_LORA_SCALE,
    MODEL_FIELDS,
    CLLMConfig,
    Family,
    LlamaConfig,
    LoraSpec,
    llama_config_problem,
    model_config_problem,
    parse_targets,
    target_groups,
)
from cllm_cli.threads import MAX_THREADS
from cllm_cli.tokenizers import TOKENIZER_KINDS, BPETokenizer

INT_MAX = 2**31 - 1
MAX_LEARNING_RATE = 100.0    # far above any that trains, far below one that overflows at once
ARCHITECTURES = ("gpt2", "llama")
# options of the Llama form alone: stored with a llama run only, so that a GPT-2 run's
# checkpoint is what it was before families
LLAMA_OPTIONS = ("arch", "num_kv_heads", "rope_theta", "tie_embeddings")
GROUPS = ("data", "model", "fine-tuning", "optimisation", "threads", "checkpoints", "output")


def option(default: Any, group: str, help: Optional[str] = None, *,
           choices: Optional[Sequence[Any]] = None, minimum: Optional[float] = None,
           maximum: Optional[float] = None, run: bool = False, fixed: bool = False,
           metavar: Optional[str] = None) -> Any:
    """A TrainConfig field with what argparse and validate() need to know about it."""
    assert group in GROUPS, group
    return field(default=default, metadata=dict(group=group, help=help, choices=choices,
                                                minimum=minimum, maximum=maximum, run=run, fixed=fixed,
                                                metavar=metavar))


@dataclass
class TrainConfig:
    """Every option of train_model, in the order --help lists them."""
    # data
    tokenizer: str = option("bpe", "data", "how text becomes ids: word (lower-cased words and "
                            "punctuation marks), char (characters) or bpe (byte-level BPE "
                            "learned from the corpus)", choices=TOKENIZER_KINDS, fixed=True)
    tokenizer_file: str = option("", "data", "use this tokenizer.json (GPT-2's, or another "
                                 "BPE one the tokenizers library reads), or GPT-2's vocab.json with "
                                 "merges.txt next to it (or their directory), instead of "
                                 "training one; "
                                 "implies --tokenizer bpe and the file's vocabulary size "
                                 "(default: none: learn one from the corpus)",
                                 fixed=True, metavar="PATH")
    vocab_size: int = option(10000, "data", "largest vocabulary, the 4 special ids included; "
                             f"for bpe {BPETokenizer.min_vocab_size} to {BPETokenizer.max_vocab_size:,} (the "
                             "tokenizers "
                             "library reserves memory in proportion to it and aborts when "
                             "that fails)",
                             minimum=5, fixed=True)
    glob: str = option("*.txt", "data", "file pattern inside directories", fixed=True)
    encoding_errors: str = option("strict", "data", "refuse non-UTF-8 or binary files, or replace "
                                  "bad bytes with U+FFFD", choices=ENCODING_ERRORS, fixed=True)
    chat_template: str = option("", "data", "Jinja chat template (a .jinja file, or a "
                                "tokenizer_config.json) that renders the {\"messages\": ...} "
                                "records of .jsonl DATA (default: the --init-from model's "
                                "chat_template, else ChatML); stored with the run",
                                fixed=True, metavar="FILE")
    val_fraction: float = option(0.05, "data", "share of the token stream (of .jsonl DATA: of "
                                 "the records, whole) held out for validation", fixed=True)
    # model
    init_from: str = option("", "model", "start from a Hugging Face directory of a GPT-2, Llama, "
                            "Qwen2 or Mistral model (config.json, model.safetensors, "
                            "tokenizer.json or vocab.json + merges.txt), a model on the Hugging "
                            "Face Hub by name (gpt2, ORG/NAME: the `hub` extra, its cache and "
                            "HF_HUB_OFFLINE) or a .cllm file: its family, weights, shape and "
                            "tokenizer are taken, the optimiser starts afresh; a smaller "
                            "--seq-len shortens the context (and GPT-2's position table) "
                            "(default: none: random weights)", fixed=True, metavar="DIR")
    revision: str = option("", "model", "with --init-from a Hub name: its branch, tag or commit "
                           "(default: none: the repository's main)", run=True, metavar="REV")
    arch: str = option("gpt2", "model", "the model family of a model from scratch: gpt2, or "
                       "llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention); "
                       "--init-from takes its model's", choices=ARCHITECTURES, fixed=True)
    embed_dim: int = option(256, "model", "width of the model (embedding size d); a multiple of "
                            "--num-heads", minimum=1, fixed=True)
    num_layers: int = option(6, "model", "transformer blocks", minimum=1, fixed=True)
    num_heads: int = option(8, "model", "attention heads per block", minimum=1, fixed=True)
    ff_dim: int = option(0, "model", "0 means 4 x embed-dim (gpt2), or 8/3 x embed-dim rounded "
                         "up to a multiple of 64 (llama)", minimum=0, fixed=True)
    seq_len: int = option(128, "model", "context length T", minimum=1, fixed=True)
    num_kv_heads: int = option(0, "model", "llama: key/value heads, each shared by a group of "
                               "query heads; divides --num-heads (0: --num-heads)", minimum=0,
                               fixed=True)
    rope_theta: float = option(10000.0, "model", "llama: base of the rotary positions",
                               fixed=True)
    tie_embeddings: bool = option(True, "model", "llama: the output layer is the token "
                                  "embedding (--no-tie-embeddings: a layer of its own)",
                                  fixed=True)
    # fine-tuning
    lora_rank: int = option(0, "fine-tuning", "train rank-R LoRA adapters on the --lora-targets "
                            "layers of the --init-from model, whose own weights stay frozen "
                            "(0: train every weight)", minimum=0, fixed=True, metavar="R")
    lora_alpha: float = option(None, "fine-tuning", "the adapters' scale: each adds "
                               "alpha/R x B A to its weight (default: 2R; at most 1024R)",
                               fixed=True, metavar="ALPHA")
    lora_dropout: float = option(0.0, "fine-tuning", "dropout on the adapters' inputs, in "
                                 "training only", fixed=True, metavar="P")
    lora_targets: str = option("attn", "fine-tuning", "the layers with adapters, comma-separated "
                               "groups of the model's family: " + "; ".join(
                                   f"{family.name}: " + ", ".join(
                                       f"{group} ({', '.join(layers)})" if layers != (group,)
                                       else group for group, layers in family.lora_targets.items())
                                   for family in FAMILIES.values()),
                               fixed=True, metavar=",".join(target_groups()))
    # optimisation
    optimizer: str = option("adamw", "optimisation", "adamw (with decoupled weight decay) or "
                            "plain sgd", choices=("adamw", "sgd"), fixed=True)
    learning_rate: float = option(1e-3, "optimisation", "peak learning rate (at most 100)")
    lr_schedule: str = option("cosine", "optimisation", "after the warm-up: cosine decay to "
                              "--min-lr-ratio x the peak, or constant at the peak",
                              choices=("cosine", "constant"))
    warmup_steps: int = option(20, "optimisation", "steps of linear warm-up from 0 to the peak "
                               "learning rate", minimum=0)
    min_lr_ratio: float = option(0.1, "optimisation",
                                 "final learning rate as a share of the peak (cosine)")
    weight_decay: float = option(0.01, "optimisation", "decoupled weight decay on 2-D tensors")
    grad_clip: float = option(1.0, "optimisation", "global gradient norm limit (0 disables)")
    batch_size: int = option(32, "optimisation", "windows per optimiser step", minimum=1, fixed=True)
    micro_batch: int = option(4, "optimisation", "windows per unit of sphere work", minimum=1, fixed=True)
    epochs: int = option(1, "optimisation", "passes over the training windows (unless "
                         "--max-steps says otherwise)", minimum=1)
    max_steps: int = option(0, "optimisation", "stop after this many steps (0: run --epochs)",
                            minimum=0)
    seed: int = option(1234, "optimisation", "seed of the initial weights, the order of the "
                       "windows, dropout and the samples", minimum=0, fixed=True)
    dropout: float = option(0.0, "optimisation", "dropout probability at GPT-2's sites, in "
                            "training only (0: none); may change on --resume")
    precision: str = option("fp32", "optimisation", "the inputs of every matrix product: fp32, "
                            "or bf16 rounded (fp32 sums, master weights and optimiser; needs "
                            "the bf16 extra)", choices=("fp32", "bf16"), fixed=True)
    matmul: str = option("blas", "optimisation", "the kernel of the fp32 weight products: "
                         "blas (scipy's OpenBLAS) or onednn (oneDNN's fp32 matmul; needs the "
                         "bf16 extra); each gives its own bits, the same for any --threads",
                         choices=("blas", "onednn"), fixed=True)
    max_bad_steps: int = option(3, "optimisation", "stop after this many consecutive steps "
                                "skipped for NaN/Inf", minimum=1)
    # threads
    threads: int = option(None, "threads", f"worker spheres, 1 to {MAX_THREADS} (default: all "
                          "cores)", minimum=1, maximum=MAX_THREADS, run=True)
    lock_mode: str = option("shared", "threads", "shared: passes run in parallel; exclusive: one "
                            "pass at a time (the serialised form; same results)",
                            choices=("shared", "exclusive"), run=True)
    debug_locks: bool = option(False, "threads", "abort on a lock taken out of the order "
                               "model_lock -> gradient_lock", run=True)
    # checkpoints
    checkpoint_dir: str = option("checkpoints", "checkpoints", "directory of the run: its "
                                 "checkpoints, vocabulary and dataset.bin", run=True)
    save_interval: int = option(0, "checkpoints", "save checkpoint_step_<N>.cllm every N steps "
                                "(0: only at the end)", minimum=0, run=True)
    keep_checkpoints: int = option(3, "checkpoints", "step checkpoints to keep (0 keeps all)",
                                   minimum=0, run=True)
    resume: bool = option(False, "checkpoints", "continue from the newest checkpoint in "
                          "--checkpoint-dir (the model, tokenizer and corpus come from the "
                          "checkpoint; run length and learning-rate options may be given "
                          "again); `--resume auto` starts a new run when there is none",
                          run=True, metavar="auto")
    overwrite: bool = option(False, "checkpoints", "start a new run in a --checkpoint-dir that "
                             "holds an earlier run's checkpoints (they are deleted)", run=True)
    # output
    log_interval: int = option(10, "output", "steps between log lines", minimum=0, run=True)
    eval_interval: int = option(100, "output", "steps between validation runs (0: only at the "
                                "end)", minimum=0, run=True)
    eval_tokens: int = option(None, "output", "validation tokens per periodic evaluation, an "
                              "evenly spread fixed subset of the windows (default: a quarter of "
                              "the tokens trained between two evaluations, so that evaluating "
                              "costs under a tenth of the run; 0: all)", minimum=0, run=True)
    final_eval_tokens: int = option(1_000_000, "output", "validation tokens of the final "
                                    "evaluation, an evenly spread fixed subset of the windows, "
                                    "as nanoGPT evaluates a fixed number of batches (0: all)",
                                    minimum=0, run=True)
    metrics_file: str = option("", "output", "write one JSON object per step and per evaluation "
                               "to this file (default: none)", run=True)
    tensorboard: str = option("", "output", "also write what the metrics file holds (losses, "
                              "bits per byte, learning rate, gradient norm, tokens/s), and the "
                              "samples as text, as TensorBoard event files in DIR, the global "
                              "step as their step (needs the tensorboard extra: tensorboardX) "
                              "(default: none)",
                              run=True, metavar="DIR")
    sample_every: int = option(0, "output", "print a sample every N steps (0: never)", minimum=0,
                               run=True)
    prompt: str = option("", "output", "start of the samples (default: empty: the start of a "
                         "new document)", run=True)
    sample_tokens: int = option(30, "output", "tokens per sample (--sample-every)", minimum=1,
                                run=True)
    quiet: bool = option(False, "output", "print only errors and the summary", run=True)
    plot: str = option("", "output", "after training, draw training and validation loss into "
                       "this PNG (needs matplotlib; uses --metrics-file, by default "
                       "CHECKPOINT_DIR/metrics.jsonl) (default: none)", run=True, metavar="PNG")

    @classmethod
    def run_fields(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["run"])

    @classmethod
    def fixed_fields(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["fixed"])

    def result_fields(self) -> Dict[str, Any]:
        """The fields that shape the result: stored in checkpoints. The settings of a later
        feature are stored only when it is used (the LoRA settings when adapters train, the
        Llama form's with --arch llama, --chat-template when given, --matmul other than blas),
        so that a checkpoint of a run without them is what it was before them."""
        run = self.run_fields()
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in run and (self.lora_rank or not k.startswith("lora_"))
                and (self.arch == "llama" or k not in LLAMA_OPTIONS)
                and (self.chat_template or k != "chat_template")
                and (self.matmul != "blas" or k != "matmul")}

    def model_config(self, vocab_size: int) -> CLLMConfig:
        """The config of a model from scratch of these options."""
        sizes: Dict[str, Any] = dict(vocab_size=vocab_size, embed_dim=self.embed_dim,
                                     num_layers=self.num_layers, num_heads=self.num_heads,
                                     ff_dim=self.ff_dim, seq_len=self.seq_len)
        if self.arch == "llama":
            return LlamaConfig(**sizes, num_kv_heads=self.num_kv_heads,
                               rope_theta=self.rope_theta, tie_embeddings=self.tie_embeddings)
        return CLLMConfig(**sizes)

    def validate(self, resuming: Optional[bool] = None) -> None:
        """Raises UsageError naming the first bad option; clamps micro_batch to batch_size.
        resuming: whether the run continues a checkpoint, which supplies the options it does
        not restate (None: not known yet; it may when --resume is given)."""
        for f in dataclasses.fields(self):
            value, option_flag, meta = getattr(self, f.name), flag(f.name), f.metadata
            if value is None and f.default in (None, ""):
                setattr(self, f.name, f.default)     # None: the option's "none"
                continue
            kind = cast(type, f.type)       # every field's type is a plain class
            if f.name != "resume" and not of_type(value, kind):    # train()'s keywords
                raise UsageError(f"{option_flag} must be {TYPE_NAMES[kind]}, got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UsageError(f"{option_flag} must be one of {', '.join(meta['choices'])}")
            if f.type is int:
                if meta["minimum"] is not None and value < meta["minimum"]:
                    raise UsageError(f"{option_flag} must be at least {meta['minimum']}, got {value}")
                if meta["maximum"] is not None and value > meta["maximum"]:
                    raise UsageError(f"{option_flag} must be at most {meta['maximum']}, got {value}")
                if value > INT_MAX:
                    raise UsageError(f"{option_flag} is too large: {value}")
        if self.resume not in (False, True, "auto"):
            raise UsageError(f"--resume takes no value or 'auto', got {self.resume!r}")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --checkpoint-dir and --overwrite "
                             "deletes it: give one of them")
        if self.micro_batch > self.batch_size:
            self.micro_batch = self.batch_size      # a micro-batch never exceeds the batch
        # the model sizes given (ff_dim 0 stands for 4 x embed-dim), in the model's own check
        problem = model_config_problem({k: getattr(self, k) for k in MODEL_FIELDS
                                        if getattr(self, k)}, name=flag)
        if problem:
            raise UsageError(problem)
        self._validate_architecture()
        if not self.ff_dim and 4 * self.embed_dim >= INT_MAX:
            raise UsageError(f"--embed-dim {self.embed_dim} is too large for the default --ff-dim "
                             f"(4 x embed-dim must be below 2**31)")
        if self.batch_size * (self.seq_len + 1) > INT_MAX:
            raise UsageError(f"--batch-size {self.batch_size} of --seq-len {self.seq_len} windows "
                             f"is too large: a batch must hold fewer than 2**31 tokens")
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise UsageError(f"--learning-rate must be a positive number of at most "
                             f"{MAX_LEARNING_RATE:g}, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.weight_decay < 1 / self.learning_rate):
            raise UsageError(f"--weight-decay must be in [0, 1/lr), got {self.weight_decay}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise UsageError(f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.tokenizer_file and self.init_from:
            raise UsageError("--tokenizer-file and --init-from cannot be combined (--init-from "
                             "takes the model's own tokenizer)")
        if self.tokenizer == "bpe" and not (self.tokenizer_file or self.init_from):
            if self.vocab_size > BPETokenizer.max_vocab_size:
                raise UsageError(f"--vocab-size must be at most "
                                 f"{BPETokenizer.max_vocab_size:,} for --tokenizer bpe (the "
                                 f"tokenizers library reserves memory in proportion to it), "
                                 f"got {self.vocab_size:,}")
            if self.vocab_size < BPETokenizer.min_vocab_size:
                raise UsageError(f"--vocab-size must be at least {BPETokenizer.min_vocab_size} "
                                 f"for --tokenizer bpe (4 special ids + 256 bytes), got "
                                 f"{self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self._validate_lora(bool(self.resume) if resuming is None else resuming)

    def llama_options_given(self) -> list[str]:
        """The flags of the Llama form's own options set to other than their defaults."""
        return [flag(name) for name in LLAMA_OPTIONS[1:]
                if getattr(self, name) != TrainConfig.__dataclass_fields__[name].default]

    def _validate_architecture(self) -> None:
        """The Llama form's options: given only with --arch llama, and a model they can make."""
        if self.arch != "llama":
            given = self.llama_options_given()
            if given and not self.init_from:
                raise UsageError(f"{given[0]} needs --arch llama")
            return
        problem = llama_config_problem(
            {"num_heads": self.num_heads, "embed_dim": self.embed_dim,
             "num_kv_heads": self.num_kv_heads or self.num_heads, "rope_theta": self.rope_theta},
            name=flag)
        if problem:
            raise UsageError(problem)

    def _validate_lora(self, resuming):
        """The LoRA options; a resumed run takes its rank, and the base, from the checkpoint."""
        if self.lora_alpha is not None and not (self.lora_alpha > 0
                                                and math.isfinite(self.lora_alpha)):
            raise UsageError(f"--lora-alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            parse_targets(self.lora_targets)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e}") from None
        if not self.lora_rank:
            given = [flag(name) for name, unset in (("lora_alpha", None), ("lora_dropout", 0.0),
                                                    ("lora_targets", "attn"))
                     if getattr(self, name) != unset]
            if given and not resuming:
                raise UsageError(f"{given[0]} needs --lora-rank")
            return
        if not self.init_from and not resuming:
            raise UsageError("--lora-rank needs --init-from: adapters fine-tune a trained model")
        if self.lora_rank >= 2**16:
            raise UsageError(f"--lora-rank must be below 65536, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha > MAX_LORA_SCALE * self.lora_rank:
            raise UsageError(f"--lora-alpha must be at most {MAX_LORA_SCALE:g} x --lora-rank "
                             f"(a scale alpha/R of at most {MAX_LORA_SCALE:g}), got "
                             f"{self.lora_alpha:g}")

    def lora_spec(self, family: Family) -> Optional[LoraSpec]:
        """The adapters' LoraSpec in a model of `family`, or None when every weight trains
        (UsageError when --lora-targets names a group the family does not have)."""
        if not self.lora_rank:
            return None
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)
        try:
            sites = parse_targets(self.lora_targets, family)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e} in a {family.name} model") from None
        return LoraSpec(self.lora_rank, alpha, float(self.lora_dropout), sites)


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def of_type(value: Any, kind: type) -> bool:
    """Whether `value` is a value of a field of type `kind`: a numpy integer is an integer too,
    a path a string, an integer a number; a bool is no number."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, os.PathLike))
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def flag(name: str) -> str:
    """The command-line option of TrainConfig field `name`."""
    return "--" + name.replace("_", "-")
