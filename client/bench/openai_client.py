"""`loraplex bench --api openai`: the same workloads over the OpenAI-compatible HTTP API.

`OpenAIBenchClient` streams `/v1/completions` (SSE, `stream_options.include_usage`) and yields
chunks the bench runner reads like the gRPC SDK's: the engine sends one SSE chunk per output
delta (one token per decode step), and the closing usage chunk adds any tokens the deltas
did not account for, so token counts are the server's. Needs `httpx` (in `loraplex[dev]`, or
`pip install httpx`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc

from ..errors import LoraplexError
from ..types import Usage

# HTTP status -> the gRPC code name the bench report groups errors by
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE}


@dataclass(frozen=True)
class HttpChunk:
    """One SSE event's share of the output, shaped for the bench runner."""

    num_tokens: int
    usage: Usage | None = None
    text: str = ""


def _error(status: int, body: str) -> LoraplexError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200]
    return LoraplexError(f"HTTP {status}: {message}", _CODES.get(status, grpc.StatusCode.UNKNOWN))


class OpenAIBenchClient:
    """Async context manager over one pooled httpx client; `base_url` ends with /v1."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0,
                 verify: Any = True):
        try:
            import httpx
        except ImportError:
            raise ValueError("--api openai needs httpx: pip install httpx") from None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                       verify=verify, limits=httpx.Limits(max_connections=None,
                                                                          max_keepalive_connections=None))
        self.base_model: str | None = None

    async def __aenter__(self) -> "OpenAIBenchClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._http.aclose()

    async def health(self) -> None:
        """GET /models: checks the server answers and learns the base model's name (the first entry)."""
        import httpx

        try:
            reply = await self._http.get("/models")
        except httpx.HTTPError as error:
            raise LoraplexError(f"cannot reach {self._http.base_url}: {error}",
                                grpc.StatusCode.UNAVAILABLE) from None
        if reply.status_code != 200:
            raise _error(reply.status_code, reply.text)
        self.base_model = reply.json()["data"][0]["id"]

    async def generate_stream(self, prompt: str, adapter_id: str | None = None, timeout: float | None = None,
                              max_new_tokens: int = 64, temperature: float = 0.0,
                              ignore_eos: bool = False) -> AsyncIterator[HttpChunk]:
        body = {"model": adapter_id or self.base_model, "prompt": prompt, "max_tokens": max_new_tokens,
                "temperature": temperature, "ignore_eos": ignore_eos, "stream": True,
                "stream_options": {"include_usage": True}}
        async with self._http.stream("POST", "/completions", json=body, timeout=timeout) as reply:
            if reply.status_code != 200:
                raise _error(reply.status_code, (await reply.aread()).decode(errors="replace"))
            counted = 0
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                payload = json.loads(data)
                if "error" in payload:
                    raise LoraplexError(payload["error"].get("message", "stream error"), grpc.StatusCode.INTERNAL)
                if payload.get("choices"):
                    counted += 1
                    yield HttpChunk(1, text=payload["choices"][0].get("text") or "")
                elif payload.get("usage"):
                    usage = payload["usage"]
                    yield HttpChunk(max(0, usage["completion_tokens"] - counted),
                                    Usage(prompt_tokens=usage["prompt_tokens"],
                                          generated_tokens=usage["completion_tokens"],
                                          cached_tokens=(usage.get("prompt_tokens_details") or {})
                                          .get("cached_tokens", 0)))
