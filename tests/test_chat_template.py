"""Chat templates (cllm_cli/tokenizers/chat_template.py): rendered as transformers'
apply_chat_template renders them (compared with transformers' own output), the sandbox, where
templates come from, and the assistant spans the loss mask is built from."""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from cllm_cli.errors import DataError
from cllm_cli.tokenizers.chat_template import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
)

# ChatML with a default system turn when the conversation brings none (as Qwen2.5's does)
CHATML_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama-2's form: block tags on lines of their own (trim_blocks and lstrip_blocks decide the
# white space), bos_token / eos_token, raise_exception
INST = (
    "{% if messages[0]['role'] == 'system' %}\n"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}\n"
    "{% set loop_messages = messages[1:] %}\n"
    "{% else %}\n"
    "{% set system = '' %}\n"
    "{% set loop_messages = messages %}\n"
    "{% endif %}\n"
    "{% for message in loop_messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('roles must alternate user/assistant') }}\n"
    "    {% endif %}\n"
    "    {% if message['role'] == 'user' %}\n"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}\n"
    "    {% else %}\n"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
)

# tojson (non-ASCII and HTML characters kept as they are) and {% continue %}
AS_JSON = (
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}{\"role\": \"assistant\"{% endif %}"
)

TEMPLATES = {"default": DEFAULT_TEMPLATE, "chatml_system": CHATML_SYSTEM, "inst": INST,
             "tojson": AS_JSON}

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Héllo <b>&</b> "},
     {"role": "assistant", "content": "Hi.\nHow are you?"},
     {"role": "user", "content": "fine\n"}, {"role": "assistant", "content": "good"}],
]


def hf_tokenizer(template):
    """transformers' fast tokenizer with `template` and the bos/eos strings <s> and </s>."""
    tk = HFTokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=template)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_equals_transformers(name, generation_prompt):
    template = ChatTemplate(TEMPLATES[name], bos_token="<s>", eos_token="</s>")
    reference = hf_tokenizer(TEMPLATES[name])
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        assert template.render(messages, add_generation_prompt=generation_prompt) == expected
        assert expected            # the comparison is not between two empty strings


def test_default_is_chatml_text():
    messages = CONVERSATIONS[1]
    text = ChatTemplate.default().render(messages, add_generation_prompt=False)
    assert text == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n")
    assert ChatTemplate.default().render(messages[:1], add_generation_prompt=True) == \
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", TEMPLATES)
def test_segments_cut_the_rendering_at_assistant_turns(name):
    template = ChatTemplate(TEMPLATES[name], bos_token="<s>", eos_token="</s>")
    for messages in CONVERSATIONS:
        whole = template.render(messages)
        pieces = template.segments(messages)
        assert "".join(text for text, _ in pieces) == whole
        trained = [text for text, is_trained in pieces if is_trained]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(trained) == len(answers)
        for text, answer in zip(trained, answers):     # (tojson writes it escaped)
            assert answer.strip() in text or json.dumps(answer)[1:-1] in text
        # each trained piece starts where the generation prompt of its turn ends
        spans = template.assistant_spans(messages)
        for (start, _), i in zip(spans, [i for i, m in enumerate(messages)
                                         if m["role"] == "assistant"]):
            assert whole[:start] == template.render(messages[:i], add_generation_prompt=True)


def test_chatml_turn_includes_its_end_marker():
    pieces = ChatTemplate.default().segments(CONVERSATIONS[2])
    assert [text for text, trained in pieces if trained] == \
        ["Hi.\nHow are you?<|im_end|>\n", "good<|im_end|>\n"]


def test_template_that_rewrites_earlier_turns_is_refused():
    # the last message alone is shown bare: an earlier assistant turn changes once one follows
    template = ChatTemplate("{% for m in messages %}{% if loop.last %}{{ m.content }}"
                            "{% else %}[{{ m.content }}]{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="renders assistant message 3 differently"):
        template.segments(CONVERSATIONS[2])


def test_sandbox_and_template_faults_are_one_line():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate("{{ messages.append(1) }}").render(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(INST).render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="not a valid template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="strftime_now"):
        ChatTemplate("{{ strftime_now('%d') }}").render(CONVERSATIONS[0])
    # a filter given a value of another kind, and a filter's own check of its arguments
    with pytest.raises(ChatTemplateError, match="AttributeError: 'list' object has no attribute"):
        ChatTemplate("{{ messages|xmlattr }}").render(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="AssertionError: expected length >= 3"):
        ChatTemplate("{{ 'text'|truncate(-1) }}").render(CONVERSATIONS[0])
    for fault in (ChatTemplateError, DataError):
        try:
            ChatTemplate("{{ raise_exception('bad\nthing') }}").render([])
        except fault as e:
            assert "\n" not in str(e)


def test_of_finds_the_template(tmp_path):
    assert ChatTemplate.of(tmp_path).is_default          # nothing there: the default
    (tmp_path / "chat_template.jinja").write_text(INST, encoding="utf-8")
    assert ChatTemplate.of(tmp_path).source == INST
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML_SYSTEM}), encoding="utf-8")
    assert ChatTemplate.of(tmp_path).source == CHATML_SYSTEM   # the config comes first
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": INST},
                           {"name": "default", "template": AS_JSON}]}), encoding="utf-8")
    assert ChatTemplate.of(tmp_path).source == AS_JSON
    assert ChatTemplate.of(tmp_path / "chat_template.jinja").source == INST
    tokens = ChatTemplate.of(tmp_path / "chat_template.jinja", "<s>", "</s>")
    assert tokens.render(CONVERSATIONS[1]).startswith("<s>[INST]")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(DataError, match="chat_template is not a string"):
        ChatTemplate.of(tmp_path)
    with pytest.raises(DataError, match="cannot read the chat template"):
        ChatTemplate.of(tmp_path / "missing.jinja")


def test_named_templates_without_a_default_are_refused(tmp_path):
    """As transformers: a list of named templates without one named "default" gives no
    template to render with (never the default ChatML in its place)."""
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": INST},
                                                    {"name": "rag", "template": AS_JSON}]}),
                      encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text(CHATML_SYSTEM, encoding="utf-8")
    for where in (tmp_path, config):
        with pytest.raises(DataError, match=r"tokenizer_config\.json: chat_template names "
                                            r"templates rag, tool_use, none of them \"default\""):
            ChatTemplate.of(where)
