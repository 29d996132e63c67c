"""cllm_plot: the loss curves of a train_model --metrics-file as a PNG."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from cllm_cli.cli.common import HelpFormatter, Parser, name_defaults, run_main
from cllm_cli.training.plot import plot_metrics

PROG = "cllm_plot"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Plot training and validation loss against steps from the metrics file "
                    "of train_model --metrics-file. Needs matplotlib (pip install matplotlib).",
        epilog="Example: cllm_plot metrics.jsonl -o loss.png",
        formatter_class=HelpFormatter)
    p.add_argument("metrics", metavar="METRICS",
                   help="JSON-lines file written by train_model --metrics-file")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", metavar="PNG", default=None,
                   help="image to write (default: METRICS with the extension .png)")
    g.add_argument("--title", default=None,
                   help="title above the plot (default: the name of METRICS)")
    return name_defaults(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.output or os.path.splitext(args.metrics)[0] + ".png"

    def command() -> None:
        plot_metrics(args.metrics, out, args.title)
        print(f"wrote {out}")

    return run_main(PROG, command, stop_without_output=True, command_line=argv is None)


if __name__ == "__main__":
    sys.exit(main())
