"""cllm_chat on a real pseudo-terminal (its controlling terminal, so that Ctrl-C typed there is
the line discipline's SIGINT) and through a pipe. Every reply is compared with the one
model/generation.py's generate_ids gives on the conversation rendered independently here
(ChatML written out by hand, or the run's own template), cut where the template ends a turn.

The model is trained here on ChatML conversations, so that it writes text and ends its turns
with <|im_end|> (learned, not forced)."""
import os
import select
import shutil
import subprocess
import sys
import termios

import pytest
from helpers import assert_one_error_line, call, gpt2_directory, sentences, write

from cllm_cli.api import load_model
from cllm_cli.cli import chat, train
from cllm_cli.model.generation import generate_ids

END = "<|im_end|>"
GUARD = 120         # seconds without any output after which a terminal test fails
# runs the tool with the terminal on its standard input as its controlling terminal
ON_TERMINAL = ("import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
               "from cllm_cli.cli.chat import main; sys.exit(main(sys.argv[1:]))")
MODEL = ["--tokenizer", "bpe", "--vocab-size", "300", "--embed-dim", "32", "--num-layers", "2",
         "--num-heads", "2", "--seq-len", "128", "--batch-size", "8", "--max-steps", "600",
         "--warmup-steps", "0", "--eval-interval", "0", "--threads", "1", "--quiet"]


def chatml(messages, generation_prompt=True):
    """The default template's text, written out."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on 400 ChatML conversations (a sentence from the user, a short one from
    the assistant), and its model and tokenizer."""
    base = tmp_path_factory.mktemp("chat")
    users = sentences(400, 1, ".?!").splitlines()
    replies = sentences(400, 2, ".", max_words=5).splitlines()
    corpus = write(base / "chats.txt", "".join(
        chatml([{"role": "user", "content": u}, {"role": "assistant", "content": a}], False)
        for u, a in zip(users, replies)))
    assert train.main([str(corpus), *MODEL, "--checkpoint-dir", str(base / "ck")]) == 0
    model, tokenizer, _ = load_model(base / "ck")
    return base / "ck", model, tokenizer


def continuation(run, text, max_tokens, end=END, **sampling):
    """(reply, cut): generate_ids' continuation of `text` up to <eos>, cut before `end`;
    cut says whether `end` ended it. Greedy unless sampling says otherwise."""
    _, model, tok = run
    options = {"temperature": 0.0, **sampling}
    ids = list(generate_ids(model.config, model.flat, [int(i) for i in tok.encode(text)],
                            max_tokens, stop_ids=(tok.eos_id,), num_tokens=len(tok), **options))
    if ids and ids[-1] == tok.eos_id:
        ids.pop()
    reply = tok.decode(ids)
    return (reply[:reply.index(end)], True) if end in reply else (reply, False)


class Terminal:
    """cllm_chat with a pseudo-terminal as standard input and output; stderr is a pipe."""

    def __init__(self, *argv):
        self.master, slave = os.openpty()
        # NOFLSH: Ctrl-C must not make the line discipline drop the reply's text still queued
        # for this side to read (what was shown is what the test compares)
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.NOFLSH
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen([sys.executable, "-c", ON_TERMINAL, *map(str, argv)],
                                     stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                                     start_new_session=True)
        os.close(slave)
        self.shown = b""

    def read_until(self, ending, at_least=0):
        """What the terminal shows from now on, once that ends with `ending` and holds at
        least `at_least` bytes."""
        start = len(self.shown)
        while not (self.shown[start:].endswith(ending) and len(self.shown) - start >= at_least):
            ready, _, _ = select.select([self.master], [], [], GUARD)
            assert ready, f"nothing shown for {GUARD} s; so far: {self.shown[start:]!r}"
            chunk = os.read(self.master, 1 << 16)
            assert chunk, f"the terminal closed; so far: {self.shown[start:]!r}"
            self.shown += chunk
        return self.shown[start:].decode()

    def type(self, data):
        os.write(self.master, data)

    def say(self, message):
        """Types a message; returns the reply shown, up to the next prompt (as the program
        wrote it: newlines, not the terminal's carriage returns)."""
        self.type(message.encode() + b"\n")
        shown = self.read_until(b"\r\n> ").replace("\r\n", "\n")
        assert shown.startswith(message + "\n"), shown        # the terminal's echo
        return shown[len(message) + 1:-len("> ")]

    def finish(self):
        """(exit status, stderr) once the program has ended."""
        _, err = self.proc.communicate(timeout=GUARD)
        status = self.proc.returncode
        os.close(self.master)
        return status, err.decode()


@pytest.fixture
def terminal():
    """Terminal(*argv); the process is killed if a test leaves it running."""
    started = []

    def start(*argv):
        started.append(Terminal(*argv))
        started[-1].read_until(b"> ")
        return started[-1]
    yield start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def shown_reply(reply):
    """A reply as the tool shows it: ended by one newline."""
    return reply if reply.endswith("\n") else reply + "\n"


def test_a_message_on_a_terminal_gets_the_greedy_reply_streamed(run, terminal):
    ck = run[0]
    t = terminal(ck, "--temperature", "0", "--max-new-tokens", "60", "--threads", "1")
    expected, cut = continuation(run, chatml([{"role": "user", "content": "Brave queen."}]), 60)
    assert cut and expected, "premise: the model ends its turn with <|im_end|> within 60 tokens"
    assert t.say("Brave queen.") == shown_reply(expected)
    t.type(b"\x04")                                 # Ctrl-D at the prompt
    assert t.read_until(b"\r\n") == "\r\n"
    status, err = t.finish()
    assert status == 0 and err == "", err


def test_reset_gives_the_reply_of_a_new_session(run, terminal):
    """Sampled (--temperature 1, --seed 5): after /reset the history, the cache and the random
    stream start again, so the reply is the first reply again, not the history's."""
    ck = run[0]
    t = terminal(ck, "--temperature", "1", "--seed", "5", "--max-new-tokens", "16")
    first = t.say("the old king")
    expected, _ = continuation(run, chatml([{"role": "user", "content": "the old king"}]),
                               16, temperature=1.0, top_k=40, top_p=0.95, seed=5)
    assert first == shown_reply(expected)
    again = t.say("the old king")
    t.type(b"/reset\n")
    assert t.read_until(b"> ").replace("\r\n", "\n") == "/reset\n> "
    after_reset = t.say("the old king")
    assert after_reset == first and again != first, (first, again)
    t.type(b"/exit\n")
    t.read_until(b"/exit\r\n")
    status, err = t.finish()
    assert status == 0 and err == "", err


def test_ctrl_c_stops_a_reply_and_the_prompt_returns(run, terminal, tmp_path):
    """A template whose end of turn the model never writes and no limit on the reply: only
    Ctrl-C ends it. What was shown is the start of the greedy continuation."""
    ck = run[0]
    template = write(tmp_path / "t.jinja", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                     "{{ m['content'] }}<|stop|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    prompt = "<|im_start|>user\nthe red bird<|stop|>\n<|im_start|>assistant\n"
    long_reply, cut = continuation(run, prompt, 400, end="<|stop|>")
    assert not cut and len(long_reply) > 400, "premise: 400 tokens without an end of turn"
    t = terminal(ck, "--template", template, "--temperature", "0", "--max-new-tokens",
                 "2000000000", "--threads", "1")
    t.type(b"the red bird\n")
    begun = t.read_until(b"", at_least=len("the red bird\r\n") + 8)    # the reply has begun
    t.type(b"\x03")
    shown = (begun + t.read_until(b"\r\n> ")).replace("\r\n", "\n")
    assert "^C" in shown, shown                      # the terminal's echo of the interrupt
    reply = shown[len("the red bird\n"):-len("\n> ")].replace("^C", "")
    model_tokens = 1
    while len(long_reply) < len(reply) + 1:          # the reply ran past the 400 tokens above
        model_tokens *= 2
        long_reply, _ = continuation(run, prompt, 400 * model_tokens, end="<|stop|>")
    assert reply and long_reply.startswith(reply), (reply[:200], long_reply[:200])
    t.type(b"\x04")
    t.read_until(b"\r\n")
    status, err = t.finish()
    assert status == 0 and err == "", err


def test_ctrl_c_at_the_prompt_drops_the_line_and_twice_leaves(run, terminal):
    t = terminal(run[0], "--temperature", "0", "--max-new-tokens", "5")
    t.type(b"half a messa")
    t.read_until(b"half a messa")
    t.type(b"\x03")
    shown = t.read_until(b"\r\n> ")
    assert shown == "^C\r\n> ", shown               # no reply: the line was dropped
    t.type(b"\x03")
    t.read_until(b"^C\r\n")
    status, err = t.finish()
    assert status == 0, err
    assert err == "cllm_chat: Ctrl-C again, Ctrl-D or /exit leaves\n", err


def simulate(run, messages, system, max_new, template=chatml, end=END):
    """The replies cllm_chat's documented rules give: each turn renders [system] + history +
    message, drops the oldest exchanges while the prompt leaves less than min(max_new,
    seq_len / 2) tokens free, and continues it greedily. Returns (replies, dropped turns)."""
    _, model, tok = run
    T = model.config.seq_len
    room = min(max_new, T // 2)
    head = [] if system is None else [{"role": "system", "content": system}]
    turns, replies, dropped = [], [], 0
    for message in messages:
        turns.append({"role": "user", "content": message})
        while len(tok.encode(template(head + turns))) + room > T and len(turns) > 1:
            del turns[:2]
            dropped += 1
        reply, _ = continuation(run, template(head + turns), max_new, end=end)
        turns.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies, dropped


def test_piped_messages_keep_the_history_within_the_context(run):
    """One message per line, no prompt; the second reply reads the first exchange, later ones
    drop the oldest exchanges (said once on stderr); --system is rendered in every turn."""
    ck = run[0]
    messages = ["hi", "the king?", "a red bird sang", "tell me more", "why"]
    system = "you are a quiet brave town."
    replies, dropped = simulate(run, messages, system, 12)
    assert dropped >= 2, "premise: the context is too small for the whole conversation"
    alone, _ = continuation(run, chatml([{"role": "user", "content": "the king?"}]), 12)
    assert alone != replies[1], "premise: the history changes the second reply"
    no_system, _ = simulate(run, messages[:1], None, 12)
    assert no_system[0] != replies[0], "premise: the system message changes the reply"
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.chat", str(ck), "--temperature", "0",
                        "--max-new-tokens", "12", "--system", system],
                       input="".join(m + "\n" for m in messages), capture_output=True, text=True,
                       timeout=GUARD)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "".join(shown_reply(r) for r in replies)
    assert p.stderr == ("cllm_chat: the conversation no longer fits in the model's context of "
                        "128 tokens: its oldest messages are dropped\n"), p.stderr


@pytest.mark.parametrize("stored", ["file", "metadata"])
def test_the_runs_own_template_and_its_end_of_turn(run, tmp_path, stored):
    """A template stored with the run (chat_template.jinja, or in the checkpoint's metadata)
    that ends a turn with a newline: every reply is one line."""
    ck = tmp_path / "ck"
    shutil.copytree(run[0], ck)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    if stored == "file":
        (ck / "chat_template.jinja").write_text(template)
    else:
        model = run[1]
        model.save(ck / "final_model.cllm", meta={**model.meta, "chat_template": template})

    def plain(messages):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    first, cut = continuation(run, plain([{"role": "user", "content": "the old king"}]), 40,
                              end="\n")
    assert cut, "premise: the reply would go on past a newline"
    replies, _ = simulate(run, ["the old king", "and then"], None, 40, plain, "\n")
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.chat", str(ck), "--temperature", "0",
                        "--max-new-tokens", "40"], input="the old king\nand then\n",
                       capture_output=True, text=True, timeout=GUARD)
    assert p.returncode == 0, p.stderr
    assert replies[0] == first and p.stdout == "".join(r + "\n" for r in replies)


def test_a_backslash_continues_a_message_on_the_next_line(run):
    message = "the old king\nand the red bird"
    expected, _ = continuation(run, chatml([{"role": "user", "content": message}]), 20)
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.chat", str(run[0]), "--temperature",
                        "0", "--max-new-tokens", "20"], input="the old king\\\nand the red bird\n",
                       capture_output=True, text=True, timeout=GUARD)
    assert p.returncode == 0 and p.stdout == shown_reply(expected), p.stderr


@pytest.mark.parametrize("argv, fragments", [
    (["{missing}"], ["no such file or directory"]),
    (["{garbage}"], ["cannot load checkpoint", "{garbage}"]),
    (["{run}", "--temperature", "-1"], ["--temperature"]),
    (["{run}", "--max-new-tokens", "0"], ["--max-new-tokens", "from 1 to 2147483647"]),
    (["{run}", "--top-p", "0"], ["--top-p"]),
    (["{run}", "--template", "{bad}"], ["not a valid template"]),
    (["{run}", "--template", "{missing}"], ["{missing}"]),
])
def test_bad_input_is_one_line_and_status_2(run, tmp_path, capsys, argv, fragments):
    bad = write(tmp_path / "bad.jinja", "{% for m in messages %}")
    garbage = write(tmp_path / "garbage.cllm", "not a checkpoint\n")
    names = {"run": run[0], "missing": tmp_path / "none", "bad": bad, "garbage": garbage}
    code, out, err = call(capsys, chat.main, *(a.format(**names) for a in argv))
    assert_one_error_line(code, err, "cllm_chat", *(f.format(**names) for f in fragments))
    assert out == ""


def role_template(path, raise_when, message):
    """A plain template (role: content lines) that raises `message` when the Jinja test
    `raise_when` on the first message holds."""
    return write(path, f"{{% if messages[0]['role'] {raise_when} %}}"
                       f"{{{{ raise_exception('{message}') }}}}{{% endif %}}"
                       "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")


def chat_process(model, template, *options, input):
    """cllm_chat on `model` with `template` as a real process, `input` on its stdin."""
    return subprocess.run([sys.executable, "-m", "cllm_cli.cli.chat", str(model), "--template",
                           str(template), "--threads", "1", *options],
                          input=input, capture_output=True, text=True, timeout=GUARD)


def test_a_template_that_refuses_the_system_message_is_refused_before_the_first_prompt(
        tmp_path):
    """Templates such as Gemma's raise on a system role: with --system, cllm_chat says so at
    once, before it reads a message (it read the first one, then stopped)."""
    model = gpt2_directory(tmp_path / "gpt2", sentences(200, 4, "."))
    template = role_template(tmp_path / "no_system.jinja", "== 'system'",
                             "System role not supported")
    p = chat_process(model, template, "--system", "be brief", input="")
    assert_one_error_line(p.returncode, p.stderr, "cllm_chat", str(template),
                          "System role not supported")
    assert p.stdout == ""
    # without --system the template is fine: a message gets its reply
    p = chat_process(model, template, "--max-new-tokens", "3", input="hello\n")
    assert p.returncode == 0 and p.stdout.endswith("\n") and p.stderr == "", p.stderr


def test_a_template_that_needs_the_system_message_is_read_with_it(tmp_path):
    """A template that raises without a system message first works with --system: its end of
    turn is found on a conversation that starts with the system message too."""
    model = gpt2_directory(tmp_path / "gpt2", sentences(200, 4, "."))
    template = role_template(tmp_path / "system_first.jinja", "!= 'system'",
                             "A system message must come first")
    p = chat_process(model, template, "--system", "x", "--max-new-tokens", "3", input="hi\n")
    assert p.returncode == 0 and p.stdout.endswith("\n") and p.stderr == "", p.stderr
