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

from grpc_harness import LoopThread, free_port, start_full_server
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config

BASE = "tiny"
ADMIN, USER = "admin-key-0001", "user-key-0001"


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": str(free_port()),
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "32MiB", "max_num_seqs": "4",
        "max_total_tokens": "1024", "max_input_tokens": "768", "max_new_tokens": "200",
        "served_model_name": BASE, "api_keys": [USER], "admin_keys": [ADMIN]}, {})
    running = loop.run(start_full_server(config))
    loop.run(start_http_api(running, config, port=0))
    yield running
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


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
