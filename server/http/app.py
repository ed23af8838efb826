"""The OpenAI-compatible FastAPI app over the gRPC services' ServiceState (same engine, store,
keys, metrics): one scheduler and one batch for both APIs."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..config import ServerConfig
from ..engine.io import RequestOutput
from ..service.state import ServiceState
from .auth import authenticate
from .convert import chat_request, completion_request, parse_body
from .errors import ApiError, bad_request, to_api_error
from .generate import CHAT, COMPLETIONS, Endpoint, respond
from .models import list_models, load_adapter, unload_adapter
from .schemas import DetokenizeRequest, LoadLoraRequest, TokenizeRequest, UnloadLoraRequest
from .tokens import detokenize, token_text, tokenize


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body; 413 above `limit` bytes (checked before and while reading), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit} (--max-message-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-message-bytes)")
    try:
        return json.loads(body)
    except ValueError as error:
        raise bad_request(None, f"the request body is not valid JSON: {error}") from None


class HttpApi:
    """Route handlers; everything they share lives on the gRPC side's ServiceState."""

    def __init__(self, state: ServiceState, config: ServerConfig):
        self.state = state
        self.config = config
        self.base_name = config.base_model_name
        self.limits = config.request_limits()
        self.started = int(time.time())

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

    async def generate(self, request: Request, endpoint: Endpoint) -> Response:
        record = self.recorder(endpoint.method)
        try:
            principal = authenticate(self.state.keys, request)
            data = await read_json(request, self.config.max_message_bytes)
            engine = self.state.require_engine()
            convert = chat_request if endpoint is CHAT else completion_request
            parsed = convert(data, self.base_name, principal.tenant, self.limits,
                             lambda: uuid.uuid4().hex)
        except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
            mapped = to_api_error(error, endpoint.prompt_param)
            record(str(mapped.status), None, None)
            return mapped.response()
        text_of = token_text(engine, bool(parsed.body.return_tokens_as_token_ids))
        metrics = self.state.metrics
        return await respond(engine, parsed, request, endpoint, text_of, record,
                             metrics.token_delta if metrics is not None else None)

    async def models(self, request: Request) -> dict:
        principal = authenticate(self.state.keys, request)
        return await list_models(self.state, principal.tenant, self.base_name, self.started)

    async def model(self, request: Request, model_id: str) -> dict:
        for card in (await self.models(request))["data"]:
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")

    async def tokenize(self, request: Request) -> dict:
        authenticate(self.state.keys, request)
        body = parse_body(TokenizeRequest, await read_json(request, self.config.max_message_bytes))
        return await tokenize(self.state.require_engine(), body, self.config.max_total_tokens)

    async def detokenize(self, request: Request) -> dict:
        authenticate(self.state.keys, request)
        body = parse_body(DetokenizeRequest, await read_json(request, self.config.max_message_bytes))
        return await detokenize(self.state.require_engine(), body)

    async def load(self, request: Request) -> PlainTextResponse:
        principal = authenticate(self.state.keys, request, admin=True)
        body = parse_body(LoadLoraRequest, await read_json(request, self.config.max_message_bytes))
        return PlainTextResponse(await load_adapter(self.state, body, principal.tenant))

    async def unload(self, request: Request) -> PlainTextResponse:
        principal = authenticate(self.state.keys, request, admin=True)
        body = parse_body(UnloadLoraRequest, await read_json(request, self.config.max_message_bytes))
        return PlainTextResponse(await unload_adapter(self.state, body, principal.tenant))

    async def reset_prefix_cache(self, request: Request) -> JSONResponse:
        """Admin, like vLLM's POST /reset_prefix_cache: forget every cached prefix block."""
        authenticate(self.state.keys, request, admin=True)
        return JSONResponse({"reset": await self.state.require_engine().reset_prefix_cache()})

    def ready(self) -> JSONResponse:
        if self.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if self.state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
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
