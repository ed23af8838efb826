"""Tool-call markers that are special tokens (Mistral's `[TOOL_CALLS]` and `[ARGS]`), end to end.

The scripted model (tests/scripted_model.py) answers every chat with the Mistral v11 call
`[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}` then EOS, where both markers are special tokens:
with them dropped by the detokenizer the call cannot be read. A request with tools is
detokenized with special tokens kept (the EOS that ends it is still left out), over HTTP (the
real `openai` package: chat completions and the Responses API) and gRPC chat; `skip_special_tokens` is also a request field (vLLM's name).
"""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from grpc_harness import served_http
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc
from scripted_model import TOOL_TEXT, build_scripted_llama

BASE = "scripted"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_scripted_llama(tmp_path_factory.mktemp("scripted"))
    with served_http({"model": str(model_dir), "store": str(tmp_path_factory.mktemp("store")),
                      "kv_cache_memory": "8MiB", "max_num_seqs": "4", "max_total_tokens": "256",
                      "max_input_tokens": "128", "max_new_tokens": "16", "served_model_name": BASE}) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key="none", max_retries=0,
                        timeout=60)
    yield sdk
    sdk.close()


def test_chat_with_tools_reads_a_call_written_with_special_token_markers(client):
    reply = client.chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_chat_with_tools_reads_the_call_too(client):
    chunks = list(client.chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER], temperature=0,
                                                 stream=True))
    calls = [c for chunk in chunks for d in chunk.choices for c in (d.delta.tool_calls or [])]
    content = "".join(d.delta.content or "" for chunk in chunks for d in chunk.choices)
    assert calls and calls[0].function.name == "get_weather" and not content
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_responses_api_reads_the_call_too(client):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    reply = client.responses.create(model=BASE, input="Weather in Paris?", tools=[tool], temperature=0)
    [call] = [item for item in reply.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_skip_special_tokens_is_a_request_field(client):
    # a chat without tools, and a chat that asks for special tokens to be skipped: the markers
    # are gone, so the same tokens are plain content
    for extra in ({}, {"skip_special_tokens": True}):
        tools = {} if not extra else {"tools": [WEATHER]}
        reply = client.chat.completions.create(model=BASE, messages=ASK, temperature=0, extra_body=extra, **tools)
        assert reply.choices[0].message.content == 'get_weather{"city": "Paris"}'
        assert reply.choices[0].finish_reason == "stop"
    kept = client.completions.create(model=BASE, prompt="[INST] hi [/INST]", temperature=0,
                                     extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == TOOL_TEXT and kept.choices[0].finish_reason == "stop"   # no "</s>"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt="x", extra_body={"skip_special_tokens": "no"})
    assert caught.value.body["param"] == "skip_special_tokens"


def test_grpc_chat_with_tools_reads_the_call(served):
    tool = gen.Tool(name="get_weather", parameters=json.dumps(WEATHER["function"]["parameters"]))
    chat = gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="Weather in Paris?")], tools=[tool])
    request = gen.GenerateRequest(input=gen.GenerationInput(chat=chat, sampling=gen.SamplingParams(temperature=0)))
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
    assert reply.finish_reason == gen.FINISH_REASON_TOOL_CALLS and not reply.text
    [call] = reply.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_grpc_skip_special_tokens_field_and_sdk_keyword(served):
    from loraplex.client import Client

    with Client(f"127.0.0.1:{served.port}", timeout=60) as client:
        kept = client.generate("[INST] hi [/INST]", temperature=0, skip_special_tokens=False)
        plain = client.generate("[INST] hi [/INST]", temperature=0)
        chat = client.chat([{"role": "user", "content": "Weather?"}], temperature=0, skip_special_tokens=False)
    assert kept.text == TOOL_TEXT and plain.text == 'get_weather{"city": "Paris"}'
    assert chat.text == TOOL_TEXT                       # no tools: nothing parses it
    tool = gen.Tool(name="get_weather", parameters=json.dumps(WEATHER["function"]["parameters"]))
    chat = gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="Weather in Paris?")], tools=[tool])
    explicit = gen.SamplingParams(temperature=0, skip_special_tokens=True)   # the client's word wins
    request = gen.GenerateRequest(input=gen.GenerationInput(chat=chat, sampling=explicit))
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
    assert reply.text == 'get_weather{"city": "Paris"}' and not reply.tool_calls
