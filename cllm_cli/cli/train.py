"""train_model: the command line of training (the training itself is cllm_cli.training)."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any, Sequence

from cllm_cli.cli.common import (
    HelpFormatter,
    Parser,
    name_defaults,
    run_main,
    threads_option,
    warn_threads,
)
from cllm_cli.distributed.world import world as mpi_world
from cllm_cli.errors import AllRanksStop, Interrupted
from cllm_cli.training import TrainConfig, train
from cllm_cli.training.config import GROUPS, flag
from cllm_cli.training.loop import STATUSES, run_on_ranks


def build_parser() -> argparse.ArgumentParser:
    """train_model's argparse parser, one argument per TrainConfig field."""
    p = Parser(
        prog="train_model",
        description="Train a small causal language model (CLLM) on plain-text files, on every "
                    "CPU core. --threads changes speed, never results.",
        formatter_class=HelpFormatter)
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="text files, or directories (every file matching --glob below them)")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        kwargs: dict[str, Any] = {"default": f.default}
        if f.name == "resume":
            kwargs.update(nargs="?", const=True, type=_resume_value)
        elif f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif f.name == "threads":
            kwargs["type"] = threads_option       # the bound every tool's --threads has
        else:
            kwargs["type"] = f.type
        for key in ("choices", "metavar"):
            if meta[key] is not None:
                kwargs[key] = meta[key]
        if meta["help"] is not None:
            kwargs["help"] = meta["help"]
        groups[meta["group"]].add_argument(flag(f.name), **kwargs)
    return name_defaults(p)


def _resume_value(text: str) -> bool | str:
    if text == "yes":
        return True
    if text != "auto":
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (--resume takes no value "
                                         f"or 'auto')")
    return "auto"


def parse_args(argv: Sequence[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """(data paths, {option: value}) of the options given on the command line; the others are
    left out, so that --resume can tell what the user asked to change."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):          # `--resume` never takes the next DATA path
        if arg == "--resume":
            argv[i] = "--resume=auto" if argv[i + 1:i + 2] == ["auto"] else "--resume=yes"
            if argv[i] == "--resume=auto":
                del argv[i + 1]
            break
        if arg == "--":
            break
    data = build_parser().parse_args(argv).data     # --help and bad values end here
    given = build_parser()
    for action in given._actions:
        if action.option_strings and action.dest != "help":
            action.default = argparse.SUPPRESS
    options = vars(given.parse_args(argv))
    del options["data"]
    return data, options


def main(argv: Sequence[str] | None = None) -> int:
    data, options = parse_args(argv)
    stopped: dict[str, int] = {}

    def command() -> None:
        world = mpi_world()
        if world.rank == 0:
            warn_threads("train_model", options.get("threads"), world.local_size)
        try:
            run_on_ranks(world, lambda: train(data, world=world, **options))
        except Interrupted as e:
            stopped["status"] = e.status
            print(f"train_model: interrupted by {signal.Signals(e.signum).name}", file=sys.stderr)
        except AllRanksStop as e:
            stopped["status"] = e.status      # rank 0 said why

    status = run_main("train_model", command, STATUSES, command_line=argv is None)
    return stopped.get("status", status)


if __name__ == "__main__":
    sys.exit(main())
