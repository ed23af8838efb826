"""Our model with mixed adapters in one packed batch equals PEFT's mixed-batch forward (float32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runner_rows import runner_rows
from loraplex.adapters_store.types import LoadedAdapter, LoraConfigInfo
from loraplex.server.kernels.registry import KernelSet
from loraplex.server.layers.base import QuantSpec
from loraplex.server.lora.manager import AdapterManager
from loraplex.server.lora.ops import select_ops
from loraplex.server.lora.slot_pool import SlotPool
from loraplex.server.model.decode_stack import build_decode_stack
from loraplex.server.model.fused_ops import TORCH_OPS, layer_ops
from loraplex.server.model.llama import build_model

BLOCK_SIZE = 4
ADAPTERS = {  # name -> LoraConfig kwargs (different r / alpha / rsLoRA / targets)
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"]),
    "beta": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gamma": dict(r=2, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
}
ROWS = ["alpha", None, "beta", "gamma"]   # adapter of each sequence (None = base only)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("lora-llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    return make_adapters(model_dir, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 (per-head q/k RMSNorm, weights made non-trivial)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("lora-qwen3")
    model.save_pretrained(path)
    return path


def make_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """The ADAPTERS as PEFT directories for model_dir, with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kwargs))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn_like(param) * 0.2)     # lora_B would otherwise start at 0
        peft_model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def load_peft_dir(key: str, path: Path) -> LoadedAdapter:
    """Parse a PEFT adapter directory into a LoadedAdapter (keys ...layers.{i}.{attn|mlp}.{m}.lora_{A|B})."""
    raw = json.loads((path / "adapter_config.json").read_text())
    config = LoraConfigInfo(rank=raw["r"], lora_alpha=raw["lora_alpha"], use_rslora=raw.get("use_rslora", False),
                            target_modules=tuple(sorted(raw["target_modules"])))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(path / "adapter_model.safetensors").items():
        parts = name.split(".")
        layer, module, which = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
        pairs.setdefault((layer, module), {})[which] = tensor.float()
    weights = {k: (v["lora_A"], v["lora_B"]) for k, v in pairs.items()}
    return LoadedAdapter(key=key, config=config, weights=weights,
                         nbytes=sum(a.nbytes + b.nbytes for a, b in weights.values()))


def peft_logits(model_dir: Path, adapter_dirs: dict[str, Path], token_ids: list[list[int]],
                row_adapters: list[str | None], base=None) -> list[torch.Tensor]:
    """PEFT mixed-batch forward (adapter_names per row), right-padded; [len_i, vocab] per row.
    base: the transformers model to wrap (default: model_dir in float32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base is None:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    width = max(map(len, token_ids))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in token_ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask,
                       adapter_names=[r or "__base__" for r in row_adapters]).logits
    return [logits[i, :len(row)].float() for i, row in enumerate(token_ids)]


def run_ours(model_dir: Path, adapter_dirs: dict[str, Path], prompts: list[list[int]], extra: list[int],
             backend: str, native=None, stack_calls: list | None = None,
             spec: QuantSpec | None = None) -> list[torch.Tensor]:
    """Step 1: all four prompts packed in one prefill; step 2: one decode token each.
    native: the built C++ kernels (layer ops and the fused LoRA kernel); stack_calls: a list to
    run decode steps through the one-call decode stack, which records each call in it; spec: the
    base's quantization (default none, float32)."""
    kernels = KernelSet(native=native)
    model, config = build_model(model_dir, spec or QuantSpec(compute_dtype=torch.float32),
                                ops=layer_ops(kernels) if native is not None else TORCH_OPS)
    pool = SlotPool(model.lora_targets(), max_loras=4, max_lora_rank=8,
                    ops=select_ops("cpu", backend, cpu_kernels=native))
    if stack_calls is not None:
        stack = model.decode_stack = build_decode_stack(model, kernels)
        kernel = stack.kernel
        stack.kernel = lambda *args: stack_calls.append(args[-9]) or kernel(*args)   # lora_a
    manager = AdapterManager(pool)
    slots = manager.activate({k for k in ROWS if k}, lambda key: load_peft_dir(key, adapter_dirs[key]))
    seqs, rows, step = runner_rows(model, config, pool, slots, prompts, ROWS, 8, BLOCK_SIZE)
    step([(seq, 0, seq.num_prompt_tokens) for seq in seqs])
    for seq, token in zip(seqs, extra):
        seq.output_token_ids.append(token)
    step([(seq, seq.num_tokens - 1, 1) for seq in seqs])
    pool.detach()
    return [torch.stack(r) for r in rows]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_mixed_adapter_batch_matches_peft(model_dir, adapter_dirs, backend):
    check_mixed_batch(model_dir, adapter_dirs, backend)


def test_qwen3_mixed_adapter_batch_matches_peft(qwen3_dir, tmp_path):
    """Qwen3 (q/k head norms between the LoRA'd q/k projections and rotary) against PEFT."""
    check_mixed_batch(qwen3_dir, make_adapters(qwen3_dir, tmp_path), "torch")


def check_mixed_batch(model_dir: Path, adapter_dirs: dict[str, Path], backend: str) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 9, 5, 7)]
    extra = torch.randint(3, 256, (4,), generator=gen).tolist()
    ours = run_ours(model_dir, adapter_dirs, prompts, extra, backend)
    expected = peft_logits(model_dir, adapter_dirs, [p + [t] for p, t in zip(prompts, extra)], ROWS)
    for i, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"row {i} ({ROWS[i]}): {m}")
    # the adapters visibly change the logits, so the comparison above cannot pass by accident
    base = peft_logits(model_dir, adapter_dirs, [p + [t] for p, t in zip(prompts, extra)], [None] * 4)
    for i, name in enumerate(ROWS):
        change = float((expected[i] - base[i]).abs().max())
        assert (change > 1e-2) if name else (change == 0.0), (name, change)


def test_decode_stack_with_adapters_is_bit_equal_to_the_layer_path(model_dir, adapter_dirs, native_kernels):
    """A mixed-adapter decode step through the one-call stack (lora_bgmv after each GEMM) gives
    the layer-by-layer path's logits bit for bit, and both match PEFT."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 9, 5, 7)]
    extra = torch.randint(3, 256, (4,), generator=gen).tolist()
    layers = run_ours(model_dir, adapter_dirs, prompts, extra, "torch", native=native_kernels)
    calls: list = []
    stacked = run_ours(model_dir, adapter_dirs, prompts, extra, "torch", native=native_kernels,
                       stack_calls=calls)
    assert len(calls) == 1 and sum(a is not None for a in calls[0]) > 0     # the decode step, with LoRA
    expected = peft_logits(model_dir, adapter_dirs, [p + [t] for p, t in zip(prompts, extra)], ROWS)
    for i, (got, want) in enumerate(zip(stacked, layers)):
        assert torch.equal(got, want), f"row {i} ({ROWS[i]})"
        torch.testing.assert_close(got, expected[i], atol=1e-4, rtol=1e-4)
