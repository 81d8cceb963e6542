"""Chat templates: a conversation -> the prompt text the model was trained on.

Templates are the Jinja2 strings models ship (GGUF `tokenizer.chat_template`, Hugging Face
`tokenizer_config.json`). They run the way Hugging Face `apply_chat_template` runs them: a
sandboxed, immutable environment with trim_blocks and lstrip_blocks, the loop-controls extension,
`raise_exception` and `strftime_now` globals, and a `tojson` filter that does not HTML-escape.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from edge_rt.errors import InvalidOptionError, ModelFormatError, one_line

ROLES = ("system", "user", "assistant", "tool")

# Used when a model ships no template: plain ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by a template: it refuses the conversation."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def validate_messages(messages: Any) -> None:
    """Raise InvalidOptionError unless `messages` is a list of {role, content: str} dicts.

    Other keys (name, tool_calls, tool_call_id, ...) are allowed and passed to the template.
    """
    if not isinstance(messages, list):
        raise InvalidOptionError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidOptionError(f"messages[{k}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidOptionError(
                f"messages[{k}]: role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise InvalidOptionError(
                f"messages[{k}]: content must be a str, got {type(content).__name__}"
            )


def render_chat(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a conversation with a model's chat template.

    Args:
        template: the Jinja2 template (CHATML_TEMPLATE when the model has none).
        messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...].
        add_generation_prompt: end with the header of an assistant turn, for generation.
        bos_token: the BOS text, for templates that write it (tokenize with parse_special).
        eos_token: the EOS text, likewise.
        **extra: further template variables (tools, documents, ...).

    Returns:
        The prompt text. Raises InvalidOptionError for malformed messages or a conversation the
        template refuses (its raise_exception), ModelFormatError for a broken template.
    """
    validate_messages(messages)
    if not isinstance(template, str):
        raise ModelFormatError(f"chat template must be a str, got {type(template).__name__}")
    from jinja2 import TemplateSyntaxError

    try:
        compiled = _compile(template)
    except TemplateSyntaxError as e:
        raise ModelFormatError(
            f"chat template does not parse: {one_line(e.message)} (line {e.lineno})"
        ) from None
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except _TemplateRaised as e:
        raise InvalidOptionError(
            f"the chat template refused the messages: {one_line(e)}"
        ) from None
    except Exception as e:  # the template is the model's code: whatever it raises, it is broken
        raise ModelFormatError(
            f"chat template failed: {type(e).__name__}: {one_line(e)}"
        ) from None


