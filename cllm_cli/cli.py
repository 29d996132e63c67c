"""What the command-line tools share: one-line argparse errors and help that shows defaults."""
import argparse


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
