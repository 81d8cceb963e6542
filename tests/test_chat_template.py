"""Chat templates render the exact prompt text a model expects."""

from __future__ import annotations

import datetime

import pytest

from edge_rt.errors import EdgeRTError, InvalidOptionError, ModelFormatError
from edge_rt.loading.chat_template import CHATML_TEMPLATE, render_chat, validate_messages

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2? 日本語 🙂"},
]


@pytest.fixture(scope="session")
def smollm2_template(smollm2_path):
    import gguf

    return gguf.GGUFReader(smollm2_path).fields["tokenizer.chat_template"].contents()


def test_chatml_fallback_renders_expected_string():
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2? 日本語 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(CHATML_TEMPLATE, CONVERSATION) == expected
    without = render_chat(CHATML_TEMPLATE, CONVERSATION, add_generation_prompt=False)
    assert without == expected.removesuffix("<|im_start|>assistant\n")


def test_smollm2_template_renders_expected_string(smollm2_template):
    assert render_chat(smollm2_template, CONVERSATION) == render_chat(CHATML_TEMPLATE, CONVERSATION)
    # without a system message, SmolLM2's template writes its own
    got = render_chat(smollm2_template, [{"role": "user", "content": "Hi"}])
    assert got == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = render_chat(smollm2_template, [{"role": "user", "content": "Hi"}],
                            add_generation_prompt=False)
    assert got == no_prompt + "<|im_start|>assistant\n"


def test_trim_and_lstrip_blocks_like_hugging_face():
    template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "[U]{{ m['content'] }}\n"
        "    {% else %}\n"
        "[A]{{ m['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert render_chat(template, msgs) == "[U]q\n[A]a\n"


def test_globals_filters_and_extras():
    template = (
        "{{ bos_token }}{{ messages | tojson }}|{{ tools | tojson }}|{{ strftime_now('%Y') }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}{% endfor %}"
        "{{ eos_token }}"
    )
    msgs = [{"role": "user", "content": "<b>é & \"q\"</b>"}, {"role": "assistant", "content": "x"}]
    out = render_chat(template, msgs, bos_token="<s>", eos_token="</s>", tools=[{"name": "f"}])
    year = str(datetime.datetime.now().year)
    assert out == (
        '<s>[{"role": "user", "content": "<b>é & \\"q\\"</b>"}, {"role": "assistant", "content": "x"}]'
        f'|[{{"name": "f"}}]|{year}|user</s>'
    )


def test_extra_message_keys_pass_through():
    template = "{% for m in messages %}{{ m.role }}:{{ m.tool_call_id }}:{{ m.content }};{% endfor %}"
    msgs = [{"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert render_chat(template, msgs, add_generation_prompt=False) == "tool:c1:42;"


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        None,
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"role": "robot", "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["a", "b"]}],
        [{"role": "user", "content": "ok"}, {"role": "user", "content": 3}],
    ],
)
def test_bad_messages_raise_invalid_option(messages):
    with pytest.raises(InvalidOptionError) as exc:
        render_chat(CHATML_TEMPLATE, messages)
    assert "\n" not in str(exc.value)
    with pytest.raises(InvalidOptionError):
        validate_messages(messages)


def test_empty_conversation_is_allowed():
    assert render_chat(CHATML_TEMPLATE, []) == "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }",  # does not parse
        "{% for m in messages %}\n{{ m.content }}\n",  # unclosed block, over lines
        "{{ messages[0].content.nope() }}",  # runtime error
        "{{ ''.__class__.__mro__ }}",  # sandbox
        "{{ messages.append({'role': 'user'}) }}",  # immutable
        "{{ 1 / 0 }}",
    ],
)
def test_broken_template_raises_model_format_error(template):
    with pytest.raises(ModelFormatError) as exc:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert isinstance(exc.value, EdgeRTError)
    assert "\n" not in str(exc.value) and str(exc.value)


def test_template_refusal_is_invalid_option():
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}{% endif %}ok"
    )
    assert render_chat(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidOptionError, match="roles must alternate user/assistant") as exc:
        render_chat(template, [{"role": "assistant", "content": "x"}])
    assert "\n" not in str(exc.value)
