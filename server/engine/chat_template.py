"""Chat rendering with options (tools, tool calls in the history, template kwargs, documents,
continue_final_message) and with templates that are not the base model's.

The base model's template is the operator's choice: it renders in this process, in the
sandboxed environment (template_worker.py). A request's or an adapter's template is someone
else's code: it renders in a worker process under an address-space limit and a wall-clock
limit (the worker is killed and restarted when a render runs over), and its source and output
are size-limited. A template without tool support gets the tools as a system prompt and the
calls/results as text in the tool-call format (`ChatOptions.tool_format`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .chat_options import ChatOptions
from .template_worker import TemplateError, render_template

WORKER = Path(__file__).with_name("template_worker.py")
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")


@dataclass(frozen=True)
class TemplateLimits:
    max_template_bytes: int = 256 * 1024        # a template's source
    max_output_chars: int = 4 * 1024 * 1024     # what one render may produce
    timeout_s: float = 2.0                      # wall time of one render in the worker
    start_timeout_s: float = 60.0               # a new worker's start-up (not charged to a render)
    memory_bytes: int = 1024 * 1024 * 1024      # the worker's address space


class TemplateSandbox:
    """One worker process rendering untrusted templates, one render at a time."""

    def __init__(self, limits: TemplateLimits = TemplateLimits()):
        self.limits = limits
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def render(self, source: str, context: dict) -> str:
        request = json.dumps({"source": source, "context": context, "max_bytes": self.limits.max_output_chars})
        with self._lock:
            proc = self._worker()
            try:
                proc.stdin.write(request.encode("utf-8", "surrogatepass") + b"\n")
                proc.stdin.flush()
                line = self._read_line(proc, time.monotonic() + self.limits.timeout_s)
            except BrokenPipeError:
                line = b""
            if not line:
                self._kill()
                raise TemplateError("the chat template used more memory than allowed or crashed its renderer")
            reply = json.loads(line)
        if "error" in reply:
            raise TemplateError(reply["error"])
        return reply["text"]

    def _worker(self) -> subprocess.Popen:
        """The running worker, started if needed and waited for until it says it is ready, so
        that its start-up (Python, jinja2) on a busy machine never counts as a slow render."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-I", str(WORKER), str(self.limits.memory_bytes)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                ready = self._read_line(self._proc, time.monotonic() + self.limits.start_timeout_s)
            except TemplateError:
                ready = b""
            if json.loads(ready or b"{}").get("ready") is not True:
                self._kill()
                raise TemplateError("the chat template renderer could not start; retry shortly")
        return self._proc

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> bytes:
        buffer = bytearray()
        fd = proc.stdout.fileno()
        while not buffer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()
                raise TemplateError(f"the chat template took longer than {self.limits.timeout_s:g}s to render")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            buffer += chunk
        return bytes(buffer)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                pipe.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()


class ChatRenderer:
    """Token ids of a chat with options; the tokenizer's own template unless another is given."""

    def __init__(self, tokenizer: Any, limits: TemplateLimits = TemplateLimits()):
        self.tokenizer = tokenizer
        self.limits = limits
        self.sandbox = TemplateSandbox(limits)

    def render_text(self, messages: Sequence[tuple[str, str]], options: ChatOptions,
                    template: str | None = None) -> str:
        """The prompt text. template: an adapter's own (None = the request's, else the base model's)."""
        source = options.chat_template or template
        trusted = source is None
        source = source or getattr(self.tokenizer, "chat_template", None)
        if not source:
            raise TemplateError("this model's tokenizer has no chat template; send a plain prompt instead")
        if not trusted and len(source.encode("utf-8", "surrogatepass")) > self.limits.max_template_bytes:
            raise TemplateError(f"the chat template is {len(source.encode())} bytes; the limit is "
                                f"{self.limits.max_template_bytes}")
        context = self.context(messages, options, source)
        if trusted:
            text = render_template(source, context, self.limits.max_output_chars)
        else:
            text = self.sandbox.render(source, context)
        return _continued(text, context["messages"]) if options.continue_final_message else text

    def check_adapter_template(self, template: str) -> None:
        """Render a test conversation with an adapter's template in the sandbox, within the limits
        (the adapter store's upload check); raises TemplateError (a ValueError) saying why not."""
        text = self.render_text(_TEST_CONVERSATION, ChatOptions(), template)
        if not text.strip():
            raise TemplateError("it renders an empty prompt")

    def ids(self, messages: Sequence[tuple[str, str]], options: ChatOptions, template: str | None = None,
            check: Callable[[str], None] | None = None) -> list[int]:
        """The rendered chat's token ids; `check` sees the text first (it raises to refuse it)."""
        text = self.render_text(messages, options, template)
        if check is not None:
            check(text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context(self, messages: Sequence[tuple[str, str]], options: ChatOptions, source: str) -> dict:
        """The template's variables (transformers' names), tools folded in when the template has none."""
        from .tool_parsers import tool_format

        conversation = _conversation(messages, options.message_fields)
        tools = _json(options.tools, list, "tools")
        kwargs = _json(options.template_kwargs, dict, "chat_template_kwargs") or {}
        reserved = [name for name in RESERVED if name in kwargs]
        if reserved:
            raise TemplateError(f"chat_template_kwargs may not set {reserved[0]!r}")
        if options.continue_final_message:
            if options.add_generation_prompt:
                raise TemplateError("continue_final_message and add_generation_prompt cannot both be true")
            if not conversation or conversation[-1]["role"] != "assistant":
                raise TemplateError("continue_final_message needs an assistant message at the end")
        uses_tools = tools or any("tool_calls" in m or m["role"] == "tool" for m in conversation)
        if uses_tools and "tools" not in source:
            conversation = _tools_as_text(conversation, tools, tool_format(options.tool_format))
            tools = None
        special = {name: value for name, value in getattr(self.tokenizer, "special_tokens_map", {}).items()
                   if isinstance(value, str)}
        return {**special, **kwargs, "messages": conversation, "tools": tools or None,
                "documents": _json(options.documents, list, "documents"),
                "add_generation_prompt": options.add_generation_prompt}


_TEST_CONVERSATION = (("system", "You are a helpful assistant."), ("user", "Hello!"),
                      ("assistant", "Hi! How can I help?"), ("user", "Say something."))


def _json(text: str, kind: type, name: str) -> Any:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise TemplateError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise TemplateError(f"{name} must be a JSON {kind.__name__}")
    return value


def _conversation(messages: Sequence[tuple[str, str]], fields: Sequence[str]) -> list[dict]:
    if fields and len(fields) != len(messages):
        raise TemplateError(f"{len(fields)} message field entries for {len(messages)} messages")
    conversation = []
    for index, (role, content) in enumerate(messages):
        message: dict[str, Any] = {"role": role, "content": content}
        extra = _json(fields[index], dict, f"messages[{index}] fields") if fields else None
        for name, value in (extra or {}).items():
            message[name] = _template_calls(value, index) if name == "tool_calls" else value
        conversation.append(message)
    return conversation


def _template_calls(calls: Any, index: int) -> list[dict]:
    """OpenAI tool_calls (arguments as JSON text) -> what templates expect (arguments as an object)."""
    result = []
    for call in calls or []:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise TemplateError(f"messages[{index}].tool_calls: arguments are not valid JSON") from None
        result.append({**call, "function": function})
    return result


def _tools_as_text(conversation: list[dict], tools: list | None, fmt: Any) -> list[dict]:
    """For a template without tool support: the tools in the system prompt, calls and results as text."""
    from .tool_parsers import ToolCall

    result = []
    for message in conversation:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            written = fmt.write([ToolCall(c["function"].get("name", ""), json.dumps(c["function"].get("arguments", {})))
                                 for c in calls])
            message["content"] = f"{message['content']}\n{written}" if message.get("content") else written
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        result.append(message)
    if tools:
        example = fmt.write([ToolCall("<function-name>", "<arguments-json-object>")])
        prompt = ("You may call one or more functions to assist with the user query. The functions are:\n" +
                  "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools) +
                  f"\nTo call functions, answer with:\n{example}")
        if result and result[0]["role"] == "system":
            result[0] = {**result[0], "content": f"{result[0]['content']}\n\n{prompt}"}
        else:
            result.insert(0, {"role": "system", "content": prompt})
    return result


def _continued(text: str, conversation: list[dict]) -> str:
    """Cut the rendered chat right after the final message's content (transformers' rule)."""
    final = conversation[-1]["content"] or ""
    if not final.strip() or final.strip() not in text:
        raise TemplateError("continue_final_message: the final message's content is not in the rendered chat")
    if final in text:
        return text[:text.rindex(final) + len(final)]
    stripped = final.strip()
    return text[:text.rindex(stripped) + len(stripped)]
