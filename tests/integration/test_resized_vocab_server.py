"""An adapter with a resized vocabulary through the real server on loopback, both engine modes:
uploaded with its tokenizer files by the SDK (gRPC), its requests tokenized and detokenized
with its tokenizer (gRPC generate and the openai package over HTTP give PEFT's greedy text,
added token included), stop strings matched on that text, its vocabulary size shown by
GetAdapter and /v1/models, and structured output on it refused with INVALID_ARGUMENT / 400."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from grpc_harness import LoopThread, free_port, start_full_server
from loraplex.client import Client, ValidationError
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config
from resized_vocab_helpers import ADDED, PROMPT, make_resized_adapter, resized_reference_model

BASE, ADMIN, NEW_TOKENS = "tiny", "admin-key-0001", 6


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    """(adapter directory, PEFT's greedy text for PROMPT, the adapter's tokenizer)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = make_resized_adapter(tiny_llama_dir, tmp_path_factory.mktemp("resized") / "resized")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(resized_reference_model(tiny_llama_dir, tokenizer), path).eval()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert ADDED[0] in text
    return path, text, tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def served(request, tiny_llama_dir, adapter, tmp_path_factory):
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": str(free_port()),
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "32MiB", "max_num_seqs": "4",
        "max_total_tokens": "512", "max_input_tokens": "256", "max_new_tokens": "16", "max_loras": "2",
        "served_model_name": BASE, "cpu_kernels": "torch", "admin_keys": [ADMIN]}, {})
    running = loop.run(start_full_server(config, engine_process=request.param))
    loop.run(start_http_api(running, config, port=0))
    try:
        with Client(f"127.0.0.1:{running.port}", ADMIN, timeout=120) as sdk:
            info = sdk.upload_adapter(adapter[0], "resized")
            assert info.vocab_size == len(adapter[2]) + (-len(adapter[2])) % 8
            yield running, sdk
    finally:
        loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        loop.close()


def test_grpc_and_openai_generate_the_adapters_text(served, adapter):
    running, sdk = served
    _, want, _ = adapter
    reply = sdk.generate(PROMPT, "resized", max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert reply.text == want
    assert reply.usage.prompt_tokens == len(adapter[2](PROMPT)["input_ids"])
    stopped = sdk.generate(PROMPT, "resized", max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                           stop=[ADDED[0]])
    assert stopped.text == want.split(ADDED[0])[0] and stopped.finish_reason == "stop"
    with openai.OpenAI(base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key=ADMIN, max_retries=0,
                       timeout=120) as client:
        completion = client.completions.create(model="resized", prompt=PROMPT, max_tokens=NEW_TOKENS,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == want
        cards = {card.id: card for card in client.models.list().data}
        assert cards["resized"].model_extra["vocab_size"] == sdk.get_adapter("resized").vocab_size
        assert "vocab_size" not in cards[BASE].model_extra
        with pytest.raises(openai.BadRequestError, match="resized.* vocabulary"):
            client.completions.create(model="resized", prompt=PROMPT, max_tokens=2,
                                      extra_body={"response_format": {"type": "json_object"}})


def test_token_id_prompts_are_checked_against_the_adapters_vocabulary(served, adapter):
    running, _ = served
    _, _, tokenizer = adapter
    added = tokenizer.convert_tokens_to_ids(ADDED[1])
    headers = {"Authorization": f"Bearer {ADMIN}"}
    url = f"http://127.0.0.1:{running.http_port}/v1/completions"
    ok = httpx.post(url, headers=headers, timeout=120, json={"model": "resized", "prompt": [5, added],
                                                               "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text
    refused = httpx.post(url, headers=headers, timeout=120, json={"model": BASE, "prompt": [5, added],
                                                                    "max_tokens": 2})
    assert refused.status_code == 400 and "token ids must be in" in refused.text


def test_structured_output_on_the_adapter_is_refused_over_grpc(served):
    _, sdk = served
    with pytest.raises(ValidationError, match="sampling.constraint"):
        sdk.generate(PROMPT, "resized", max_new_tokens=2, json_object=True)


def test_tokenize_detokenize_and_logprob_tokens_use_the_adapters_tokenizer(served, adapter):
    running, _ = served
    _, want, tokenizer = adapter
    base = f"http://127.0.0.1:{running.http_port}"
    headers = {"Authorization": f"Bearer {ADMIN}"}
    own_ids = tokenizer(PROMPT)["input_ids"]
    reply = httpx.post(f"{base}/tokenize", headers=headers, timeout=120, json={"model": "resized", "prompt": PROMPT})
    assert reply.status_code == 200 and reply.json()["tokens"] == own_ids, reply.text
    base_ids = httpx.post(f"{base}/tokenize", headers=headers, timeout=120, json={"model": BASE, "prompt": PROMPT})
    assert base_ids.json()["tokens"] != own_ids
    added = tokenizer.convert_tokens_to_ids(ADDED[1])
    text = httpx.post(f"{base}/detokenize", headers=headers, timeout=120, json={"model": "resized", "tokens": [added]})
    assert text.status_code == 200 and text.json()["prompt"] == ADDED[1], text.text
    too_big = httpx.post(f"{base}/detokenize", headers=headers, timeout=120,
                         json={"model": "resized", "tokens": [10**6]})
    assert too_big.status_code == 400 and "token ids must be in" in too_big.text
    with openai.OpenAI(base_url=f"{base}/v1", api_key=ADMIN, max_retries=0, timeout=120) as client:
        completion = client.completions.create(model="resized", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                               logprobs=1, extra_body={"ignore_eos": True})
    assert "".join(completion.choices[0].logprobs.tokens) == want
    assert ADDED[0] in completion.choices[0].logprobs.tokens
