"""Gemma 2, Gemma 3 (text) and Phi-3 against transformers: float32 logits over packed ragged
batches (prefill chunks + decodes, the schedule of test_model_llama.drive), quantized bases
against the transformers oracle with the same quantization, and each family's decode path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from quant_oracle import load_reference_model
from test_model_llama import check_against_hf, drive, save_hf
from loraplex.server.engine.builder import build_engine
from loraplex.server.engine.config import EngineConfig
from loraplex.server.kernels.registry import KernelSet
from loraplex.server.layers.base import QuantSpec
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.decode_stack import build_decode_stack
from loraplex.server.model.fused_ops import layer_ops
from loraplex.server.model.llama import build_model

HEAD_DIM = 16
# sliding windows of 6 keys: the test prompts (7, 13, 5 tokens + 4 decodes) pass them. The random
# tiny Gemma 2's attention scores stay below ~0.1 and its logits below ~1: caps of 0.05 and 0.5
# make both soft-caps bend them.
GEMMA2 = dict(head_dim=HEAD_DIM, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=0.05,
              final_logit_softcapping=0.5, hidden_activation="gelu_pytorch_tanh")
GEMMA3 = dict(head_dim=HEAD_DIM, sliding_window=6, query_pre_attn_scalar=24, num_hidden_layers=3,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
# LongRoPE below its original length: the short factors and the attention factor of factor 2
LONGROPE = dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                                 "short_factor": [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)],
                                 "long_factor": [4.0] * (HEAD_DIM // 2)},
                original_max_position_embeddings=64)


def randomize_norms(model) -> None:
    """Gemma norms start at w = 0 ((1 + w) = 1) and Qwen-style head norms at 1: make them matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)


def save_family(out_dir: Path, family: str, **overrides) -> Path:
    config_cls, model_cls, options = {
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA2),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    }[family]
    return save_hf(out_dir, config_cls, model_cls, prepare=randomize_norms, **{**options, **overrides})


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "gemma2": save_family(root / "gemma2", "gemma2"),
        "gemma3": save_family(root / "gemma3", "gemma3"),
        "phi3": save_family(root / "phi3", "phi3", sliding_window=6),
        "phi3-longrope": save_family(root / "phi3-longrope", "phi3", **LONGROPE),
    }


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3", "phi3-longrope"])
def test_logits_match_transformers(families, name):
    rows = check_against_hf(families[name])
    assert sum(len(r) for r in rows.values()) > 30


@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_native_layer_ops_match_transformers(families, name, native_kernels):
    check_against_hf(families[name], ops=layer_ops(KernelSet(native=native_kernels)))


def test_configs_are_what_they_claim(families):
    gemma2, gemma3 = ModelConfig.from_dir(families["gemma2"]), ModelConfig.from_dir(families["gemma3"])
    assert gemma2.gemma.layer_windows == (6, None) and gemma2.gemma.attn_softcap == 0.05
    assert gemma2.gemma.final_softcap == 0.5 and not gemma2.gemma.qk_norm
    assert gemma3.gemma.layer_windows == (6, None, 6) and gemma3.gemma.qk_norm
    assert gemma3.gemma.query_scale == 24 ** -0.5 and gemma3.gemma.attn_softcap is None
    assert (gemma3.rope.rope_type, gemma3.rope.theta, gemma3.gemma.local_rope.theta) == ("linear", 1e5, 1e4)
    phi3 = ModelConfig.from_dir(families["phi3"])
    assert phi3.fused_checkpoint and phi3.sliding_window == 6
    assert set(phi3.module_shapes()) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    longrope = ModelConfig.from_dir(families["phi3-longrope"])
    assert (longrope.rope.rope_type, longrope.max_position_embeddings) == ("longrope", 64)


@pytest.mark.parametrize("name,method", [("phi3", "hqq-4bit"), ("gemma2", "hqq-4bit"), ("gemma3", "bnb-nf4")])
def test_quantized_base_matches_the_transformers_oracle(families, name, method):
    """Our quantized backend (Phi-3: its fused modules quantized as stored) against transformers
    holding the same quantized weights (tests/quant_oracle.py), over the mixed schedule."""
    model, config = build_model(families[name], QuantSpec(method=method))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 13, 5)]
    extra = [torch.randint(0, 512, (4,), generator=gen).tolist() for _ in range(3)]
    rows, all_ids = drive(model, config, prompts, extra)
    reference = load_reference_model(families[name], method)
    for i, seq_rows in rows.items():
        with torch.no_grad():
            expected = reference(torch.tensor([all_ids[i]])).logits[0].float()
        torch.testing.assert_close(torch.stack([r for _, r in seq_rows]), expected, atol=1e-4, rtol=1e-4)


def test_phi3_decodes_in_the_native_stack_gemma_on_the_layer_path(families, native_kernels):
    kernels = KernelSet(native=native_kernels)
    phi3, _ = build_model(families["phi3"], QuantSpec(), ops=layer_ops(kernels))
    assert build_decode_stack(phi3, kernels) is not None
    for name in ("gemma2", "gemma3"):
        gemma, _ = build_model(families[name], QuantSpec(), ops=layer_ops(kernels))
        assert build_decode_stack(gemma, kernels) is None


def test_phi3_decode_stack_is_bit_equal_to_the_layer_path(families, native_kernels):
    kernels = KernelSet(native=native_kernels)
    model, config = build_model(families["phi3"], QuantSpec(), ops=layer_ops(kernels))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 13, 5)]
    extra = [torch.randint(0, 512, (5,), generator=gen).tolist() for _ in range(3)]
    layered = drive(model, config, prompts, extra)[0]
    calls: list = []
    stack = model.decode_stack = build_decode_stack(model, kernels)
    kernel = stack.kernel
    stack.kernel = lambda *args: calls.append(args[0].shape[0]) or kernel(*args)
    stacked = drive(model, config, prompts, extra)[0]
    assert calls == [3] * (len(extra[0]) - 1)
    for seq, rows in layered.items():
        for (pos, want), (_, got) in zip(rows, stacked[seq]):
            assert torch.equal(got, want), f"seq {seq} position {pos}"


def test_info_says_which_decode_path_each_family_takes(tmp_path, default_model_dir, native_kernels):
    if native_kernels is None:
        pytest.skip("no native CPU kernels here")
    settings = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_num_seqs=4, max_model_len=48,
                    max_input_tokens=32, cpu_kernels="native")
    for family, path in (("phi3", "native-stack"), ("gemma3", "layers")):
        model_dir = save_family(tmp_path / family, family, vocab_size=49152)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (default_model_dir / name).exists():
                shutil.copy(default_model_dir / name, model_dir / name)
        info = build_engine(EngineConfig.from_settings(model_dir, **settings), None, log=lambda _m: None)[1]
        assert (info.architecture, info.decode_path) == (ModelConfig.from_dir(model_dir).architecture, path)


def test_longrope_refuses_contexts_past_its_original_length(families):
    settings = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_num_seqs=2, max_model_len=128,
                    max_input_tokens=32)
    with pytest.raises(ValueError, match="'longrope' is served up to original_max_position_embeddings=64"):
        build_engine(EngineConfig.from_settings(families["phi3-longrope"], **settings), None, log=lambda _m: None)


def test_contexts_past_the_trained_length_are_served_with_a_startup_warning(tmp_path, default_model_dir):
    """max_position_embeddings is what the model was trained on, not a hard limit of plain RoPE:
    a longer max_model_len starts, with a warning that names both numbers and the flag."""
    settings = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_num_seqs=2, max_input_tokens=32)
    model_dir = save_family(tmp_path / "phi3", "phi3", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, model_dir / name)
    trained = ModelConfig.from_dir(model_dir).max_position_embeddings
    for max_model_len, warned in ((trained, False), (trained + 64, True)):
        lines: list[str] = []
        build_engine(EngineConfig.from_settings(model_dir, max_model_len=max_model_len, **settings),
                     None, log=lines.append)
        warnings = [line for line in lines if "max_position_embeddings" in line]
        assert bool(warnings) is warned, lines
    assert f"max_model_len={trained + 64}" in warnings[0] and f"--max-total-tokens to at most {trained}" in warnings[0]


def test_unsupported_family_options_are_refused(families):
    import json

    raw = json.loads((families["gemma3"] / "config.json").read_text())
    for change, message in (({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                            ({"hidden_activation": "silu"}, "hidden_activation='silu'"),
                            ({"layer_types": ["full_attention"]}, "layer_types must list 3")):
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict({**raw, **change})
    phi = json.loads((families["phi3"] / "config.json").read_text())
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_dict({**phi, "partial_rotary_factor": 0.75, "rope_parameters": None})
