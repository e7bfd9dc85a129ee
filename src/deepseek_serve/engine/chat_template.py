"""Chat templates rendered like Hugging Face's `apply_chat_template`, in a sandboxed Jinja environment.

The template comes from the model (GGUF metadata `tokenizer.chat_template` or the checkpoint's
`tokenizer_config.json`) or from `DS_CHAT_TEMPLATE`. Sandboxing matters: templates ship with
downloaded models and must not reach Python internals.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deepseek_serve.engine.errors import InvalidRequestError

THINK_OPEN = "<think>"


class TemplateError(InvalidRequestError):
    """The template refused the conversation (`raise_exception`) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}", param="messages")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # same defaults as transformers' template `tojson` (non-ASCII kept as is).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special tokens it refers to."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"invalid chat template: {exc}") from exc

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed to render: {exc}", param="messages") from exc

    @property
    def prefills_think(self) -> bool:
        """True when the generation prompt ends in `<think>` (DeepSeek-R1's newest template)."""
        probe = self.render([{"role": "user", "content": "x"}], add_generation_prompt=True)
        return probe.rstrip().endswith(THINK_OPEN)

    @property
    def is_reasoning(self) -> bool:
        """Templates that know about `</think>` belong to reasoning models (DeepSeek-R1 family)."""
        return "</think>" in self.source
