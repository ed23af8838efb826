"""The OpenAI-compatible FastAPI app: thin translators over the front door (server/frontdoor/),
which the gRPC services share (same engine, store, keys, limits, error rules, metrics).

Each route: authenticate the bearer key, read the body (bounded, on the event loop), decode and
convert it on the front door's parse pool, call one front-door operation, and answer; every
error becomes OpenAI's error shape here (no exception reaches uvicorn, so client errors never
log a traceback).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..config import ServerConfig
from ..engine.io import RequestOutput
from ..engine.tool_parsers import pick_format
from ..frontdoor import admin, tokens
from ..frontdoor.access import Operation, Principal, Role, authorize
from ..service.state import ServiceState
from . import responses_api
from .auth import authenticate
from .convert import ChatSetup, chat_messages, chat_request, completion_request, parse_body, resolve_model
from .errors import ApiError, bad_request, body_too_large, to_api_error, too_large_to_drain
from .generate import CHAT, COMPLETIONS, Endpoint, respond
from .models import model_cards
from .responses_events import respond_responses
from .schemas import DetokenizeRequest, LoadLoraRequest, TokenizeRequest, UnloadLoraRequest
from .tokens import token_text

ADMIN_PARAMS = {"adapter_id": "lora_name", "path": "lora_path"}


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body; 413 above `limit` bytes: by Content-Length before any of it is read (and the
    connection closed, unread, when it declares more than twice the limit), else while reading (a
    chunked body is read up to the limit; connections.py drops at most 2 x `limit` bytes of its
    rest). 408 when it takes more than `timeout_s` to arrive (a half-sent body must not hold
    the connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(f"the request body is {declared} bytes; the limit is {limit} (--max-message-bytes)",
                             too_large_to_drain(int(declared), limit))
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise body_too_large(f"the request body is over the limit of {limit} bytes (--max-message-bytes)")
    except TimeoutError:
        raise ApiError(408, f"the request body took more than {timeout_s:g}s to arrive (--http-body-timeout)",
                       headers={"Connection": "close"}) from None
    return bytes(body)


def decode_json(body: bytes) -> Any:
    """The JSON value of a body; 400 when it is not JSON (or nests too deeply to decode)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise bad_request(None, "the request body is not valid JSON: it nests too deeply") from None
    except ValueError as error:
        raise bad_request(None, f"the request body is not valid JSON: {error}") from None


def answered(params: dict[str, str] | None = None):
    """Route decorator: any error -> OpenAI's error body (param names renamed by `params`)."""
    def wrap(handler: Callable[..., Awaitable[Any]]):
        @functools.wraps(handler)
        async def route(*args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
                return to_api_error(error, params=params).response()
        return route
    return wrap


class HttpApi:
    """Route handlers over the ServiceState's FrontDoor."""

    def __init__(self, state: ServiceState, config: ServerConfig):
        self.state = state
        self.door = state.door
        self.config = config
        self.base_name = config.base_model_name
        self.limits = config.request_limits()
        self.started = int(time.time())
        self._tool_format = None

    def chat_setup(self, engine: Any, principal: Principal) -> ChatSetup:
        """The tool-call format (`auto`: from the base model's chat template), reasoning parser, caller's role."""
        if self._tool_format is None:
            self._tool_format = pick_format(self.config.tool_call_parser, engine.info.chat_template)
        return ChatSetup(self._tool_format, self.config.reasoning_parser, principal.role is Role.ADMIN)

    def recorder(self, method: str) -> Callable[[str, RequestOutput | None, str | None], None]:
        def record(code: str, last: RequestOutput | None, adapter: str | None) -> None:
            metrics = self.state.metrics
            if metrics is None:
                return
            finished = last is not None and last.finished
            reason = last.finish_reason.value if finished and last.finish_reason else "none"
            key = last.adapter_key if last is not None else None      # resolved keys only (issue 16)
            engine = self.state.engine
            private = bool(key) and engine is not None and engine.adapter_is_private(key)
            metrics.request_finished(method, code, reason, key, private=private, unresolved=bool(adapter) and not key,
                                     prompt_tokens=last.prompt_tokens if finished else 0,
                                     generated_tokens=last.generated_tokens if finished else 0,
                                     timing=last.timing if finished else None, api="http")
        return record

    async def _body(self, request: Request, model_type: type | None = None) -> Any:
        """Read the body here, decode (and validate into `model_type`) on the parse pool."""
        raw = await read_body(request, self.door.limits.max_body_bytes, self.config.http_body_timeout_s)
        if model_type is None:
            return await self.door.parse(decode_json, raw)
        return await self.door.parse(lambda: parse_body(model_type, decode_json(raw)))

    async def generate(self, request: Request, endpoint: Endpoint) -> Response:
        record = self.recorder(endpoint.method)
        try:
            caller = authorize(authenticate(self.state.keys, request), Operation.GENERATE)
            raw = await read_body(request, self.door.limits.max_body_bytes, self.config.http_body_timeout_s)
            engine = self.door.engine()
            if endpoint is CHAT:
                setup = self.chat_setup(engine, caller)
                parsed = await self.door.parse(lambda: chat_request(
                    decode_json(raw), self.base_name, caller.tenant, self.limits, lambda: uuid.uuid4().hex, setup,
                    front=self.door.limits))
            else:
                parsed = await self.door.parse(lambda: completion_request(
                    decode_json(raw), self.base_name, caller.tenant, self.limits, lambda: uuid.uuid4().hex,
                    self.door.limits))
        except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
            mapped = to_api_error(error, endpoint.prompt_param)
            record(str(mapped.status), None, None)
            return mapped.response()
        text_of = await token_text(engine, bool(parsed.body.return_tokens_as_token_ids),
                                   parsed.adapter_id if parsed.logprobs is not None else None, caller.tenant)
        metrics = self.state.metrics
        return await respond(engine, parsed, request, endpoint, text_of, record,
                             metrics.token_delta if metrics is not None else None)

    async def responses(self, request: Request) -> Response:
        """POST /v1/responses: the Responses API over the chat pipeline (responses_api.py)."""
        record = self.recorder("responses")
        try:
            caller = authorize(authenticate(self.state.keys, request), Operation.GENERATE)
            raw = await read_body(request, self.door.limits.max_body_bytes, self.config.http_body_timeout_s)
            engine = self.door.engine()
            data = await self.door.parse(decode_json, raw)
            setup = self.chat_setup(engine, caller)
            parsed = await self.door.parse(lambda: chat_request(
                responses_api.chat_body(data), self.base_name, caller.tenant, self.limits, lambda: uuid.uuid4().hex,
                setup, front=self.door.limits))
        except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
            mapped = to_api_error(error, "input")
            if mapped.param == "messages" or (mapped.param or "").startswith("messages."):
                mapped.param = "input"
            elif mapped.param in ("max_tokens", "response_format"):
                mapped.param = {"max_tokens": "max_output_tokens", "response_format": "text.format"}[mapped.param]
            record(str(mapped.status), None, None)
            return mapped.response()
        return await respond_responses(engine, parsed, data, request, record)

    async def _models(self, request: Request) -> dict:
        records = await admin.list_versions(self.door, authenticate(self.state.keys, request))
        return {"object": "list", "data": model_cards(records, self.base_name, self.started)}

    @answered()
    async def models(self, request: Request) -> dict:
        return await self._models(request)

    @answered()
    async def model(self, request: Request, model_id: str) -> dict:
        for card in (await self._models(request))["data"]:
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")

    @answered()
    async def tokenize(self, request: Request) -> dict:
        principal = authenticate(self.state.keys, request)
        authorize(principal, Operation.TOKENIZE)
        body: TokenizeRequest = await self._body(request, TokenizeRequest)
        messages = chat_messages(body.messages) if body.messages is not None else None
        ids = await tokens.tokenize(self.door, principal, body.prompt, messages, body.add_special_tokens is not False,
                                    adapter_id=resolve_model(body.model, self.base_name))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.config.max_total_tokens}

    @answered()
    async def detokenize(self, request: Request) -> dict:
        principal = authenticate(self.state.keys, request)
        authorize(principal, Operation.TOKENIZE)
        body: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        return {"prompt": await tokens.detokenize(self.door, principal, body.tokens,
                                                  adapter_id=resolve_model(body.model, self.base_name))}

    @answered(ADMIN_PARAMS)
    async def load(self, request: Request) -> PlainTextResponse:
        principal = authorize(authenticate(self.state.keys, request), Operation.REGISTER)
        body: LoadLoraRequest = await self._body(request, LoadLoraRequest)
        record = await admin.register(self.door, principal, body.lora_name, body.lora_path, private=body.private)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully "
                                 f"(version {record.version}).")

    @answered(ADMIN_PARAMS)
    async def unload(self, request: Request) -> PlainTextResponse:
        principal = authorize(authenticate(self.state.keys, request), Operation.DELETE)
        body: UnloadLoraRequest = await self._body(request, UnloadLoraRequest)
        admin.raise_problems(admin.name_problems(body.lora_name, "adapter_id", allow_version=False))
        await admin.delete(self.door, principal, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @answered()
    async def reset_prefix_cache(self, request: Request) -> JSONResponse:
        """Admin, like vLLM's POST /reset_prefix_cache: forget every cached prefix block."""
        reset = await admin.reset_prefix_cache(self.door, authenticate(self.state.keys, request))
        return JSONResponse({"reset": reset})

    def ready(self) -> JSONResponse:
        if self.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if self.state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        if not self.state.engine.alive():       # the engine core is restarting, or has stopped
            return JSONResponse({"status": "engine unavailable"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})


def build_app(state: ServiceState, config: ServerConfig) -> FastAPI:
    """The FastAPI app (no docs pages: the API is documented in docs/openai.md)."""
    api = HttpApi(state, config)
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        return to_api_error(error).response()

    async def completions(request: Request) -> Response:
        return await api.generate(request, COMPLETIONS)

    async def chat(request: Request) -> Response:
        return await api.generate(request, CHAT)

    async def health() -> dict:
        return {"status": "ok"}

    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/responses", api.responses, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET"])
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", api.load, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", api.unload, methods=["POST"])
    app.add_api_route("/reset_prefix_cache", api.reset_prefix_cache, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", api.ready, methods=["GET"])
    return app
