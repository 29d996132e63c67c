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
    """The main() of `module`, loaded with Ctrl-C ending the process quietly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    main: Callable[[], int] = importlib.import_module(module).main
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main


def _entry(module: str) -> Callable[[], int]:
    """A console script: loads cllm_cli.cli.`module` as _command does and runs its main()."""
    return lambda: _command(f"cllm_cli.cli.{module}")()


train_model = _entry("train")
cllm_inference = _entry("inference")
cllm_tokenize = _entry("tokenize")
cllm_plot = _entry("plot")
cllm_eval = _entry("evaluate")
cllm_export = _entry("export")
cllm_chat = _entry("chat")
