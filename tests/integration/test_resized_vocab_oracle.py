"""An adapter with a resized vocabulary (added tokens, its own tokenizer), served unmerged in a
mixed batch, against PEFT: float32 greedy token for token, and its text.

One engine batch holds rows on the resized adapter (a text prompt holding an added token,
tokenized by the engine with the adapter's tokenizer, and a token-id prompt), rows on a plain
LoRA and rows without an adapter, arriving staggered. The reference generates the resized
adapter's rows with PEFT on the base resized to V' (`resize_token_embeddings`), the plain LoRA's
rows with PEFT on the base, the base rows with the bare model. The adapter's lm_head row of its
first added token is aimed at the text prompt's last hidden state, so greedy decoding emits an
added id; the text of that row is the adapter tokenizer's decode, added token included.
"""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, run_staggered, tokens_of
from loraplex.adapters_store.config import StoreConfig
from loraplex.adapters_store.store import AdapterStore
from loraplex.server.engine.adapter_tokenizers import base_tokens
from loraplex.server.engine.builder import base_spec_for
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.io import GenerationRequest
from loraplex.server.engine.sequence import SamplingParams
from peft_oracle import save_random_adapters
from resized_vocab_helpers import ADDED, PROMPT, make_resized_adapter, resized_reference_model

pytestmark = pytest.mark.integration

ROWS = ["resized-text", "plain", None, "resized-ids", None, "plain", "resized-text"]
NEW_TOKENS = 8
OTHER_TEXT = "A quick brown fox jumps over the lazy dog near"


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resized")
    dirs = save_random_adapters(tiny_llama_dir, root, {"plain": dict(r=8, lora_alpha=16,
                                                                      target_modules=["q_proj", "v_proj"])}, 300)
    dirs["resized"] = make_resized_adapter(tiny_llama_dir, root / "resized")
    return dirs


@pytest.fixture(scope="module")
def tokenizers(tiny_llama_dir, adapters):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(adapters["resized"])


def prompt_of(row: str | None, tokenizers) -> list[int]:
    base, own = tokenizers
    return own(PROMPT)["input_ids"] if row and row.startswith("resized") else base(OTHER_TEXT)["input_ids"]


def reference(model_dir, adapters, tokenizers) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    want: list[list[int]] = [[] for _ in ROWS]
    for group in ("resized", "plain", None):
        if group == "resized":
            model = PeftModel.from_pretrained(resized_reference_model(model_dir, tokenizers[1]), adapters["resized"])
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            if group is not None:
                model = PeftModel.from_pretrained(model, adapters[group])
        model.eval()
        model.generation_config.eos_token_id = None
        for i, row in enumerate(ROWS):
            if (row or "").startswith(group or "~") or (group is None and row is None):
                ids = torch.tensor([prompt_of(row, tokenizers)])
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=NEW_TOKENS, pad_token_id=0)
                want[i] = out[0, ids.shape[1]:].tolist()
    return want


def test_resized_vocab_mixed_batch_matches_peft(tiny_llama_dir, adapters, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    base_tok, own_tok = tokenizers
    store = AdapterStore(tmp_path / "store", StoreConfig(allowed_register_roots=(adapters["plain"].parent,)),
                         base_spec_for(EngineConfig.from_settings(tiny_llama_dir, method="none")))
    store.set_base_tokens(base_tokens(AutoTokenizer.from_pretrained(tiny_llama_dir)))
    for name, path in adapters.items():
        store.register_path(name, path)
    record = store.resolve("resized", None)
    assert record.vocab_size == len(own_tok) + (-len(own_tok)) % 8 > len(own_tok) > base_tok.vocab_size
    engine = make_engine(tiny_llama_dir, store=store, max_loras=4)
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    requests = []
    for i, row in enumerate(ROWS):
        adapter = "resized" if row and row.startswith("resized") else row
        text = row == "resized-text"
        requests.append((i, GenerationRequest(
            request_id=f"row{i}", adapter_id=adapter, sampling=sampling,
            prompt=PROMPT if text else None,
            prompt_token_ids=None if text else tuple(prompt_of(row, tokenizers)))))
    outputs = run_staggered(engine, requests)
    store.close()
    want = reference(tiny_llama_dir, adapters, tokenizers)
    first_added = own_tok.convert_tokens_to_ids(ADDED[0])
    assert first_added in prompt_of("resized-text", tokenizers) and first_added >= base_tok.vocab_size
    for i, row in enumerate(ROWS):
        ours = tokens_of(outputs[f"row{i}"])
        assert ours == want[i], f"{row or 'base'}: float32 greedy must agree token for token"
        if row and row.startswith("resized"):
            assert first_added in ours, "the adapter's added token is its greedy choice"
            text = "".join(out.text for out in outputs[f"row{i}"])
            assert text == own_tok.decode(want[i], skip_special_tokens=True) and ADDED[0] in text
        else:
            assert max(ours) < base_tok.vocab_size


def test_prompt_tokenized_for_another_version_is_refused(tiny_llama_dir, adapters, tmp_path):
    """The engine queues a prompt only with the tokenizer it was made with: a request whose adapter
    resolves (a version registered in between) to a vocabulary other than its prompt's is refused."""
    from transformers import AutoTokenizer

    from loraplex.server.engine.io import RequestRejected, ValidatedRequest

    store = AdapterStore(tmp_path / "store", StoreConfig(allowed_register_roots=(adapters["plain"].parent,)),
                         base_spec_for(EngineConfig.from_settings(tiny_llama_dir, method="none")))
    store.set_base_tokens(base_tokens(AutoTokenizer.from_pretrained(tiny_llama_dir)))
    store.register_path("ad", adapters["plain"])
    engine = make_engine(tiny_llama_dir, store=store, max_loras=2)
    request = GenerationRequest(request_id="r", adapter_id="ad", prompt=PROMPT,
                                sampling=SamplingParams(max_new_tokens=2))
    validated = engine.intake.prepare(request)                      # tokenized for ad@1 (the base's)
    assert validated.tokenizer_key is None
    store.register_path("ad", adapters["resized"])                   # ad@2: its own vocabulary
    with pytest.raises(RequestRejected, match="ad@2, whose vocabulary differs"):
        engine.add_request(validated)
    engine.add_request(engine.intake.prepare(request))                # tokenized again: queued
    assert engine.intake.prepare(request).tokenizer_key == "ad@2"
    store.close()
