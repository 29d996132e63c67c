"""`python -m cllm_cli.lm_eval ...`: lm-evaluation-harness's own command line (`lm-eval`) with
the model `cllm` registered (cllm_cli.evaluation.harness), e.g.

    python -m cllm_cli.lm_eval run --model cllm --model_args pretrained=RUN,threads=2 --tasks T

Importing this module registers the model when lm-eval is installed (the lm-eval extra);
without it the command says so in one line, with status 2."""
from __future__ import annotations

import sys
from typing import Sequence

from cllm_cli.cli.common import run_main
from cllm_cli.errors import MissingExtra, UsageError

PROG = "cllm_cli.lm_eval"

try:
    import lm_eval  # noqa: F401  (the harness, not this module: imports are absolute)
except ImportError as error:
    MISSING: ImportError | None = error
else:
    MISSING = None
    import cllm_cli.evaluation.harness  # noqa: F401  registers the model `cllm`


def main(argv: Sequence[str] | None = None) -> int:
    """Runs lm-eval's command line on argv (sys.argv[1:] when None); its exit status. A fault
    of ours (a model that cannot be read, a continuation longer than the model's context)
    ends it with one line, as every command does."""
    status = 0

    def evaluate() -> None:
        nonlocal status
        if MISSING is not None:
            raise MissingExtra(f"lm-evaluation-harness is not installed ({MISSING}): "
                               "pip install '.[lm-eval]'")
        from lm_eval.__main__ import cli_evaluate
        sys.argv = [PROG, *(sys.argv[1:] if argv is None else argv)]
        try:
            cli_evaluate()
        except ValueError as e:
            # lm-eval's refusal of task names it has not got, raised out of its command line
            if str(e).startswith("Tasks not found:"):
                raise UsageError(f"{e} (python -m cllm_cli.lm_eval ls tasks lists them; "
                                 f"--include_path adds a "
                                 f"directory of task files)") from None
            raise
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)

    return run_main(PROG, evaluate, stop_without_output=True) or status


if __name__ == "__main__":
    sys.exit(main())
