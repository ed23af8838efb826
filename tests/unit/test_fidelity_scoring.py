"""Teacher-forced perplexity through loraplex's model equals transformers' (and PEFT's) loss."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.fidelity.adapter_dir import load_peft_dir
from loraplex.server.fidelity.scoring import Scorer

TEXT = ("LoRA adapters add a low-rank update to frozen weights. Serving them unmerged keeps the "
        "base model quantized while each request gets its own delta. ") * 3


def _hf_perplexity(model, ids: list[int]) -> float:
    tensor = torch.tensor([ids])
    with torch.inference_mode():
        loss = model(input_ids=tensor, labels=tensor).loss
    return float(loss.exp())


@pytest.fixture(scope="module")
def token_ids(tiny_llama_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)(TEXT)["input_ids"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(7)
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("fidelity-adapter") / "ad"
    model.save_pretrained(out)
    return out


def test_base_perplexity_matches_transformers(tiny_llama_dir, token_ids):
    from transformers import AutoModelForCausalLM

    ours = Scorer(tiny_llama_dir).perplexity(token_ids)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    want = _hf_perplexity(ref, token_ids)
    assert ours.num_tokens == len(token_ids) - 1
    assert ours.perplexity == pytest.approx(want, rel=1e-4)


def test_adapter_perplexity_matches_peft(tiny_llama_dir, token_ids, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    scorer = Scorer(tiny_llama_dir)
    base_ppl = scorer.perplexity(token_ids).perplexity
    scorer.set_adapter(load_peft_dir(adapter_dir, scorer.base_spec))
    ours = scorer.perplexity(token_ids).perplexity
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    want = _hf_perplexity(PeftModel.from_pretrained(ref, adapter_dir).eval(), token_ids)
    assert ours == pytest.approx(want, rel=1e-4)
    assert abs(ours - base_ppl) / base_ppl > 1e-3, "the adapter must change the perplexity"
    scorer.set_adapter(None)
    assert scorer.perplexity(token_ids).perplexity == pytest.approx(base_ppl, rel=1e-6)


def test_windowed_perplexity_counts_every_predicted_token(tiny_llama_dir, token_ids):
    scorer = Scorer(tiny_llama_dir)
    result = scorer.perplexity(token_ids, window=17)
    assert result.num_tokens == len(token_ids) - len(range(0, len(token_ids) - 1, 17))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        scorer.perplexity(token_ids[:1])
