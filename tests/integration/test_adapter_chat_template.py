"""An adapter's own chat template over the real server: used for that adapter's chat requests
(/tokenize, chat completions, Responses), the base model's template for the base and for
adapters without one; shown as a flag in GetAdapter (SDK) and /v1/models; bad ones refused."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from grpc_harness import LoopThread, free_port, make_peft_adapter, start_full_server
from loraplex.client import Client, ValidationError
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config

BASE, ADMIN = "tiny", "admin-key-0001"
TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}[ASSISTANT]"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    roots = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(tiny_llama_dir, roots / "tpl", seed=1)
    (roots / "tpl" / "chat_template.jinja").write_text(TEMPLATE)
    make_peft_adapter(tiny_llama_dir, roots / "plain", seed=2)
    make_peft_adapter(tiny_llama_dir, roots / "loops", seed=3)
    (roots / "loops" / "chat_template.jinja").write_text(
        "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}")
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": str(free_port()),
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "32MiB", "max_num_seqs": "4",
        "max_total_tokens": "1024", "max_input_tokens": "512", "max_new_tokens": "16", "max_loras": "2",
        "served_model_name": BASE, "cpu_kernels": "torch", "admin_keys": [ADMIN]}, {})
    running = loop.run(start_full_server(config))
    loop.run(start_http_api(running, config, port=0))
    with Client(f"127.0.0.1:{running.port}", ADMIN, timeout=120) as sdk:
        sdk.upload_adapter(roots / "tpl", "tpl")
        sdk.upload_adapter(roots / "plain", "plain")
        yield running, sdk, roots
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def _tokenize(served, model: str) -> list[int]:
    reply = httpx.post(f"http://127.0.0.1:{served[0].http_port}/tokenize", timeout=60,
                       headers={"Authorization": f"Bearer {ADMIN}"}, json={"model": model, "messages": CHAT})
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def test_adapter_renders_with_its_own_template_others_with_the_base(served, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    own_text = "[SYSTEM] Be brief.\n[USER] Name a colour.\n[ASSISTANT]"
    own = tokenizer(own_text, add_special_tokens=False)["input_ids"]
    base_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    base = tokenizer(base_text, add_special_tokens=False)["input_ids"]
    assert own != base
    assert _tokenize(served, "tpl") == own
    assert _tokenize(served, "tpl@1") == own
    assert _tokenize(served, "plain") == base
    assert _tokenize(served, BASE) == base
    openai_client = openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].http_port}/v1", api_key=ADMIN,
                                  max_retries=0, timeout=120)
    with openai_client:
        for model, expected in (("tpl", own), ("plain", base), (BASE, base)):
            reply = openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, temperature=0)
            assert reply.usage.prompt_tokens == len(expected), model
        response = openai_client.responses.create(model="tpl", input=CHAT, max_output_tokens=2)
        assert response.usage.input_tokens == len(own)
    sdk = served[1]                                          # gRPC chat
    assert sdk.chat(CHAT, "tpl", max_new_tokens=2).usage.prompt_tokens == len(own)
    assert sdk.chat(CHAT, "plain", max_new_tokens=2).usage.prompt_tokens == len(base)


def test_flag_in_get_adapter_and_models(served):
    _, sdk, _ = served
    assert sdk.get_adapter("tpl").has_chat_template is True
    assert sdk.get_adapter("plain").has_chat_template is False
    cards = httpx.get(f"http://127.0.0.1:{served[0].http_port}/v1/models", timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    flags = {card["id"]: card.get("has_chat_template") for card in cards}
    assert flags["tpl"] is True and flags["tpl@1"] is True and flags["plain"] is False
    assert TEMPLATE not in str(cards)


def test_a_looping_template_is_refused_naming_the_file(served):
    _, sdk, roots = served
    with pytest.raises(ValidationError, match="chat_template.jinja"):
        sdk.upload_adapter(roots / "loops", "loops")
    assert "loops" not in [a.adapter_id for a in sdk.list_adapters()]
    assert sdk.get_adapter("tpl").has_chat_template       # the server keeps serving
