"""Tool-call formats (`--tool-call-parser`): read calls out of a model's text, write them back
into prompts, and force them with a grammar (tool_choice "required" / a named function).

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Hermes, Qwen 2.5/3, chatml)
    llama3_json   {"name": ..., "parameters": {...}}                         (Llama 3.1-3.3)
    mistral       [TOOL_CALLS][{"name": ..., "arguments": {...}}]            (Mistral, Mixtral)
    auto          picked from the chat template's text (hermes when it shows none)
"""

from __future__ import annotations

import json
from typing import Callable

from .base import Scan, ToolCall, ToolFormat
from .hermes import HermesFormat
from .llama3 import Llama3JsonFormat
from .mistral import MistralFormat
from .stream import Piece, ToolCallStream

FORMATS: dict[str, Callable[[], ToolFormat]] = {"hermes": HermesFormat, "llama3_json": Llama3JsonFormat,
                                                 "mistral": MistralFormat}
PARSER_NAMES = ("auto", *FORMATS)

__all__ = ["FORMATS", "PARSER_NAMES", "Piece", "Scan", "ToolCall", "ToolCallStream", "ToolFormat",
           "keeps_special_tokens", "pick_format", "tool_format"]


def tool_format(name: str) -> ToolFormat:
    """The format of a parser name (not 'auto'); ValueError naming the choices otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call parser {name!r} (use one of {', '.join(PARSER_NAMES)})")
    return FORMATS[name]()


def pick_format(parser: str, chat_template: str | None) -> ToolFormat:
    """The format for `--tool-call-parser` (`auto`: from the chat template's own tool syntax)."""
    if parser != "auto":
        return tool_format(parser)
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralFormat()
    if "<|python_tag|>" in template or ("ipython" in template and "<tool_call>" not in template):
        return Llama3JsonFormat()
    return HermesFormat()


def keeps_special_tokens(fmt: ToolFormat, tools: object | None) -> bool:
    """Whether a request is detokenized with special tokens kept: it has tools (tool_choice not
    "none") and its format reads markers that its model family's tokenizers hold as special
    tokens (Mistral's `[TOOL_CALLS]` and `[ARGS]`); other special tokens then show in its text too,
    the one that ends it does not."""
    return tools is not None and bool(getattr(fmt, "special_markers", ()))


def call_dict(call: ToolCall, call_id: str) -> dict:
    """An OpenAI `tool_calls` entry."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def parse_arguments(call: ToolCall) -> dict:
    return json.loads(call.arguments)
