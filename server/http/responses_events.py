"""Run a Responses API request (responses_api.py) on the chat pipeline and answer it: one
Response object, or the stream of typed events the openai package's `responses.stream`
assembles (response.created, output_item.added, output_text.delta, ...,
response.completed / response.incomplete)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .convert import ParsedRequest
from .errors import to_api_error
from .generate import ChoiceRunner, Record, _first_outputs, _run_to_end, _states
from .responses import finish_reason, usage_of as chat_usage
from .responses_api import (call_item, message_item, new_id, output_items, reasoning_item, response_object,
                            usage_of)


def _message(parsed: ParsedRequest, text: str, reason: str | None) -> tuple[dict, str | None]:
    if parsed.shaper is not None:
        return parsed.shaper.message(0, text, reason)
    return {"role": "assistant", "content": text}, reason


async def respond_responses(engine: Any, parsed: ParsedRequest, data: dict, request: Request,
                            record: Record) -> Response:
    runner = ChoiceRunner(engine, parsed.choices, request)
    states = _states(parsed)
    response_id = new_id("resp")
    try:
        if parsed.stream:
            early = await _first_outputs(runner, states)
            if early is not None:
                return StreamingResponse(_events(runner, parsed, data, states, early, response_id, record),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            finished = False
        else:
            finished = await _run_to_end(runner, states)
    except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
        await runner.close()
        mapped = to_api_error(error, "input")
        record(str(mapped.status), None, parsed.adapter_id)
        return mapped.response()
    await runner.close()
    if not finished:
        record("499", None, parsed.adapter_id)
        return Response(status_code=499)
    state = states[0]
    record("200", state.last, parsed.adapter_id)
    message, reason = _message(parsed, "".join(state.text), finish_reason(state.last.finish_reason))
    return JSONResponse(response_object(response_id, data, parsed.model, output_items(message), "completed",
                                        usage_of(chat_usage([state])), reason))


class _EventWriter:
    """Numbers events and keeps the open output item (reasoning or message) and the output so far."""

    def __init__(self, response_id: str, data: dict, model: str):
        self.response_id, self.data, self.model = response_id, data, model
        self.sequence = 0
        self.output: list[dict] = []
        self.open: dict | None = None

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def lifecycle(self, kind: str, status: str, usage: dict | None = None, reason: str | None = None) -> str:
        body = response_object(self.response_id, self.data, self.model, list(self.output), status, usage, reason)
        return self.event(kind, response=body)

    def text(self, kind: str, delta: str) -> list[str]:
        """Events adding `delta` to the open item of `kind` (reasoning / message), opening it first."""
        events = []
        if self.open is not None and self.open["type"] != kind:
            events += self.close()
        index = len(self.output)
        if self.open is None:
            item_id = new_id("rs" if kind == "reasoning" else "msg")
            item = reasoning_item("", item_id) if kind == "reasoning" else message_item(item_id, "", "in_progress")
            self.open = item
            shown = {**item, "content": []}
            events.append(self.event("response.output_item.added", output_index=index, item=shown))
            part = item["content"][0]
            events.append(self.event("response.content_part.added", item_id=item_id, output_index=index,
                                     content_index=0, part=part))
        self.open["content"][0]["text"] += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self.event(name, item_id=self.open["id"], output_index=index, content_index=0, delta=delta,
                                 **extra))
        return events

    def close(self) -> list[str]:
        if self.open is None:
            return []
        item, index = self.open, len(self.output)
        self.open = None
        part = item["content"][0]
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        extra = {} if item["type"] == "reasoning" else {"logprobs": []}
        if item["type"] == "message":
            item["status"] = "completed"
        self.output.append(item)
        return [self.event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=item)]

    def call(self, call: dict) -> list[str]:
        events = self.close()
        index = len(self.output)
        item = call_item(call)
        events.append(self.event("response.output_item.added", output_index=index,
                                 item={**item, "arguments": "", "status": "in_progress"}))
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=item["arguments"]))
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=item["name"], arguments=item["arguments"]))
        self.output.append(item)
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


async def _events(runner: ChoiceRunner, parsed: ParsedRequest, data: dict, states: dict, early: list,
                  response_id: str, record: Record) -> AsyncIterator[str]:
    writer = _EventWriter(response_id, data, parsed.model)
    outcome = "499"
    try:
        yield writer.lifecycle("response.created", "in_progress")
        yield writer.lifecycle("response.in_progress", "in_progress")
        pending = list(early)
        while True:
            item = pending.pop(0) if pending else await runner.next()
            if item is None:
                return
            _, output = item
            states[0].add(output)
            reason = finish_reason(output.finish_reason)
            if parsed.shaper is not None:
                delta, reason = parsed.shaper.delta(0, output.text, output.finished, reason)
            else:
                delta = {"content": output.text} if output.text else {}
            for event in _delta_events(writer, delta):
                yield event
            if output.finished:
                for event in writer.close():
                    yield event
                kind = "response.incomplete" if reason == "length" else "response.completed"
                outcome = "200"
                yield writer.lifecycle(kind, "incomplete" if reason == "length" else "completed",
                                       usage_of(chat_usage([states[0]])), reason)
                return
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
        mapped = to_api_error(error, "input")
        outcome = str(mapped.status)
        yield writer.event("error", code=mapped.code, message=mapped.message, param=mapped.param)
    finally:
        await runner.close()
        record(outcome, states[0].last if outcome == "200" else None, parsed.adapter_id)


def _delta_events(writer: _EventWriter, delta: dict) -> list[str]:
    events = []
    if delta.get("reasoning_content"):
        events += writer.text("reasoning", delta["reasoning_content"])
    if delta.get("content"):
        events += writer.text("message", delta["content"])
    for call in delta.get("tool_calls") or []:
        events += writer.call(call)
    return events
