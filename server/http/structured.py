"""Hook for structured output (`response_format`), called once per completion / chat request.

Today only the default `{"type": "text"}` (or no response_format) is accepted; anything else
is a 400 naming `response_format`. Structured decoding (issue #23) plugs in here: return the
constraint to attach to the engine requests instead of raising.
"""

from __future__ import annotations

from typing import Any

from .errors import unsupported


def structured_output(body: Any) -> Any:
    """The output constraint of a request (None = free text); raises for what is not supported."""
    response_format = body.extras().get("response_format")
    if response_format is None or response_format == {"type": "text"}:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    raise unsupported("response_format", f"type {kind!r}: only 'text' for now")
