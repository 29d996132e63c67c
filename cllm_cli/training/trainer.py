"""A training run's set-up and state: the Trainer.

Trainer takes the locked checkpoint directory, then either starts a new run (the corpus
tokenized into dataset.bin, a model initialised, or taken from --init-from or a
--tokenizer-file) or resumes one from its newest checkpoint (the options a resumed run may
change are applied, the others refused), and plans the run: the splits, windows and steps.
A set-up that fails leaves the directory as it was (RunDirectory.discard). It saves
checkpoints; the loop (loop.py) only calls it.

DATA of .jsonl files are records (corpus/instructions.py): each is one labelled window, the
epochs shuffle records as they shuffle windows of text, validation holds out the last
records, and the engine counts only the answers' targets. The chat template that renders
their messages (--chat-template, else the --init-from model's, else the default) is kept with
the run: chat_template.jinja in the checkpoint directory and `chat_template` in every
checkpoint's metadata, where --resume, cllm_eval and the exports take it from.

With --lora-rank the --init-from model is the frozen base and the adapters are what trains
(`trained`, with the optimiser state): checkpoints hold the adapters and name the base by
the sha256 of its parameters and by its path; --resume reads the base from there again.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from cllm_cli.api import CLLMModel
from cllm_cli.corpus import (
    collect_files,
    epoch_order,
    eval_windows,
    gather_windows,
    is_instruction_data,
    num_windows,
    prepare_dataset,
    prepare_instructions,
    split_records,
    split_stream,
    spread_windows,
)
from cllm_cli.errors import CheckpointError, ConversionError, DataError, TrainingError, UsageError
from cllm_cli.fileio import atomic_file
from cllm_cli.formats import (
    check_vocabulary,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_lora_base,
    load_model_files,
    model_source,
    prune_checkpoints,
    save_checkpoint,
)
from cllm_cli.model import (
    CLLMConfig,
    LlamaConfig,
    LoraSpec,
    content_hash,
    default_ff_dim,
    family_of,
    init_adapters,
    merge_adapters,
    parse_targets,
    shorten_positions,
)
from cllm_cli.tokenizers import BPETokenizer, Tokenizer, tokenizer_class
from cllm_cli.tokenizers.chat_template import DEFAULT_TEMPLATE, TEMPLATE_FILE, ChatTemplate
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.engine_settings import EngineSettings
from cllm_cli.training.rundir import RunDirectory, remove_leftovers, run_file


@dataclass
class Pretrained:
    """What --init-from starts from."""
    config: CLLMConfig
    flat: NDArray[np.float32]
    tokenizer: Tokenizer


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint, restored by --resume."""
    step: int = 0              # optimiser steps attempted (the next step's index)
    epoch: int = 0
    batch_in_epoch: int = 0    # global batches of this epoch already used
    adam_t: int = 0            # AdamW updates applied (bias correction)
    bad_steps: int = 0         # consecutive skipped steps


class Trainer:
    """One training run's set-up and state: the locked checkpoint directory, the tokenizer and
    token stream, the model and its AdamW state, the position in the data. `given` names the
    options the user set explicitly (--resume applies or refuses them)."""

    layout: str | None = None              # "K ranks x N sphere(s) (...)" on many processes
    lora: LoraSpec | None = None           # the adapters' LoraSpec, when adapters train
    adapters: NDArray[np.float32] | None = None    # their flat buffer
    base: dict[str, str] | None = None     # the lora metadata naming the base (base_sha256, base_path)
    init_path: str = ""                    # the local path of --init-from (a Hub name's cache)
    previous: Sequence[str | Path] = ()    # an earlier run's model files --overwrite deletes
    instruct = False                       # DATA are .jsonl records (labelled windows)
    chat_template: str | None = None       # the Jinja text the run renders messages with
    # on many processes: this rank's share of AdamW's state (adam_m, adam_v are its m and v),
    # through which save() reads the whole of them (distributed.MomentShares)
    moments: Any = None

    def __init__(self, data_paths: str | os.PathLike | Iterable[str | os.PathLike], cfg: TrainConfig,
                 given: Iterable[str] = ()) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ckpt_dir = os.path.abspath(cfg.checkpoint_dir)
        self.state = TrainState()
        self.changed: list[str] = []          # options a resumed run changed: "--name old -> new"
        self.resumed_from: str | os.PathLike | None = None
        files = collect_files(data_paths, cfg.glob, exclude_dir=self.ckpt_dir)
        for path in files:
            name = run_file(path, self.ckpt_dir)
            if name:
                raise UsageError(f"DATA {path} is {name}, a file the run writes in its "
                                 f"--checkpoint-dir {self.ckpt_dir}; move the text elsewhere "
                                 f"or choose another --checkpoint-dir")
        self.instruct = is_instruction_data(files)
        if cfg.chat_template and not self.instruct:
            raise UsageError("--chat-template renders the messages of .jsonl DATA; these DATA "
                             "are plain text")
        self.run_dir = RunDirectory(self.ckpt_dir)
        try:
            self.leftovers = remove_leftovers(self.ckpt_dir)
            tokens = self._start_or_resume(files, set(given))
            self.plan(tokens)
            self._remove_previous_run()
            self.run_dir.drop_set_aside()
        except BaseException:
            self.run_dir.discard()       # a run that never started leaves the directory as it was
            raise
        self.engine_settings = EngineSettings.of_run(self.cfg, self.tokenizer.pad_id,
                                                     labelled=self.instruct)

    def plan(self, tokens: np.ndarray) -> None:
        """The splits, windows and run length, from the token stream and the settings."""
        cfg = self.cfg
        self.mcfg = self.model.config
        T = self.mcfg.seq_len
        if self.instruct:
            self.plan_records(tokens)
            return
        self.train_tokens, self.val_tokens = split_stream(tokens, cfg.val_fraction)
        self.n_windows = num_windows(len(self.train_tokens), T)
        if self.n_windows == 0:
            raise DataError(f"corpus too short: {len(self.train_tokens)} training tokens, "
                            f"a window needs {T + 1} (lower --seq-len or add text)")
        self._plan_length()
        self.val = eval_windows(self.val_tokens, T)
        every = cfg.eval_interval * cfg.batch_size * T // 4
        self.val_periodic = spread_windows(self.val, every if cfg.eval_tokens is None
                                           else cfg.eval_tokens)
        self.val_final = spread_windows(self.val, cfg.final_eval_tokens)
        self._order: tuple[int | None, Any] = (None, None)     # (epoch, its window order)

    def _plan_length(self) -> None:
        """Steps per epoch and of the run, of n_windows training windows; a checkpoint past
        the run's end is refused."""
        cfg = self.cfg
        self.steps_per_epoch = math.ceil(self.n_windows / cfg.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if self.state.step > self.total_steps:
            raise UsageError(f"the checkpoint is at step {self.state.step}, past the "
                             f"{self.total_steps} steps of the run as given (--max-steps, "
                             f"--epochs); give more steps, or start a new run")

    def plan_records(self, windows: NDArray[np.int32]) -> None:
        """plan() for labelled windows, one per record: the last records are held out."""
        cfg, T = self.cfg, self.mcfg.seq_len
        self.train_windows, self.val = split_records(windows, cfg.val_fraction)
        # the ids of each split, for the header's counts (<unk> share)
        self.train_tokens = self.train_windows[:, :T + 1].reshape(-1)
        self.val_tokens = self.val[:, :T + 1].reshape(-1)
        self.n_windows = len(self.train_windows)
        self._plan_length()
        every = cfg.eval_interval * cfg.batch_size * T // 4
        self.val_periodic = spread_windows(self.val, every if cfg.eval_tokens is None
                                           else cfg.eval_tokens, T)
        self.val_final = spread_windows(self.val, cfg.final_eval_tokens, T)
        self._order = (None, None)

    def _prepare(self, files: list[Path], tokenizer: Tokenizer | None) -> np.ndarray:
        """The data step: text into dataset.bin (a token stream), or records into labelled
        windows; sets tokenizer and data_info and returns the stream or the windows."""
        cfg = self.cfg
        if not self.instruct:
            self.tokenizer, tokens, self.data_info = prepare_dataset(
                files, self.ckpt_dir, cfg.tokenizer, cfg.vocab_size, cfg.encoding_errors,
                tokenizer=tokenizer)
            return tokens
        if self.chat_template is None:
            self.chat_template = self._find_template()
        self.tokenizer, instructions, self.data_info = prepare_instructions(
            files, self.ckpt_dir, cfg.tokenizer, cfg.vocab_size, cfg.seq_len,
            tokenizer=tokenizer, template_text=self.chat_template)
        with atomic_file(os.path.join(self.ckpt_dir, TEMPLATE_FILE), DataError) as f:
            f.write(self.chat_template.encode("utf-8"))
        return instructions.windows

    def _find_template(self) -> str:
        """The Jinja text of --chat-template, else of the --init-from directory, else the
        default's."""
        if self.cfg.chat_template:
            return ChatTemplate.of(self.cfg.chat_template).source
        if self.init_path and os.path.isdir(self.init_path):
            found = ChatTemplate.find(self.init_path)
            if found is not None:
                return found[0]
        return DEFAULT_TEMPLATE

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Releases the checkpoint directory."""
        self.run_dir.close()

    def _start_or_resume(self, files: list[Path], given: set[str]) -> np.ndarray:
        cfg = self.cfg
        resume_from = self._newest_state() if cfg.resume else None
        if cfg.resume is True and resume_from is None:
            raise UsageError(f"--resume: no checkpoint_step_<N>.cllm or final_model.cllm in "
                             f"{self.ckpt_dir}")
        if resume_from is not None:
            return self._restore(resume_from, files, given)
        cfg.validate(resuming=False)
        if cfg.init_from:
            self.init_path = model_source(cfg.init_from, cfg.revision)
        elif cfg.revision:
            raise UsageError("--revision needs --init-from with a Hugging Face Hub name")
        self.previous = self._previous_run()
        if self.previous:        # removed once the set-up succeeded; until then restorable
            self.run_dir.set_aside()
        tokenizer: Tokenizer | None = None
        start: Pretrained | None = None
        if cfg.init_from:
            start = self._pretrained(given)
            tokenizer = start.tokenizer
        elif cfg.tokenizer_file:
            tokenizer = self._tokenizer_file(given)
        tokens = self._prepare(files, tokenizer)
        if start is None:
            self.model = CLLMModel(cfg.model_config(len(self.tokenizer)), cfg.seed)
        else:
            self.model = CLLMModel.from_flat(start.config, start.flat)
        self.lora = cfg.lora_spec(family_of(self.model.config))
        if self.lora is not None:
            self.adapters = init_adapters(self.model.config, self.lora, cfg.seed)
            self.base = {"base_sha256": content_hash(self.model.flat),
                         "base_path": os.path.abspath(self.init_path)}
        self.adam_m = np.zeros_like(self.trained)
        self.adam_v = np.zeros_like(self.trained)
        return tokens

    @property
    def trained(self) -> NDArray[np.float32]:
        """The buffer the optimiser updates: the adapters, or every parameter."""
        return self.adapters if self.lora is not None else self.model.flat

    def tuned_model(self) -> CLLMModel:
        """The model as trained so far: with the adapters merged in, when they train."""
        if self.lora is None:
            return self.model
        return CLLMModel.from_flat(self.mcfg, merge_adapters(self.mcfg, self.model.flat,
                                                             self.lora, self.adapters))

    def lora_metadata(self) -> dict[str, Any] | None:
        return None if self.lora is None else {**self.lora.to_dict(), **self.base}  # type: ignore[dict-item]

    def _take(self, name: str, value: object, given: Container[str], source: str) -> None:
        """Sets option `name` to what `source` prescribes; refuses a different value given."""
        mine = getattr(self.cfg, name)
        if name == "ff_dim" and mine == 0:
            mine = default_ff_dim(self.cfg.arch, self.cfg.embed_dim)
        if name in given and mine != value:
            raise UsageError(f"--{name.replace('_', '-')} {mine} differs from {source}'s {value}"
                             f"; leave it out to take it from there")
        setattr(self.cfg, name, value)

    def _tokenizer_file(self, given: Container[str]) -> BPETokenizer:
        """The tokenizer of --tokenizer-file (a tokenizer.json, or GPT-2's vocab.json + merges.txt
        given as the vocab.json or their directory); the run takes its kind and size."""
        cfg, source = self.cfg, f"--tokenizer-file {self.cfg.tokenizer_file}"
        if "tokenizer" in given and cfg.tokenizer != "bpe":
            raise UsageError(f"--tokenizer {cfg.tokenizer} cannot read {source} (a tokenizer.json "
                             f"is --tokenizer bpe)")
        BPETokenizer.check_files(cfg.tokenizer_file, "--tokenizer-file")
        tokenizer = BPETokenizer.read(cfg.tokenizer_file)
        self._take("tokenizer", "bpe", given, source)
        self._take("vocab_size", len(tokenizer), given, source)
        return tokenizer

    def _pretrained(self, given: Container[str]) -> Pretrained:
        """The model and tokenizer of --init-from; the run takes their shape and kind. A
        smaller --seq-len keeps the first rows of the position table."""
        cfg, source = self.cfg, f"--init-from {self.cfg.init_from}"
        try:        # the base of adapters is a full model: a LoRA checkpoint is refused
            start = load_model_files(self.init_path, full=bool(cfg.lora_rank))
        except ConversionError as e:
            raise DataError(f"--init-from: {e}") from None
        mcfg, flat, tokenizer = start.config, start.flat, start.tokenizer
        if "seq_len" in given and cfg.seq_len < mcfg.seq_len:
            mcfg, flat = shorten_positions(mcfg, flat, cfg.seq_len)
        self._take("arch", mcfg.family, given, source)
        llama_only = cfg.llama_options_given()
        if not isinstance(mcfg, LlamaConfig) and llama_only:
            raise UsageError(f"{llama_only[0]} needs a Llama-form model; "
                             f"{source} is {mcfg.family}")
        for name in ("embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len", "vocab_size"):
            self._take(name, getattr(mcfg, name), given, source)
        if isinstance(mcfg, LlamaConfig):
            self._take("num_kv_heads", mcfg.num_kv_heads, given, source)
            self._take("rope_theta", mcfg.rope_theta, given, source)
            self._take("tie_embeddings", mcfg.tie_embeddings, given, source)
        self._take("tokenizer", tokenizer.kind, given, source)
        cfg.validate(resuming=False)
        return Pretrained(mcfg, flat, tokenizer)

    def _newest_state(self) -> Path | None:
        """The checkpoint --resume continues from: the newest step checkpoint, else
        final_model.cllm (it holds the whole state of the last step too, and is all that is
        left when the step checkpoints were deleted), else None."""
        newest = latest_checkpoint(self.ckpt_dir)
        if newest is None and os.path.isfile(self.final_path):
            return Path(self.final_path)
        return newest

    def _previous_run(self) -> list[str | Path]:
        """The model files of an earlier run in the directory, which a new run must not mix
        its checkpoints with: refused, unless --overwrite (then _remove_previous_run deletes
        them once the new run is set up), and never when the --init-from model is among what
        would be deleted."""
        previous: list[str | Path] = [p for _, p in list_checkpoints(self.ckpt_dir)]
        final = os.path.join(self.ckpt_dir, "final_model.cllm")
        if os.path.exists(final):
            previous.append(final)
        if previous and self.cfg.init_from and _inside(self.init_path, self.ckpt_dir):
            raise UsageError(f"{self.ckpt_dir} holds an earlier run and the --init-from model "
                             f"{self.cfg.init_from}: starting over there would delete the "
                             f"model; use another --checkpoint-dir")
        if previous and not self.cfg.overwrite:
            raise UsageError(f"{self.ckpt_dir} holds an earlier run ({os.path.basename(previous[-1])}"
                             f"); use --resume to continue it, --overwrite to start over, or "
                             f"another --checkpoint-dir")
        return previous

    def _remove_previous_run(self) -> None:
        for path in self.previous:
            try:
                os.remove(path)
            except OSError as e:
                raise DataError(f"--overwrite: cannot remove {path}: {e.strerror or e}") from None

    def _restore(self, path: Path, files: list[Path], given: set[str]) -> np.ndarray:
        """Model, optimiser state, position and training settings from a checkpoint. Options
        given again are applied when they may change and refused when they may not."""
        ckpt = load_checkpoint(path)
        meta = ckpt.meta
        try:
            saved = dict(meta["train_config"])
            # a setting the checkpoint lacks is at its default: a feature's settings are
            # stored only when the run uses it (--arch llama, --matmul onednn, ...), and
            # checkpoints from before a feature have none of its settings
            for f in dataclasses.fields(TrainConfig):
                if not f.metadata["run"]:
                    saved.setdefault(f.name, f.default)
            state = TrainState(**meta["state"])
            vocab_hash, dataset_key = meta["vocab_hash"], meta["dataset_key"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: checkpoint lacks training state ({e})") from None
        if ckpt.adam_m is None:
            raise CheckpointError(f"{path}: checkpoint holds no optimiser state; cannot resume")
        lora = ckpt.lora
        _check_lora_kept(lora, self.cfg, given, path)
        run, fixed = TrainConfig.run_fields(), TrainConfig.fixed_fields()
        stored = dataclasses.replace(self.cfg, **{k: v for k, v in saved.items()
                                                 if hasattr(self.cfg, k) and k not in run})
        try:
            stored.validate()
        except UsageError as e:
            raise CheckpointError(f"{path}: bad training setting in the checkpoint ({e})") from None
        for name, value in saved.items():
            if not hasattr(self.cfg, name) or name in run:
                continue
            mine = getattr(self.cfg, name)
            flag = "--" + name.replace("_", "-")
            if name in given and _acting(name, mine, saved) != _acting(name, value, saved):
                if name in fixed:
                    raise UsageError(f"{flag} cannot change when resuming (the checkpoint has "
                                     f"{_shown(value)}, given {_shown(mine)}); start a new run "
                                     f"to change it")
                self.changed.append(f"{flag} {_shown(value)} -> {_shown(mine)}")
                continue
            setattr(self.cfg, name, value)
        if ("epochs" in given and "max_steps" not in given and self.cfg.max_steps
                and self.cfg.epochs != saved["epochs"]):
            raise UsageError(f"--epochs has no effect on this run: its length is --max-steps "
                             f"{self.cfg.max_steps}; give --max-steps too (0: run --epochs)")
        try:
            self.cfg.validate()
        except UsageError as e:      # an option given against one the checkpoint keeps
            raise UsageError(f"{e} (the options not given are the checkpoint's: "
                             f"{path.name})") from None
        self.state = state
        vocab_path = os.path.join(self.ckpt_dir, tokenizer_class(self.cfg.tokenizer).file_name)
        self.tokenizer = Tokenizer.load(vocab_path, self.cfg.tokenizer)
        check_vocabulary(self.tokenizer.vocab_hash, vocab_path, vocab_hash, path)
        if self.instruct:
            self.chat_template = meta.get("chat_template") or DEFAULT_TEMPLATE
        tokens = self._prepare(files, self.tokenizer)
        if self.data_info["key"] != dataset_key:
            raise DataError("the corpus differs from the one the checkpoint was trained on; "
                            "resume with the same files or start a new --checkpoint-dir")
        if (lora is None) != (self.cfg.lora_rank == 0):
            raise CheckpointError(f"{path}: its training settings and its tensors disagree on "
                                  f"LoRA adapters")
        if lora is None:
            self.model = CLLMModel.from_flat(ckpt.config, ckpt.params)
        else:
            self.model = CLLMModel.from_flat(ckpt.config,
                                             load_lora_base(lora, ckpt.config, path))
            self.lora, self.adapters = lora["spec"], ckpt.params
            self.base = {"base_sha256": lora["base_sha256"], "base_path": lora["base_path"]}
        self.adam_m, self.adam_v = ckpt.adam_m, ckpt.adam_v
        self.resumed_from = path
        return tokens

    # -- data ------------------------------------------------------------------------------
    def batch(self, epoch: int, index: int) -> NDArray[np.int32]:
        """The windows of global batch `index` of `epoch` (the order is seeded by both)."""
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.n_windows))
        ids = self._order[1][index * self.cfg.batch_size:(index + 1) * self.cfg.batch_size]
        if self.instruct:
            return np.ascontiguousarray(self.train_windows[ids])
        return gather_windows(self.train_tokens, ids, self.mcfg.seq_len)

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of the corpus per token: turns a loss per token into bits per byte.
        None for records: the loss counts the answers' tokens only, the files' bytes are JSON."""
        if self.instruct:
            return None
        return self.data_info["bytes"] / self.data_info["tokens"]

    @property
    def final_path(self) -> str:
        return os.path.join(self.ckpt_dir, "final_model.cllm")

    def meta(self) -> dict[str, Any]:
        return {"train_config": self.cfg.result_fields(), "state": dataclasses.asdict(self.state),
                "tokenizer": self.cfg.tokenizer, "vocab_hash": self.tokenizer.vocab_hash,
                "dataset_key": self.data_info["key"], "corpus_bytes": self.data_info["bytes"],
                "corpus_tokens": self.data_info["tokens"],
                "generator": {"kind": "numpy default_rng([seed, epoch]) permutation",
                              "seed": self.cfg.seed, "epoch": self.state.epoch,
                              "batch_in_epoch": self.state.batch_in_epoch},
                **({"chat_template": self.chat_template, "records": self.data_info["records"]}
                   if self.instruct else {})}

    def save(self, path: str | os.PathLike | None = None, prune: bool = True) -> str | os.PathLike:
        """Writes a checkpoint (atomically) and prunes old step checkpoints; a failure to
        write is a runtime error."""
        path = path or checkpoint_path(self.ckpt_dir, self.state.step)
        adam_m, adam_v = (self.adam_m, self.adam_v) if self.moments is None \
            else self.moments.whole()
        try:
            save_checkpoint(path, self.mcfg, self.trained, adam_m, adam_v, self.meta(),
                            lora=self.lora_metadata())
            if prune and path != self.final_path:
                prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        finally:
            if self.moments is not None:
                self.moments.done()
        return path

    def final_model_ok(self) -> bool:
        """final_model.cllm exists, loads (a kill while writing it leaves none) and holds the
        run's current state (a run extended by --resume and stopped before its end leaves the
        final model of the shorter run)."""
        try:
            final = load_checkpoint(self.final_path)
        except CheckpointError:
            return False
        return final.meta.get("state") == dataclasses.asdict(self.state)


def _inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """`path` is `directory` or lies below it (their real paths: links followed)."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _check_lora_kept(lora: Mapping[str, Any] | None, cfg: TrainConfig, given: Iterable[str],
                     path: str | os.PathLike) -> None:
    """UsageError when the options given switch LoRA adapters on for a full run's checkpoint
    (`lora` None), or off (--lora-rank 0) for a LoRA run's."""
    others = {name for name in given if name.startswith("lora_")} - {"lora_rank"}
    if lora is None and (cfg.lora_rank or others):
        raise UsageError(f"LoRA cannot be switched on when resuming: {path} is a full run's "
                         f"checkpoint; start a new run (--init-from {path} --lora-rank R) to "
                         f"train adapters on it")
    if lora is not None and "lora_rank" in given and cfg.lora_rank == 0:
        raise UsageError(f"LoRA cannot be switched off when resuming: {path} holds rank-"
                         f"{lora['spec'].rank} adapters; start a new run (--init-from {path}) "
                         f"to train every weight of the adapted model")


# settings naming a file or directory, which a resumed run may spell another way
PATH_SETTINGS = ("init_from", "tokenizer_file", "chat_template")


def _acting(name: str, value: Any, settings: Mapping[str, Any]) -> Any:
    """A setting's value as it acts, given the run's `settings`: --lora-alpha's default as 2R,
    --lora-targets as the sites it names (in any order), --ff-dim 0 as 4 x embed-dim, a file
    that exists (--init-from, --tokenizer-file, --chat-template) as its real path."""
    if name in PATH_SETTINGS and value and os.path.exists(value):
        return os.path.realpath(value)
    if name == "lora_alpha" and value is None and "lora_rank" in settings:
        return 2.0 * settings["lora_rank"]
    if name == "lora_targets":
        return parse_targets(value)
    if name == "ff_dim" and value == 0 and "embed_dim" in settings:
        return default_ff_dim(settings.get("arch", "gpt2"), settings["embed_dim"])
    return value


def _shown(value: object) -> object:
    """A setting's value as a message shows it: an unset one (None) as `the default`, an
    empty one as `none`."""
    if value is None:
        return "the default"
    return "none" if value == "" else value
