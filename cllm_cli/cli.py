"""What the command-line tools share: one-line argparse errors, help that shows defaults,
UsageError and the mapping of failures to one line on stderr and an exit status (run_main)."""
import argparse
import os
import sys


class UsageError(Exception):
    """A bad option value, combination or input (exit status 2)."""


def run_main(prog, command, statuses, interrupts=(), on_interrupt=None):
    """Runs command() as the body of a tool's main() and returns the exit status: 0 when it
    returns.

    statuses maps exception classes (or tuples of them) to exit statuses, tried in order: such
    an exception prints the one line "prog: error: <message>" on stderr. For every tool alike,
    out of memory prints "prog: error: out of memory (...)" and gives 1; Ctrl-C
    (KeyboardInterrupt, or one of `interrupts`) gives 130 after on_interrupt(), when given; and
    a reader that went away (`| head`) ends the run quietly with 1. Anything else propagates.
    """
    try:
        command()
    except (KeyboardInterrupt, *interrupts):
        if on_interrupt is not None:
            on_interrupt()
        return 130
    except BrokenPipeError:
        # stop quietly, and keep Python's exit-time flush of stdout from failing too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except MemoryError as e:
        print(f"{prog}: error: out of memory ({e})", file=sys.stderr)
        return 1
    except Exception as e:
        for classes, status in statuses.items():
            if isinstance(e, classes):
                print(f"{prog}: error: {e}", file=sys.stderr)
                return status
        raise
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit status 2.
    Shared by every tool (train_model, cllm_inference, cllm_tokenize, cllm_plot)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help text already says it and for defaults that
    mean "not given" (None, empty, False). Help texts name their defaults themselves with
    %(default)s where it matters, because argparse-manpage expands only that."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, "", False):
            return text
        return super()._get_help_string(action)


def name_defaults(parser):
    """Writes each option's default into its help text as %(default)s, the only form
    argparse-manpage expands, so that --help and the man page both show it."""
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or "(default" in action.help:
            continue
        if action.default in (None, "", False, argparse.SUPPRESS) or action.option_strings == []:
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"
    return parser
