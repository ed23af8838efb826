"""`merge_adapter`: float merge equals PEFT merge_and_unload; naive 4-bit merge is well formed."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.server.fidelity.adapter_dir import load_peft_dir
from loraplex.server.fidelity.merge import QUANT_FILE, merge_adapter
from loraplex.server.fidelity.scoring import Scorer

IDS = list(range(100, 160))


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(11)
    out = tmp_path_factory.mktemp("merge-adapter") / "ad"
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_float_merge_equals_peft_merge_and_unload(tiny_llama_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = merge_adapter(tiny_llama_dir, adapter_dir, tmp_path / "merged")
    assert result.merged_modules == 2 * 4 and not (tmp_path / "merged" / QUANT_FILE).exists()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), adapter_dir)
    ref = ref.merge_and_unload().eval()
    ids = torch.tensor([IDS])
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # and loraplex serving the merged float model equals unmerged serving of the adapter
    unmerged = Scorer(tiny_llama_dir)
    unmerged.set_adapter(load_peft_dir(adapter_dir, unmerged.base_spec))
    torch.testing.assert_close(Scorer(tmp_path / "merged").logits(IDS), unmerged.logits(IDS),
                               rtol=1e-4, atol=1e-4)


def test_quantized_merge_records_the_backend(tiny_llama_dir, adapter_dir, tmp_path):
    merge_adapter(tiny_llama_dir, adapter_dir, tmp_path / "m", quantize="bnb-nf4")
    record = json.loads((tmp_path / "m" / QUANT_FILE).read_text())
    assert record["quantize"] == "bnb-nf4" and record["naive"] is False
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_naive_nf4_merge_is_lossier_than_merge_then_quantize(tiny_llama_dir, adapter_dir, tmp_path):
    """Reference: float32 merged model. Naive = merge into dequantized nf4 weights and requantize."""
    merge_adapter(tiny_llama_dir, adapter_dir, tmp_path / "float")
    merge_adapter(tiny_llama_dir, adapter_dir, tmp_path / "naive", quantize="bnb-nf4", naive=True)
    reference = Scorer(tmp_path / "float").logits(IDS)
    naive = Scorer(tmp_path / "naive").logits(IDS)
    unmerged = Scorer(tiny_llama_dir, quantize="bnb-nf4")
    unmerged.set_adapter(load_peft_dir(adapter_dir, unmerged.base_spec))
    served = unmerged.logits(IDS)
    assert torch.isfinite(naive).all()
    naive_err = (naive - reference).abs().mean()
    served_err = (served - reference).abs().mean()
    assert naive_err > served_err, (naive_err, served_err)


def test_naive_needs_a_backend(tiny_llama_dir, adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="--quantize"):
        merge_adapter(tiny_llama_dir, adapter_dir, tmp_path / "x", naive=True)
