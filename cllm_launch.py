"""The entry points of CLLM's commands (train_model, cllm_inference, ...), outside the package
so that they run before it loads: loading numpy, scipy and the compiled engine takes a few
tenths of a second, and Ctrl-C meanwhile would raise KeyboardInterrupt with a traceback. Until
a command's module is loaded, Ctrl-C ends the process as SIGTERM and SIGHUP already do: at
once, quietly, with the status a shell gives a command stopped by the signal (130); nothing
has been written by then. The command's own handling of stop signals takes over once it
starts."""
import importlib
import signal
from typing import Callable


def _command(module: str) -> Callable[[], int]:
    """The main() of cllm_cli.cli.`module`, loaded with Ctrl-C ending the process quietly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    main: Callable[[], int] = importlib.import_module(module).main
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main


def train_model() -> int:
    return _command("cllm_cli.cli.train")()


def cllm_inference() -> int:
    return _command("cllm_cli.cli.inference")()


def cllm_tokenize() -> int:
    return _command("cllm_cli.cli.tokenize")()


def cllm_plot() -> int:
    return _command("cllm_cli.cli.plot")()


def cllm_eval() -> int:
    return _command("cllm_cli.cli.evaluate")()


def cllm_export() -> int:
    return _command("cllm_cli.cli.export")()


def cllm_chat() -> int:
    return _command("cllm_cli.cli.chat")()
