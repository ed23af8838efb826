"""Qwen3-MoE with mixed adapters in one packed batch (attention LoRA and PEFT expert LoRA,
`target_parameters`) equals PEFT with each row's adapter (float32), and greedy decoding is
token for token PEFT's. Adapters go through the adapter store's own validation and parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_helpers import EXPERT_PARAMS, copy_dequantized_weights, save_moe_adapters, save_tiny_qwen3_moe
from runner_rows import runner_rows
from loraplex.adapters_store.config import StoreConfig
from loraplex.adapters_store.errors import AdapterValidationError
from loraplex.adapters_store.loader import build_loaded_adapter
from loraplex.adapters_store.types import LoadedAdapter
from loraplex.adapters_store.validation import validate_adapter
from loraplex.server.engine.sequence import SamplingParams
from loraplex.server.layers.base import QuantSpec
from loraplex.server.lora.experts import ExpertSlots
from loraplex.server.lora.fingerprint import base_spec_from_model_config
from loraplex.server.lora.manager import AdapterManager
from loraplex.server.lora.ops import select_ops
from loraplex.server.lora.slot_pool import SlotPool
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.llama import build_model

BLOCK_SIZE = 4
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=ATTENTION),
    "experts": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], target_parameters=EXPERT_PARAMS),
    "down-only": dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["v_proj"],
                      target_parameters=["mlp.experts.down_proj"]),
}
ROWS = ["experts", None, "attn", "down-only", "experts"]    # adapter of each sequence (None: the base)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("moe") / "model")


@pytest.fixture(scope="module")
def adapter_dirs(moe_dir, tmp_path_factory) -> dict[str, Path]:
    return save_moe_adapters(moe_dir, tmp_path_factory.mktemp("peft"), ADAPTERS)


def load_adapter(key: str, path: Path, model_dir: Path, method: str = "none") -> LoadedAdapter:
    """Validate and parse a PEFT directory as the adapter store does at upload and load."""
    base = base_spec_from_model_config(ModelConfig.from_dir(model_dir), method)
    config_bytes = (path / "adapter_config.json").read_bytes()
    weights_bytes = (path / "adapter_model.safetensors").read_bytes()
    validated = validate_adapter(config_bytes, weights_bytes, base, StoreConfig())
    from safetensors.torch import load as load_safetensors

    return build_loaded_adapter(key, validated.config, load_safetensors(weights_bytes), torch.float32)


def run_ours(model_dir: Path, adapter_dirs: dict[str, Path], prompts: list[list[int]], new_tokens: int,
             row_adapters: list[str | None] = ROWS, method: str = "none") -> tuple[list[torch.Tensor], list[list[int]]]:
    """All rows in one packed prefill, then greedy decode steps of all rows together (row i with
    adapter row_adapters[i]): each row's logits [len + new_tokens - 1, vocab] and its greedy tokens."""
    options = {"hqq_group_size": 32} if method.startswith("hqq") else {}     # the experts' inter is 32
    model, config = build_model(model_dir, QuantSpec(method=method, compute_dtype=torch.float32, **options))
    experts = ExpertSlots(model.moe_blocks(), max_loras=4, max_lora_rank=8)
    pool = SlotPool(model.lora_targets(), max_loras=4, max_lora_rank=8, ops=select_ops("cpu", "torch"),
                    experts=experts)
    slots = AdapterManager(pool).activate({k for k in row_adapters if k},
                                          lambda key: load_adapter(key, adapter_dirs[key], model_dir, method))
    seqs, rows, step = runner_rows(model, config, pool, slots, prompts, row_adapters, 12, BLOCK_SIZE)
    step([(seq, 0, seq.num_prompt_tokens) for seq in seqs])
    for _ in range(new_tokens - 1):
        for seq in seqs:
            seq.output_token_ids.append(int(rows[seq.seq_id][-1].argmax()))
        step([(seq, seq.num_tokens - 1, 1) for seq in seqs])
    for seq in seqs:
        seq.output_token_ids.append(int(rows[seq.seq_id][-1].argmax()))
    pool.detach()
    return [torch.stack(r) for r in rows], [list(seq.output_token_ids) for seq in seqs], model


def peft_rows(model_dir: Path, adapter_dirs: dict[str, Path], token_ids: list[list[int]],
              row_adapters: list[str | None], served=None) -> list[torch.Tensor]:
    """PEFT's logits [len, vocab] of each row alone, on a model holding only its adapter (PEFT's
    expert ParamWrapper takes neither mixed-adapter batches nor two adapters targeting different
    expert parameters); the base rows run on transformers' model without PEFT. served: our model,
    whose dequantized weights replace transformers' (a quantized base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {}
    for name in set(row_adapters):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if served is not None:
            copy_dequantized_weights(model, served)
        models[name] = model if name is None else PeftModel.from_pretrained(model, adapter_dirs[name]).eval()
    with torch.no_grad():
        return [models[name](input_ids=torch.tensor([ids])).logits[0].float()
                for ids, name in zip(token_ids, row_adapters)]


def test_mixed_moe_adapters_match_peft_token_for_token(moe_dir, adapter_dirs):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 9, 5, 7, 4)]
    ours, tokens, _ = run_ours(moe_dir, adapter_dirs, prompts, new_tokens=5)
    sequences = [p + t[:-1] for p, t in zip(prompts, tokens)]
    expected = peft_rows(moe_dir, adapter_dirs, sequences, ROWS)
    for i, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"row {i} ({ROWS[i]}): {m}")
        assert tokens[i] == want[len(prompts[i]) - 1:].argmax(-1).tolist(), f"row {i} greedy tokens"
    # the adapters visibly change the logits (expert deltas included), so the comparison above
    # cannot pass by accident
    base = peft_rows(moe_dir, adapter_dirs, sequences, [None] * len(ROWS))
    for i, name in enumerate(ROWS):
        change = float((expected[i] - base[i]).abs().max())
        assert (change > 1e-2) if name else (change == 0.0), (name, change)


@pytest.mark.parametrize("method", ["bnb-nf4", "hqq-4bit"])
def test_quantized_base_with_expert_adapters_matches_peft(moe_dir, adapter_dirs, method):
    """Unmerged attention and expert deltas on a quantized base (experts quantized per expert):
    PEFT on transformers holding the same dequantized weights gives the same logits."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 9, 5, 7, 4)]
    ours, tokens, served = run_ours(moe_dir, adapter_dirs, prompts, new_tokens=3, method=method)
    expected = peft_rows(moe_dir, adapter_dirs, [p + t[:-1] for p, t in zip(prompts, tokens)], ROWS, served)
    for i, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"row {i} ({ROWS[i]}): {m}")


def test_expert_deltas_alone_match_peft(moe_dir, tmp_path):
    """An adapter on the experts only (no attention module) moves the logits, as PEFT's does:
    the expert path is not carried by attention deltas."""
    only = save_moe_adapters(moe_dir, tmp_path, {"experts-only": dict(r=3, lora_alpha=6, target_modules=[],
                                                                        target_parameters=EXPERT_PARAMS)}, 40)
    adapter = load_adapter("experts-only", only["experts-only"], moe_dir)
    assert not adapter.weights
    assert set(adapter.experts) == {(layer, p) for layer in (0, 1) for p in ("gate_up_proj", "down_proj")}
    a, b = adapter.experts[(0, "gate_up_proj")]
    assert tuple(a.shape) == (8 * 3, 64) and tuple(b.shape) == (64, 3 * 8)    # [E r, hidden], [2 inter, r E]
    rows = ["experts-only", None]
    prompts = [[5, 9, 17, 33, 4, 81], [7, 7, 100, 2]]
    ours, tokens, _ = run_ours(moe_dir, only, prompts, new_tokens=4, row_adapters=rows)
    sequences = [p + t[:-1] for p, t in zip(prompts, tokens)]
    expected = peft_rows(moe_dir, only, sequences, rows)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = peft_rows(moe_dir, only, sequences[:1], [None])[0]
    assert float((expected[0] - base).abs().max()) > 1e-2


def test_expert_adapter_shapes_are_checked_at_upload(moe_dir, adapter_dirs, tmp_path):
    """A target_parameters adapter for another expert count is refused naming the tensor."""
    other = save_tiny_qwen3_moe(tmp_path / "other", num_experts=4)
    with pytest.raises(AdapterValidationError, match="experts.*shape"):
        load_adapter("experts", adapter_dirs["experts"], other)


def _validate(moe_dir: Path, config: dict, tensors: dict[str, torch.Tensor], dense: bool = False):
    import json
    from dataclasses import replace

    from safetensors.torch import save

    base = base_spec_from_model_config(ModelConfig.from_dir(moe_dir), "none")
    if dense:
        base = replace(base, expert_shapes={})
    raw = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    return validate_adapter(json.dumps(raw).encode(), save(tensors), base, StoreConfig())


def test_expert_adapters_that_cannot_be_served_are_refused_by_name(moe_dir):
    """Per-expert modules (transformers 4 layout), dense-MLP names on a MoE base, target_parameters
    on a base without experts, a missing expert half: refused at upload, naming the fix."""
    prefix = "base_model.model.model.layers.0.mlp.experts."
    per_expert = {prefix + "3.gate_proj.lora_A.weight": torch.zeros(2, 64),
                  prefix + "3.gate_proj.lora_B.weight": torch.zeros(32, 2)}
    fused = {prefix + "lora_A.weight": torch.zeros(16, 32), prefix + "lora_B.weight": torch.zeros(64, 16)}
    with pytest.raises(AdapterValidationError, match="per-expert layout.*target_parameters") as error:
        _validate(moe_dir, {"target_modules": ["q_proj"]}, per_expert)
    assert error.value.rule == "expert_modules"
    with pytest.raises(AdapterValidationError, match="routed experts: adapt them with target_parameters"):
        _validate(moe_dir, {"target_modules": ["gate_proj"]}, fused)
    with pytest.raises(AdapterValidationError, match="has no MoE experts"):
        _validate(moe_dir, {"target_modules": None, "target_parameters": ["mlp.experts.down_proj"]}, fused, dense=True)
    with pytest.raises(AdapterValidationError, match="layer 1 experts down_proj has no lora_A"):
        _validate(moe_dir, {"target_modules": None, "target_parameters": ["mlp.experts.down_proj"]}, fused)
    with pytest.raises(AdapterValidationError, match="target_parameters.*model.layers.0"):
        _validate(moe_dir, {"target_modules": None,
                            "target_parameters": ["model.layers.0.mlp.experts.down_proj"]}, fused)
    with pytest.raises(AdapterValidationError, match="target_parameters lists 0 expert"):
        _validate(moe_dir, {"target_modules": ["q_proj"]}, fused)


@pytest.fixture(scope="module")
def moe_engine_dir(tmp_path_factory, default_model_dir) -> Path:
    """The tiny MoE with the default model's vocabulary size and tokenizer (the engine needs one)."""
    import shutil

    path = save_tiny_qwen3_moe(tmp_path_factory.mktemp("moe-engine") / "model", vocab_size=49152,
                               max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return path


def test_engine_serves_expert_adapters_per_request(moe_engine_dir, tmp_path):
    """The whole serving path (adapter store upload checks, engine builder's expert slots,
    scheduler, runner): mixed expert adapters in one engine equal PEFT's greedy tokens, and
    Info says decode steps take the layer path."""
    from engine_helpers import run_staggered, tokens_of
    from peft import PeftModel
    from peft_oracle import registered_store
    from transformers import AutoModelForCausalLM

    from loraplex.server.engine.builder import build_engine
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.io import GenerationRequest

    dirs = save_moe_adapters(moe_engine_dir, tmp_path / "peft", {k: ADAPTERS[k] for k in ("experts", "down-only")})
    rows = ["experts", None, "down-only", "experts"]
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 8, 6, 3)]
    store = registered_store(moe_engine_dir, "none", dirs, tmp_path / "store")
    settings = dict(method="none", dtype="float32", device="cpu", max_num_seqs=8, max_batch_tokens=128,
                    kv_cache_memory="64MiB", max_model_len=256, max_input_tokens=128, block_size=16, max_loras=2,
                    cpu_kernels="torch", linear_kernel="aten")     # no kernel build or route timing here
    engine, info = build_engine(EngineConfig.from_settings(moe_engine_dir, **settings), store, log=lambda _m: None)
    assert (info.architecture, info.decode_path) == ("Qwen3MoeForCausalLM", "layers")
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outputs = run_staggered(engine, [(i, GenerationRequest(request_id=f"row{i}", prompt_token_ids=tuple(p),
                                                           adapter_id=row, sampling=sampling))
                                     for i, (row, p) in enumerate(zip(rows, prompts))])
    assert set(store.load("experts@1").experts) == {(l, p) for l in (0, 1) for p in ("gate_up_proj", "down_proj")}
    store.close()
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        model = AutoModelForCausalLM.from_pretrained(moe_engine_dir, dtype=torch.float32).eval()
        if row is not None:
            model = PeftModel.from_pretrained(model, dirs[row]).eval()
        model.generation_config.eos_token_id = None
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=6, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens_of(outputs[f"row{i}"]) == want, f"row {i} ({row or 'base'})"


def _per_expert_adapter(path: Path, rank: int = 2) -> Path:
    """A transformers-4-style adapter: LoRA on each expert's own gate_proj / up_proj / down_proj."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(21)
    shapes = {"gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}     # (in, out)
    tensors = {}
    for layer in range(2):
        for e in range(8):
            for module, (fan_in, fan_out) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{module}."
                tensors[prefix + "lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.2
                tensors[prefix + "lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.2
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 4,
        "target_modules": ["gate_proj", "up_proj", "down_proj"]}))
    return path


def test_per_expert_adapter_is_served_once_peft_converts_it(moe_dir, tmp_path):
    """transformers 4's per-expert adapters are refused as uploaded, naming the fix; PEFT 0.21 on
    transformers 5 converts one on load (gate_up at twice the rank and alpha: rank_pattern /
    alpha_pattern), and its save is served equal to PEFT running the original."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    old = _per_expert_adapter(tmp_path / "old")
    with pytest.raises(AdapterValidationError, match="routed experts.*per-expert modules.*save it again"):
        load_adapter("old", old, moe_dir)
    base = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, old).save_pretrained(tmp_path / "converted")
    adapter = load_adapter("converted", tmp_path / "converted", moe_dir)
    a, _ = adapter.experts[(0, "gate_up_proj")]
    assert a.shape[0] == 8 * 4                      # gate and up stacked: twice the rank
    rows = ["converted", None]
    prompts = [[5, 9, 17, 33, 4, 81], [7, 7, 100, 2]]
    ours, tokens, _ = run_ours(moe_dir, {"converted": tmp_path / "converted"}, prompts, new_tokens=3, row_adapters=rows)
    expected = peft_rows(moe_dir, {"converted": old}, [p + t[:-1] for p, t in zip(prompts, tokens)], rows)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_expert_rank_pattern_must_keep_the_adapter_scale(moe_dir):
    """PEFT's conversion doubles gate_up's rank and alpha (same scale): served. A pattern that
    changes an expert parameter's scale, or exceeds the rank limit, is refused."""
    prefix = "base_model.model.model.layers.{}.mlp.experts."
    tensors = {}
    for layer in range(2):
        tensors[prefix.format(layer) + "lora_A.weight"] = torch.zeros(8 * 4, 64)
        tensors[prefix.format(layer) + "lora_B.weight"] = torch.zeros(64, 4 * 8)
    config = {"target_modules": [], "target_parameters": ["gate_up_proj"], "rank_pattern": {".*\\.gate_up_proj": 4}}
    served = _validate(moe_dir, {**config, "alpha_pattern": {".*\\.gate_up_proj": 8}}, tensors)
    assert served.config.target_modules == ("experts.gate_up_proj",)
    with pytest.raises(AdapterValidationError, match="a scale other than the adapter's"):
        _validate(moe_dir, config, tensors)
    with pytest.raises(AdapterValidationError, match="rank_pattern.*not supported"):
        _validate(moe_dir, {**config, "rank_pattern": {"q_proj": 4}}, tensors)
