"""Qwen3-MoE: our model's logits over packed ragged batches equal transformers' (float32), the
routing is transformers' bit for bit, quantized experts equal transformers on the same
(dequantized) weights, and decode steps take the layer path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_helpers import copy_dequantized_weights, save_tiny_qwen3_moe
from test_model_llama import check_against_hf, drive
from loraplex.server.kernels.registry import KernelSet
from loraplex.server.layers.base import QuantSpec
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.decode_stack import build_decode_stack
from loraplex.server.model.fused_ops import layer_ops
from loraplex.server.model.llama import build_model
from loraplex.server.model.moe import route


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    dirs = {"norm": save_tiny_qwen3_moe(root / "norm", norm_topk_prob=True),
            "no-norm": save_tiny_qwen3_moe(root / "no-norm", seed=1, norm_topk_prob=False, num_experts_per_tok=3,
                                           tie_word_embeddings=False)}
    dirs["fused"] = _fused_copy(dirs["norm"], root / "fused")
    return dirs


def _fused_copy(src: Path, dst: Path) -> Path:
    """The same model in transformers 5's in-memory layout, mlp.experts.gate_up_proj [E, 2 inter,
    hidden] and down_proj [E, hidden, inter] (save_pretrained writes the Hub's per-expert one)."""
    dst.mkdir()
    state, out = load_file(src / "model.safetensors"), {}
    for name, tensor in state.items():
        if ".mlp.experts." not in name:
            out[name] = tensor
    num_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        count = sum(1 for name in state if name.startswith(prefix) and name.endswith(".down_proj.weight"))
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([state[f"{prefix}{e}.gate_proj.weight"],
                                                               state[f"{prefix}{e}.up_proj.weight"]])
                                                    for e in range(count)])
        out[prefix + "down_proj"] = torch.stack([state[f"{prefix}{e}.down_proj.weight"] for e in range(count)])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("name", ["norm", "no-norm", "fused"])
def test_qwen3_moe_logits_match_transformers(moe_dirs, name):
    rows = check_against_hf(moe_dirs[name])
    assert sum(len(r) for r in rows.values()) > 30


def test_checkpoint_layouts_load_the_same_experts(moe_dirs):
    state = load_file(moe_dirs["norm"] / "model.safetensors")
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in state and "model.layers.0.mlp.gate.weight" in state
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(moe_dirs["fused"] / "model.safetensors")
    fused, _ = build_model(moe_dirs["fused"], QuantSpec())
    split, _ = build_model(moe_dirs["norm"], QuantSpec())
    for a, b in zip(fused.moe_blocks(), split.moe_blocks()):
        for e in range(8):
            assert torch.equal(a.gate_up[e].dequantized_weight(), b.gate_up[e].dequantized_weight())
            assert torch.equal(a.down[e].dequantized_weight(), b.down[e].dequantized_weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routing_is_transformers_bit_for_bit(dtype, norm_topk_prob):
    """Softmax in float32, top-k, renormalisation, cast back: the same experts and weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = Qwen3MoeConfig(hidden_size=64, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(config).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 64, generator=gen))
        hidden = torch.randn(50, 64, generator=gen).to(dtype)
        _, want_weights, want_experts = router(hidden)
    weights, experts = route(hidden, router.weight.detach(), 4, norm_topk_prob)
    assert torch.equal(experts, want_experts) and torch.equal(weights, want_weights)
    assert weights.dtype == dtype


@pytest.mark.parametrize("method", ["bnb-nf4", "hqq-4bit", "eetq"])
def test_quantized_experts_match_transformers_on_their_weights(moe_dirs, method):
    """Every backend quantizes each expert as it does an nn.Linear; the MoE on top equals
    transformers run on our dequantized weights (attention and experts)."""
    from transformers import AutoModelForCausalLM

    options = {"hqq_group_size": 32} if method.startswith("hqq") else {}     # the experts' inter is 32
    model, config = build_model(moe_dirs["norm"], QuantSpec(method=method, **options))
    hf = AutoModelForCausalLM.from_pretrained(moe_dirs["norm"], dtype=torch.float32).eval()
    copy_dequantized_weights(hf, model)
    assert model.linear_weight_bytes() < sum(p.numel() * 4 for n, p in hf.model.layers.named_parameters()
                                             if "proj" in n)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 13, 5)]
    extra = [torch.randint(0, 256, (4,), generator=gen).tolist() for _ in range(3)]
    rows, all_ids = drive(model, config, prompts, extra)
    # bnb-int8 quantizes activations too (LLM.int8 absmax per row): its GEMM is not the
    # dequantized weight's; 4-bit backends dequantize and multiply in float32
    atol = 5e-2 if method == "bnb-int8" else 1e-4
    for i, seq_rows in rows.items():
        with torch.no_grad():
            want = hf(torch.tensor([all_ids[i]])).logits[0]
        ours = torch.stack([r for _, r in seq_rows])
        torch.testing.assert_close(ours, want[[p for p, _ in seq_rows]], atol=atol, rtol=atol)


def test_moe_decodes_on_the_layer_path(moe_dirs, native_kernels):
    """The one-call native decode stack runs the dense Llama layer only: MoE keeps the layer path
    (EngineInfo.decode_path says "layers")."""
    kernels = KernelSet(native=native_kernels)
    model, _ = build_model(moe_dirs["norm"], QuantSpec(), ops=layer_ops(kernels))
    assert build_decode_stack(model, kernels) is None
    check_against_hf(moe_dirs["norm"], ops=layer_ops(kernels))       # native layer ops around the experts


def test_moe_config_is_read_and_refusals_name_the_field(moe_dirs, tmp_path):
    config = ModelConfig.from_dir(moe_dirs["no-norm"])
    assert (config.moe.num_experts, config.moe.top_k, config.moe.intermediate_size) == (8, 3, 32)
    assert config.qk_norm and not config.moe.norm_topk_prob
    assert set(config.module_shapes()) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    raw = json.loads((moe_dirs["norm"] / "config.json").read_text())
    for change, match in (({"mlp_only_layers": [1]}, "mlp_only_layers"), ({"decoder_sparse_step": 2}, "sparse"),
                          ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
                          ({"use_sliding_window": True}, "use_sliding_window")):
        (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_dir(tmp_path)
