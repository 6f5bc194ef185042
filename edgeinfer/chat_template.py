"""Chat templates: Jinja2 in a sandbox, with the helpers Hugging Face templates expect."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                         template_vars: dict[str, str]) -> str:
    """Render `messages` the way transformers' apply_chat_template(tokenize=False) does."""
    if not template:
        raise ChatTemplateError("the model has no chat template (use --raw to send the prompt as is)")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **template_vars)
    except ChatTemplateError:
        raise
    except Exception as exc:  # a template is code: any failure inside it is the template's
        raise ChatTemplateError(f"chat template failed to render: {exc}") from None
