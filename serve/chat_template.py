"""Render chat messages into prompt token ids with the tokenizer's own chat template.

The template already writes the model's special tokens (BOS, role markers), so the rendered text
is tokenized without adding special tokens a second time. `CHAT_TEMPLATE` overrides or supplies a
template for models that ship none (TGI answers "template not found" for those).

This module knows nothing of HTTP: it raises `TemplateError`, which the validation boundary turns
into a 422 `template_error` (docs/api.md, "Errors").
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """No template to render with, or the template raised; the message says which."""


def has_template(tokenizer: Any, override: str | None = None) -> bool:
    """True when messages can be rendered (the tokenizer has a template, or one is configured)."""
    return bool(override or getattr(tokenizer, "chat_template", None))


def template_text(tokenizer: Any, override: str | None = None) -> str | None:
    """The template source that will render (the override, else the tokenizer's own); None if none."""
    template = override or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: transformers renders "default"
        template = template.get("default")
    return template if isinstance(template, str) else None


def render(tokenizer: Any, messages: list[dict[str, Any]], override: str | None = None,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for `messages`, ending with the assistant's generation prompt; `tools` is
    passed to templates that render tools themselves (serve/structured/tool_prompt.py decides).

    Raises `TemplateError` when there is no template or the template raises (many templates
    raise on purpose, e.g. "Conversation roles must alternate").
    """
    if not has_template(tokenizer, override):
        raise TemplateError("template not found")
    try:
        extra = {"tools": tools} if tools is not None else {}
        text = tokenizer.apply_chat_template(
            messages, chat_template=override, add_generation_prompt=True, tokenize=False, **extra
        )
    except Exception as exc:  # jinja2 errors, raise_exception() calls in templates, bad roles
        log.debug("chat template failed", exc_info=True)
        raise TemplateError(str(exc) or type(exc).__name__) from exc
    if not isinstance(text, str):  # some tokenizers return a list when given a batch
        text = text[0]
    return text


def encode_messages(tokenizer: Any, messages: list[dict[str, Any]], override: str | None = None,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Render and tokenize without adding special tokens again (the template wrote them)."""
    text = render(tokenizer, messages, override, tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
