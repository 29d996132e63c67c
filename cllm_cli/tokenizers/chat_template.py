"""Chat templates: a conversation ({"role", "content"} messages) -> the text a model reads.

    ChatTemplate.of(where)          the template of a tokenizer directory, a tokenizer_config.json
                                    or a .jinja file; the default when a directory has none
    ChatTemplate.default()          DEFAULT_TEMPLATE (ChatML, below)
    ChatTemplate(source, ...)       a template from its Jinja text
    template.render(messages, add_generation_prompt)    the rendered text
    template.assistant_spans(messages)   (start, end) character spans of each assistant turn
    template.segments(messages)     the rendered text cut at those spans: [(text, trained)]
    ChatTemplateError               a template that does not compile or render (DataError)

A template is Jinja, rendered as transformers' apply_chat_template renders it: an
ImmutableSandboxedEnvironment (a template downloaded with a model is untrusted input: it
cannot reach Python's internals nor change the objects it is given), trim_blocks and
lstrip_blocks on, the loopcontrols extension ({% break %}, {% continue %}), a
{% generation %} block that renders its body (transformers marks assistant text with it;
here the spans come from rendering, below), the function raise_exception(message), the
filter tojson (json.dumps, non-ASCII kept, HTML not escaped), and the variables messages,
add_generation_prompt, bos_token and eos_token (the tokenizer's strings). A template that
calls anything else (strftime_now: today's date would make the data depend on the day) stops
with ChatTemplateError naming the fault.

Where a template comes from (ChatTemplate.of): `chat_template` in a tokenizer_config.json (a
string, or a list of {"name", "template"} of which the one named "default"; a list without
one is refused, as transformers refuses it), else a chat_template.jinja file beside it (as
transformers saves it since 4.47), else the default.

DEFAULT_TEMPLATE is ChatML written as text:

    <|im_start|>{role}\\n{content}<|im_end|>\\n      for each message
    <|im_start|>assistant\\n                          with add_generation_prompt

Assistant spans are found by rendering incrementally: for assistant message i, the prefix
render(messages[:i], add_generation_prompt=True) and the turn render(messages[:i + 1]); the
span is what the turn adds to the prefix: the message's content and whatever the template
writes after it up to the next message (ChatML: "content<|im_end|>\\n"). Both must be
prefixes of the whole conversation's rendering; a template that renders an earlier turn
differently once later ones follow (some drop the reasoning of old turns) cannot be cut so
and is refused for that conversation (ChatTemplateError).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from cllm_cli.errors import DataError, MissingExtra
from cllm_cli.fileio import reason
from cllm_cli.jsonfile import read_json

DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# the file a run (and a transformers directory) keeps its template in
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
EXTRA_HINT = "pip install 'cllm[chat]'"


class ChatTemplateError(DataError):
    """A template that does not compile, or that fails (or cannot be cut into turns) on a
    conversation; the message is one line."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _jinja() -> Any:
    """The jinja2 module, or MissingExtra naming the extra that installs it."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise MissingExtra(f"chat templates need jinja2, which is not installed "
                           f"({EXTRA_HINT})") from None
    return jinja2


def _environment() -> Any:
    """The sandboxed environment templates are compiled in (see the module docstring)."""
    jinja2 = _jinja()
    extension: Any = jinja2.ext.Extension

    class GenerationBlock(extension):       # {% generation %}...{% endgeneration %}
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: object) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


class ChatTemplate:
    """A compiled chat template and the tokenizer strings it is rendered with."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 origin: str = "chat template") -> None:
        """`source`: the Jinja text; bos_token / eos_token: the strings the template sees;
        origin: where the text came from, in error messages."""
        jinja2 = _jinja()
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{origin}: not a valid template ({_one_line(e)})") from None

    @classmethod
    def default(cls, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """The ChatML default (DEFAULT_TEMPLATE)."""
        return cls(DEFAULT_TEMPLATE, bos_token, eos_token, "default chat template")

    @classmethod
    def of(cls, where: str | os.PathLike, bos_token: str = "",
           eos_token: str = "") -> ChatTemplate:
        """The template of `where`: a directory (its tokenizer_config.json's chat_template,
        else its chat_template.jinja, else the default), a tokenizer_config.json, or any
        other file taken as Jinja text. DataError (one line) for a file that cannot be read."""
        path = Path(where)
        if path.is_dir():
            found = cls.find(path)
            if found is None:
                return cls.default(bos_token, eos_token)
            source, origin = found
        elif path.name == CONFIG_FILE:
            configured = _config_template(path)
            if configured is None:
                raise DataError(f"{path}: holds no chat_template")
            source, origin = configured, str(path)
        else:
            source, origin = _read_text(path), str(path)
        return cls(source, bos_token, eos_token, origin)

    @staticmethod
    def find(directory: str | os.PathLike) -> tuple[str, str] | None:
        """(Jinja text, the file it came from) of a directory's own template, or None."""
        directory = Path(directory)
        config = directory / CONFIG_FILE
        if config.is_file():
            source = _config_template(config)
            if source is not None:
                return source, str(config)
        jinja_file = directory / TEMPLATE_FILE
        if jinja_file.is_file():
            return _read_text(jinja_file), str(jinja_file)
        return None

    def with_tokens(self, bos_token: str, eos_token: str) -> ChatTemplate:
        """The same template rendered with other bos_token / eos_token strings."""
        return ChatTemplate(self.source, bos_token, eos_token, self.origin)

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_TEMPLATE

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = False) -> str:
        """The text of `messages`, followed by the start of an assistant turn with
        add_generation_prompt. ChatTemplateError (one line) when the template fails."""
        jinja2 = _jinja()
        try:
            return str(self._compiled.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token))
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: {_one_line(e) or type(e).__name__}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError,
                AttributeError, AssertionError) as e:
            # what Python raises inside the template: a method or filter given values it does
            # not take ({{ messages|xmlattr }}: AttributeError), Jinja's own checks of a
            # filter's arguments (truncate(-1): AssertionError)
            raise ChatTemplateError(f"{self.origin}: fails on this conversation "
                                    f"({type(e).__name__}: {_one_line(e)})") from None

    def assistant_spans(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
        """[(start, end)] in render(messages) of each assistant message's turn, in order (see
        the module docstring); ChatTemplateError when the template cannot be cut so."""
        whole = self.render(messages)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if not (turn.startswith(prefix) and whole.startswith(turn)):
                raise ChatTemplateError(
                    f"{self.origin}: renders assistant message {i + 1} differently once the "
                    f"conversation goes on, so its tokens cannot be told apart")
            if spans and len(prefix) < spans[-1][1]:
                raise ChatTemplateError(f"{self.origin}: assistant message {i + 1} overlaps "
                                        f"the previous one")
            spans.append((len(prefix), len(turn)))
        return spans

    def segments(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
        """render(messages) cut into consecutive pieces, each (text, trained): trained for an
        assistant turn (assistant_spans), not for what lies between; empty pieces left out."""
        whole = self.render(messages)
        pieces: list[tuple[str, bool]] = []
        at = 0
        for start, end in self.assistant_spans(messages):
            pieces += [(whole[at:start], False), (whole[start:end], True)]
            at = end
        pieces.append((whole[at:], False))
        return [(text, trained) for text, trained in pieces if text]


def _config_template(config: Path) -> str | None:
    """chat_template of a tokenizer_config.json (the "default" one of a named list)."""
    data = read_json(config)
    found = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        if "default" not in named:          # transformers has no template to render either
            names = ", ".join(sorted(map(str, named))) or "(none)"
            raise DataError(f"{config}: chat_template names templates {names}, none of them "
                            f"\"default\" (the one rendered): save the one to use in a "
                            f".jinja file and give that file")
        found = named["default"]
    if found is not None and not isinstance(found, str):
        raise DataError(f"{config}: chat_template is not a string")
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = reason(e) if isinstance(e, OSError) else "not UTF-8 text"
        raise DataError(f"{path}: cannot read the chat template ({why})") from None
