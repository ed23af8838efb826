"""Chat rendering with options (chat_template.py): the same ids as transformers for a plain
chat, kwargs / tools / tool calls / documents reaching the template, the fallback for templates
without tool support, continue_final_message, and untrusted templates in the worker process
under time, memory and size limits."""

from __future__ import annotations

import json

import pytest

from loraplex.server.engine.chat_options import ChatOptions
from loraplex.server.engine.chat_template import ChatRenderer, TemplateLimits
from loraplex.server.engine.template_worker import TemplateError

CHAT = (("system", "Be brief."), ("user", "Weather in Paris?"))
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# the tool part of Qwen2.5's template, shortened
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function.name }}:{{ c.function.arguments.city }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def renderer(default_model_dir):
    from transformers import AutoTokenizer

    chat = ChatRenderer(AutoTokenizer.from_pretrained(default_model_dir), TemplateLimits(timeout_s=1.0))
    yield chat
    chat.sandbox.close()


def test_plain_options_give_transformers_ids(renderer):
    expected = renderer.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in CHAT],
                                                      add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert renderer.ids(CHAT, ChatOptions()) == list(expected)


def test_kwargs_tools_and_tool_calls_reach_a_template_with_tool_support(renderer):
    history = (*CHAT, ("assistant", ""), ("tool", "18C"))
    fields = ("", "", json.dumps({"tool_calls": [CALL]}), json.dumps({"tool_call_id": "call_1"}))
    text = renderer.render_text(history, ChatOptions(message_fields=fields, tools=json.dumps(TOOLS),
                                                     chat_template="{{ greeting }}|" + TOOL_TEMPLATE,
                                                     template_kwargs=json.dumps({"greeting": "hi"})))
    assert text.startswith('hi|<tools>{"type": "function"')
    assert "<|assistant|><tool_call>get_weather:Paris</tool_call><|tool|>18C<|assistant|>" in text


def test_template_without_tool_support_gets_tools_and_calls_as_text(renderer):
    history = (*CHAT, ("assistant", ""), ("tool", "18C"))
    fields = ("", "", json.dumps({"tool_calls": [CALL]}), json.dumps({"tool_call_id": "call_1"}))
    text = renderer.render_text(history, ChatOptions(message_fields=fields, tools=json.dumps(TOOLS)))
    assert "Be brief.\n\nYou may call one or more functions" in text and '"name": "get_weather"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>" in text


def test_continue_final_message_and_add_generation_prompt(renderer):
    history = (*CHAT, ("assistant", "It is"))
    text = renderer.render_text(history, ChatOptions(add_generation_prompt=False, continue_final_message=True))
    assert text.endswith("<|im_start|>assistant\nIt is")
    assert not renderer.render_text(CHAT, ChatOptions(add_generation_prompt=False)).endswith("assistant\n")
    with pytest.raises(TemplateError, match="cannot both"):
        renderer.render_text(history, ChatOptions(continue_final_message=True))
    with pytest.raises(TemplateError, match="may not set 'messages'"):
        renderer.render_text(CHAT, ChatOptions(template_kwargs='{"messages": []}'))


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "over the limit"),
    ("{% set s = 'x' * 10**10 %}{{ s|length }}", "memory"),
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{% for m in messages %}", "does not compile"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("x" * (300 * 1024), "limit is"),
])
def test_untrusted_templates_are_bounded_and_the_renderer_recovers(renderer, template, words):
    with pytest.raises(TemplateError, match=words):
        renderer.render_text(CHAT, ChatOptions(chat_template=template))
    assert renderer.render_text(CHAT, ChatOptions(chat_template="{{ messages[1].content }}")) == "Weather in Paris?"
