"""loraplex backends hold the same quantized weights as the transformers oracle models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.factory import build_linear
from quant_oracle import load_reference_model

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _pairs(model_dir, method: str, **spec_options):
    """(ours, reference module) for every decoder projection of the tiny Llama."""
    reference = load_reference_model(model_dir, method, **spec_options)
    state = load_file(model_dir / "model.safetensors")
    spec = QuantSpec(method=method, **spec_options)
    for layer_idx, layer in enumerate(reference.model.layers):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer_idx}.{projection}"
            module = layer.get_submodule(projection)
            yield build_linear(state[f"{name}.weight"], state.get(f"{name}.bias"), spec), module


def _inputs(in_features: int) -> torch.Tensor:
    x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(0))  # [T, in]
    x[:, 1] *= 30.0   # an LLM.int8 outlier column
    return x


@pytest.mark.parametrize("method,double_quant", [
    ("bnb-nf4", False), ("bnb-fp4", False), ("bnb-nf4", True), ("bnb-fp4", True)])
def test_bnb_4bit_same_data_and_outputs_as_transformers(tiny_llama_dir, method, double_quant):
    for ours, module in _pairs(tiny_llama_dir, method, bnb_double_quant=double_quant):
        ref_state = module.weight.quant_state
        assert torch.equal(ours.w_4bit, module.weight.data)
        assert torch.equal(ours.quant_state.absmax, ref_state.absmax)
        assert ours.quant_state.nested == ref_state.nested == double_quant
        if double_quant:
            assert torch.equal(ours.quant_state.state2.absmax, ref_state.state2.absmax)
            assert torch.equal(ours.quant_state.offset, ref_state.offset)
        x = _inputs(ours.in_features)
        with torch.no_grad():
            torch.testing.assert_close(ours.linear(x), module(x), rtol=0, atol=0)


def test_bnb_int8_same_data_and_outputs_as_transformers(tiny_llama_dir):
    for ours, module in _pairs(tiny_llama_dir, "bnb-int8"):
        assert torch.equal(ours.w_int8, module.weight.data)
        assert torch.equal(ours.row_absmax, module.weight.SCB)
        x = _inputs(ours.in_features)
        with torch.no_grad():
            torch.testing.assert_close(ours.linear(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hqq-4bit", "hqq-8bit"])
def test_hqq_same_data_and_outputs_as_reference(tiny_llama_dir, method):
    for ours, module in _pairs(tiny_llama_dir, method, hqq_group_size=64):
        assert torch.equal(ours.hqq.W_q, module.W_q)
        assert torch.equal(ours.hqq.meta["scale"], module.meta["scale"])
        assert torch.equal(ours.hqq.meta["zero"], module.meta["zero"])
        x = _inputs(ours.in_features)
        with torch.no_grad():
            torch.testing.assert_close(ours.linear(x), module(x), rtol=0, atol=0)


def test_eetq_reference_uses_the_torch_path_weights(tiny_llama_dir):
    for ours, module in _pairs(tiny_llama_dir, "eetq"):
        assert torch.equal(ours.dequantized_weight(), module.weight.data)
        x = _inputs(ours.in_features)
        with torch.no_grad():   # same weights; only the order of rounding differs
            torch.testing.assert_close(ours.linear(x), module(x), rtol=1e-5, atol=1e-5)


def test_every_choice_loads_and_runs(tiny_llama_dir):
    from loraplex.server.layers.base import QUANTIZE_CHOICES

    tokens = torch.tensor([[1, 5, 9]])
    for method in QUANTIZE_CHOICES:
        with torch.no_grad():
            logits = load_reference_model(tiny_llama_dir, method)(tokens).logits
        assert logits.shape == (1, 3, 49152) and bool(torch.isfinite(logits).all()), method
