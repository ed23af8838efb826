"""`POST /v1/responses` (OpenAI's Responses API), stateless, over the chat pipeline: the
request becomes a chat completions request (instructions -> a system message, input items ->
messages, function tools -> tools, text.format -> response_format, max_output_tokens ->
max_tokens), runs like one, and its message comes back as Response output items
(reasoning, message, function_call). Streaming: responses_events.py.

Nothing is stored: `store` is answered false, `previous_response_id` is refused (send the
whole conversation as input items instead).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from .errors import bad_request, unsupported

PASSED = ("model", "temperature", "top_p", "parallel_tool_calls", "user", "stream", "seed", "top_k")
ACCEPTED = ("store", "metadata", "truncation", "include", "instructions", "input", "tools", "tool_choice", "text",
            "max_output_tokens", "previous_response_id", "reasoning", "stream_options", "service_tier")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def chat_body(data: Any) -> dict[str, Any]:
    """The chat completions body of a Responses request; 400 naming the Responses field."""
    if not isinstance(data, dict):
        raise bad_request(None, "the request body must be a JSON object")
    unknown = [name for name in data if name not in PASSED + ACCEPTED]
    if unknown:
        raise bad_request(unknown[0], f"unknown parameter '{unknown[0]}'")
    if data.get("previous_response_id"):
        raise bad_request("previous_response_id", "this server keeps no responses (stateless, store: false); "
                                                  "send the earlier turns as input items instead")
    if data.get("truncation") not in (None, "disabled"):
        raise unsupported("truncation", "only 'disabled'")
    if data.get("reasoning") not in (None, {}) and any(v is not None for v in dict(data["reasoning"]).values()):
        raise unsupported("reasoning", "reasoning effort and summaries")
    if data.get("include"):
        raise unsupported("include")
    if data.get("service_tier") not in (None, "auto", "default"):
        raise unsupported("service_tier")
    body: dict[str, Any] = {name: data[name] for name in PASSED if data.get(name) is not None}
    body["messages"] = _messages(data.get("input"), data.get("instructions"))
    if data.get("max_output_tokens") is not None:
        body["max_tokens"] = data["max_output_tokens"]
    if data.get("tools"):
        body["tools"] = [_tool(tool, index) for index, tool in enumerate(data["tools"])] \
            if isinstance(data["tools"], list) else bad(("tools", "tools must be a list"))
    if data.get("tool_choice") is not None:
        body["tool_choice"] = _tool_choice(data["tool_choice"])
    text_format = (data.get("text") or {}).get("format") if isinstance(data.get("text") or {}, dict) else None
    if text_format is not None:
        body["response_format"] = _response_format(text_format)
    if data.get("stream"):
        body["stream_options"] = {"include_usage": True}
    return body


def bad(problem: tuple[str, str]) -> Any:
    raise bad_request(*problem)


def _messages(items: Any, instructions: Any) -> list[dict]:
    messages: list[dict] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("instructions", "instructions must be a string")
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("input", "input must be a string or a non-empty list of items")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"input.{index}", "an input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), index)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)          # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text(output, index)})
        elif kind == "reasoning":
            continue                                             # earlier reasoning is not fed back
        else:
            raise bad_request(f"input.{index}.type", f"input items of type {kind!r} are not supported "
                                                     "(use message, function_call, function_call_output)")
    return messages


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"input.{index}.content", "content must be a string or a list of text parts")
    texts = []
    for part_index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            raise bad_request(f"input.{index}.content.{part_index}", "only text parts (input_text, output_text) "
                                                                     "are supported")
        texts.append(part["text"])
    return "".join(texts)


def _tool(tool: Any, index: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise bad_request(f"tools.{index}", f"only function tools are supported (got {kind!r})")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text_format: Any) -> dict:
    if not isinstance(text_format, dict) or text_format.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("text.format", "text.format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
    if text_format["type"] != "json_schema":
        return {"type": text_format["type"]}
    if not isinstance(text_format.get("schema"), dict):
        raise bad_request("text.format.schema", "json_schema needs a 'schema' (a JSON Schema object)")
    return {"type": "json_schema", "json_schema": {"name": text_format.get("name", "output"),
                                                   "schema": text_format["schema"],
                                                   "strict": text_format.get("strict")}}


def output_items(message: dict, status: str = "completed") -> list[dict]:
    """A chat message (content, reasoning_content, tool_calls) -> Response output items."""
    items: list[dict] = []
    if message.get("reasoning_content"):
        items.append(reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        items.append(message_item(new_id("msg"), message["content"], status))
    for call in message.get("tool_calls") or []:
        items.append(call_item(call))
    return items


def reasoning_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def response_object(response_id: str, data: dict, model: str, output: list[dict], status: str,
                    usage: dict | None, finish_reason: str | None, created: int | None = None) -> dict:
    """The Response object (status in_progress / completed / incomplete)."""
    text = data.get("text") if isinstance(data.get("text"), dict) else {"format": {"type": "text"}}
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    return {"id": response_id, "object": "response", "created_at": created or int(time.time()),
            "status": "incomplete" if incomplete and status == "completed" else status, "error": None,
            "incomplete_details": incomplete, "instructions": data.get("instructions"), "model": model,
            "output": output, "parallel_tool_calls": data.get("parallel_tool_calls", True) is not False,
            "temperature": data.get("temperature"), "top_p": data.get("top_p"),
            "tool_choice": data.get("tool_choice", "auto"), "tools": data.get("tools") or [],
            "max_output_tokens": data.get("max_output_tokens"), "previous_response_id": None,
            "reasoning": None, "store": False, "text": text, "truncation": "disabled",
            "metadata": data.get("metadata") or {}, "user": data.get("user"),
            "usage": usage}


def usage_of(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
            "total_tokens": chat_usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": 0}}
