"""Structured output over the OpenAI-compatible HTTP API (tiny random Llama), with the real
`openai` package: response_format json_schema / json_object, the guided_* extensions,
streaming, and 400s naming the parameter."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from grpc_harness import served_http

BASE = "tiny"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def client(tiny_llama_dir, tmp_path_factory):
    with served_http({"model": str(tiny_llama_dir), "store": str(tmp_path_factory.mktemp("store")),
                      "kv_cache_memory": "32MiB", "max_num_seqs": "4", "max_total_tokens": "1024",
                      "max_input_tokens": "512", "max_new_tokens": "400", "served_model_name": BASE}) as running:
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key="x", max_retries=0,
                            timeout=120)
        yield sdk
        sdk.close()


def _chat(client, **kwargs):
    kwargs.setdefault("max_tokens", 64)
    return client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Status?"}], **kwargs)


def test_response_format_json_schema_and_json_object(client):
    reply = _chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "status", "schema": SCHEMA, "strict": True}}, seed=3)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in _chat(
        client, stream=True, temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "status", "schema": SCHEMA, "strict": False}}) if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert _chat(client, response_format={"type": "text"}, max_tokens=4).choices[0].message.content is not None


def test_guided_extensions_on_completions(client):
    regex = client.completions.create(model=BASE, prompt="Code:", max_tokens=32,
                                      extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", regex.choices[0].text)
    choice = client.completions.create(model=BASE, prompt="Pick:", max_tokens=8, n=3, seed=1,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert all(c.text in ("left", "right") for c in choice.choices)
    schema = client.completions.create(model=BASE, prompt="Status:", max_tokens=64, temperature=0,
                                       extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(schema.choices[0].text), SCHEMA)
    grammar = client.completions.create(model=BASE, prompt="List:", max_tokens=64, temperature=0,
                                        extra_body={"guided_grammar": 'start: "[" /[a-c]/ ("," /[a-c]/)* "]"'})
    assert re.fullmatch(r"\[[a-c](,[a-c])*\]", grammar.choices[0].text)


@pytest.mark.parametrize("kwargs, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format", "strnig"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex",
     "one output constraint"),
    ({"extra_body": {"guided_choice": "yes"}}, "guided_choice", "list of strings"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "response_format", "regex"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"ignore_eos": True}}, "ignore_eos", "constraint"),
])
def test_bad_constraints_are_400_naming_the_parameter(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, **kwargs)
    assert info.value.body["param"] == param and words in info.value.body["message"], info.value.body
