"""Agent-client features over the OpenAI-compatible HTTP API with the real `openai` package:
tool calling (a whole tool loop under tool_choice "required" / a named function, where
constrained decoding makes even the tiny random model write a valid call), chat-template
options, vLLM's `structured_outputs`, and 400s naming the parameter."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from grpc_harness import served_http

BASE = "tiny"
ADMIN, USER = "admin-key-0001", "user-key-0001"


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    with served_http({"model": str(tiny_llama_dir), "store": str(tmp_path_factory.mktemp("store")),
                      "kv_cache_memory": "32MiB", "max_num_seqs": "4", "max_total_tokens": "1024",
                      "max_input_tokens": "768", "max_new_tokens": "200", "served_model_name": BASE,
                      "api_keys": [USER], "admin_keys": [ADMIN], "reasoning_parser": "think"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key=USER, max_retries=0, timeout=120)
    yield sdk
    sdk.close()


def test_structured_outputs_vllm_field(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Status?"}],
                                           max_tokens=32, extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    choice = client.completions.create(model=BASE, prompt="Pick:", max_tokens=8, seed=2,
                                       extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert choice.choices[0].text in ("left", "right")
    regex = client.completions.create(model=BASE, prompt="Code:", max_tokens=16,
                                      extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", regex.choices[0].text)
    grammar = client.completions.create(model=BASE, prompt="List:", max_tokens=32, temperature=0,
                                        extra_body={"structured_outputs": {"grammar": 'start: "(" /[xy]/ ")"'}})
    assert re.fullmatch(r"\([xy]\)", grammar.choices[0].text)


@pytest.mark.parametrize("value, param", [
    ({"json": {"type": "object"}, "regex": "a"}, "structured_outputs"),
    ({"structural_tag": "x"}, "structured_outputs.structural_tag"),
    ({"choice": "yes"}, "structured_outputs.choice"),
    ("json", "structured_outputs"),
])
def test_structured_outputs_errors_name_the_field(client, value, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt="x", max_tokens=4, extra_body={"structured_outputs": value})
    assert caught.value.body["param"] == param


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "string", "enum": ["CET", "UTC"]}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def _answer_with_result(client, call, stream):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})}]
    reply = client.chat.completions.create(model=BASE, messages=history, tools=[WEATHER, CLOCK], max_tokens=12,
                                           temperature=0, stream=stream, tool_choice="none")
    if stream:
        chunks = [c for c in reply if c.choices]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.tool_calls is None
    assert reply.usage.prompt_tokens > 40                  # the tool call and its result are in the prompt
    return reply.choices[0].message.content


def test_tool_loop_with_required_tool_choice(client):
    reply = client.chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, seed=5)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _valid(call, WEATHER if call.function.name == "get_weather" else CLOCK)
    assert isinstance(_answer_with_result(client, call, stream=False), str)


def test_tool_loop_streamed_with_a_named_function(client):
    stream = client.chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True, temperature=0)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta_call.id or ""
            entry["name"] += (delta_call.function.name or "") if delta_call.function else ""
            entry["arguments"] += (delta_call.function.arguments or "") if delta_call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    # the same through the openai package's stream helper, which assembles the calls itself
    with client.chat.completions.stream(model=BASE, messages=ASK, tools=[WEATHER], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=80, temperature=0) as helper:
        final = helper.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    _valid(call, WEATHER)
    assert isinstance(_answer_with_result(client, call, stream=True), str)


def test_parallel_required_calls_all_validate(client):
    reply = client.chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                           max_tokens=200, seed=11, n=2)
    for choice in reply.choices:
        if choice.finish_reason == "length":
            continue                                     # 8 calls allowed; a random model may not stop in time
        assert choice.finish_reason == "tool_calls" and 1 <= len(choice.message.tool_calls) <= 8
        for call in choice.message.tool_calls:
            _valid(call, WEATHER if call.function.name == "get_weather" else CLOCK)


def test_auto_parses_a_call_after_the_reasoning_and_keeps_invalid_ones_as_text(client):
    """The model's text is forced with a grammar (a random model writes no call by itself)."""
    good = '<think>need weather</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    for text, stream in ((good, False), (good, True), (bad, False)):
        grammar = "start: " + json.dumps(text)
        reply = client.chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER], max_tokens=120, stream=stream,
                                               extra_body={"structured_outputs": {"grammar": grammar}})
        if stream:
            chunks = [c for c in reply if c.choices]
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            message = reply.choices[0].message
            reasoning, calls, content = message.reasoning_content, message.tool_calls or [], message.content
            finish = reply.choices[0].finish_reason
        if text is good:
            assert reasoning == "need weather" and finish == "tool_calls" and not (content or "").strip()
            assert [c.function.name for c in calls] == ["get_weather"]
            assert json.loads(calls[0].function.arguments) == {"city": "Lima", "unit": "celsius"}
        else:                                  # "Oslo" is not in the enum: the call comes back as text
            assert calls == [] and content == text and finish == "stop"


def test_reasoning_content_streamed_and_not(client):
    regex = {"regex": "<think>[a-z]{3,6}</think>[a-z]{2,5}"}
    reply = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=40, seed=3,
                                           extra_body={"structured_outputs": regex})
    message = reply.choices[0].message
    assert re.fullmatch("[a-z]{3,6}", message.reasoning_content) and re.fullmatch("[a-z]{2,5}", message.content)
    chunks = [c for c in client.chat.completions.create(model=BASE, messages=ASK, max_tokens=40, seed=3, stream=True,
                                                        extra_body={"structured_outputs": regex}) if c.choices]
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == message.reasoning_content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content


def test_chat_template_kwargs_reach_the_template(served, client, default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    admin = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key=ADMIN, max_retries=0)
    template = "{% for i in range(repeat) %}{{ word }} {% endfor %}{{ messages[-1].content }}"
    for repeat in (1, 5):
        reply = admin.chat.completions.create(model=BASE, messages=ASK, max_tokens=2, extra_body={
            "chat_template": template, "chat_template_kwargs": {"repeat": repeat, "word": "hello"}})
        expected = tokenizer("hello " * repeat + ASK[0]["content"], add_special_tokens=False)["input_ids"]
        assert reply.usage.prompt_tokens == len(expected)
    base = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=2)
    options = client.chat.completions.create(model=BASE, messages=ASK + [{"role": "assistant", "content": "It is"}],
                                             max_tokens=2, extra_body={"continue_final_message": True,
                                                                       "add_generation_prompt": False})
    assert options.usage.prompt_tokens == base.usage.prompt_tokens + len(tokenizer("It is")["input_ids"])
    admin.close()


@pytest.mark.parametrize("kwargs, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_wether"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}]},
     "tools.0.function.parameters", "not a valid JSON Schema"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0", "function tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"extra_body": {"chat_template": "{{ messages }}"}}, "chat_template", "admin key"),
    ({"extra_body": {"chat_template_kwargs": {"messages": []}}}, "messages", "may not set"),
    ({"messages": ASK + [{"role": "tool", "content": "18"}]}, "messages.1.tool_call_id", "tool_call_id"),
])
def test_bad_tool_and_template_requests_get_a_400_naming_the_field(client, kwargs, param, words):
    kwargs = {"messages": ASK, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE, max_tokens=4, **kwargs)
    assert caught.value.body["param"] == param and words in caught.value.body["message"]


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("x" * (300 * 1024), "limit is"),
])
def test_admin_templates_that_loop_or_are_too_big_get_a_400(served, client, template, words):
    admin = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key=ADMIN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        admin.chat.completions.create(model=BASE, messages=ASK, max_tokens=2, extra_body={"chat_template": template})
    assert caught.value.body["param"] == "chat_template" and words in caught.value.body["message"]
    assert client.chat.completions.create(model=BASE, messages=ASK, max_tokens=2).choices[0].message.content is not None
    admin.close()


# ---- the Responses API ---------------------------------------------------------------------
RESPONSE_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                 "parameters": WEATHER["function"]["parameters"], "strict": True}


def test_responses_create_text_json_schema_and_a_function_call_loop(client):
    plain = client.responses.create(model=BASE, input="Say hi", instructions="Be brief.", max_output_tokens=6,
                                    temperature=0)
    assert plain.object == "response" and plain.status in ("completed", "incomplete")
    assert plain.output_text == plain.output[0].content[0].text and plain.usage.output_tokens <= 6
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    shaped = client.responses.create(model=BASE, input=[{"role": "user", "content": "Status?"}], max_output_tokens=30,
                                     text={"format": {"type": "json_schema", "name": "status", "schema": schema}})
    jsonschema.validate(json.loads(shaped.output_text), schema)
    called = client.responses.create(model=BASE, input="Weather in Paris?", tools=[RESPONSE_TOOL],
                                     tool_choice="required", parallel_tool_calls=False, max_output_tokens=80)
    call = called.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), RESPONSE_TOOL["parameters"])
    final = client.responses.create(model=BASE, tools=[RESPONSE_TOOL], max_output_tokens=8, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18}'}])
    assert final.usage.input_tokens > called.usage.input_tokens      # the call and its result are in the prompt


def test_responses_stream_helper_and_raw_events(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    with client.responses.stream(model=BASE, input="Status?", max_output_tokens=40, temperature=0,
                                 text={"format": {"type": "json_schema", "name": "s", "schema": schema}}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.status == "completed"
    jsonschema.validate(json.loads(final.output_text), schema)
    with client.responses.stream(model=BASE, input="Weather?", tools=[RESPONSE_TOOL], max_output_tokens=80,
                                 tool_choice={"type": "function", "name": "get_weather"}) as stream:
        final = stream.get_final_response()
    call = [item for item in final.output if item.type == "function_call"][0]
    jsonschema.validate(json.loads(call.arguments), RESPONSE_TOOL["parameters"])
    events = [e.type for e in client.responses.create(model=BASE, input="hi", max_output_tokens=3, stream=True)]
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.incomplete"
    assert "response.output_text.delta" in events


@pytest.mark.parametrize("kwargs, param, words", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "stateless"),
    ({"tools": [{"type": "web_search"}]}, "tools.0", "function tools"),
    ({"input": [{"type": "image", "url": "x"}]}, "input.0.type", "not supported"),
    ({"tools": [RESPONSE_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not in tools"),
    ({"max_output_tokens": 100000}, "max_output_tokens", ""),
])
def test_responses_errors_name_the_field(client, kwargs, param, words):
    kwargs = {"input": "hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=BASE, **kwargs)
    assert caught.value.body["param"] == param and words in caught.value.body["message"]


def test_readme_tool_call_example_runs(client):
    """The README's tool-call block (in "Use it with the OpenAI SDK"), against this server."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use it with the OpenAI SDK", 1)[1].split("\n## ", 1)[0]
    code = next(block for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if "tool_choice" in block)
    scope = {"client": client}
    exec(compile(code.replace('"support-tone"', repr(BASE)), "README.md", "exec"), scope)
    assert scope["reply"].choices[0].finish_reason == "tool_calls" and scope["call"].function.name == "get_weather"
    assert scope["answer"].usage.prompt_tokens > scope["reply"].usage.prompt_tokens


# ---- the same over gRPC, through the SDK -----------------------------------------------------
def test_grpc_tool_loop_and_chat_template_kwargs_through_the_sdk(served):
    from loraplex.client import Client, FinishReason, ValidationError

    with Client(f"127.0.0.1:{served.port}", api_key=USER, timeout=120) as sdk:
        reply = sdk.chat(ASK, tools=[WEATHER, CLOCK], tool_choice="get_weather", max_new_tokens=80)
        assert reply.finish_reason is FinishReason.TOOL_CALLS and reply.text == "" and len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert call.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(call.parsed_arguments(), WEATHER["function"]["parameters"])
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
        answer = sdk.chat(history, tools=[WEATHER], max_new_tokens=4)
        assert answer.usage.prompt_tokens > reply.usage.prompt_tokens and answer.tool_calls == []
        chunks = list(sdk.chat_stream(ASK, tools=[{"name": "get_time", "parameters": CLOCK["function"]["parameters"]}],
                                      tool_choice="required", parallel_tool_calls=False, max_new_tokens=60))
        calls = [c for chunk in chunks for c in chunk.tool_calls]
        assert chunks[-1].finish_reason is FinishReason.TOOL_CALLS and [c.name for c in calls] == ["get_time"]
        plain = sdk.chat(ASK, max_new_tokens=2, chat_template_kwargs={"unused_flag": True})
        assert plain.usage.prompt_tokens == sdk.chat(ASK, max_new_tokens=2).usage.prompt_tokens
        with pytest.raises(ValidationError) as caught:
            sdk.chat(ASK, tools=[WEATHER], tool_choice="get_wether", max_new_tokens=2)
        assert "input.chat.tool_choice" in caught.value.violations
        with pytest.raises(ValidationError) as caught:
            sdk.chat(ASK, tools=[{"name": "f", "parameters": {"type": "strnig"}}], max_new_tokens=2)
        assert "input.chat.tools[0].parameters" in caught.value.violations
