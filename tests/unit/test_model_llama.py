"""Our model's logits over packed ragged batches (prefill chunks + decodes) equal transformers'."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from model_helpers import build_tiny_llama
from loraplex.server.engine.batch import ScheduledBatch, ScheduledSeq
from loraplex.server.engine.runner import ModelRunner
from loraplex.server.engine.sequence import SamplingParams, Sequence
from loraplex.server.layers.base import QuantSpec
from loraplex.server.model.config import ModelConfig
from loraplex.server.kernels.registry import KernelSet
from loraplex.server.model.fused_ops import TORCH_OPS, layer_ops
from loraplex.server.layers.linear_choice import choose_linear_kernels
from loraplex.server.layers.cpu_gemm import onednn_supported
from loraplex.server.model.decode_stack import build_decode_stack
from loraplex.server.model.kv_cache import allocate_kv_caches
from loraplex.server.model.llama import build_model

BLOCK_SIZE = 4
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def save_hf(out_dir: Path, config_cls: str, model_cls: str, prepare=None, **overrides) -> Path:
    """A random tiny transformers model of another family (no tokenizer needed here); prepare(model),
    when given, edits the random weights before saving."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    if "attention_bias" in overrides or config_cls == "Qwen2Config":
        with torch.no_grad():   # random init leaves biases at 0: make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    if config_cls == "Qwen3Config":
        with torch.no_grad():   # q/k head norms start at 1: make them matter
            for name, param in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.uniform_(0.5, 1.5)
    if prepare is not None:
        prepare(model)
    model.save_pretrained(out_dir, **({"max_shard_size": "400KB"} if "shard" in out_dir.name else {}))
    return out_dir


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    llama3 = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
                  rope_theta=500000.0)
    return {
        "llama": tiny_llama_dir,
        "qwen2": save_hf(root / "qwen2", "Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=False),
        "mistral": save_hf(root / "mistral", "MistralConfig", "MistralForCausalLM", sliding_window=6,
                           head_dim=16),
        "llama3-rope": save_hf(root / "llama3", "LlamaConfig", "LlamaForCausalLM", **llama3),
        "untied": save_hf(root / "untied", "LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=False),
        "llama-sharded": save_hf(root / "llama-shard", "LlamaConfig", "LlamaForCausalLM"),
        "qwen3": save_hf(root / "qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=16, tie_word_embeddings=True),
        "qwen3-yarn": save_hf(root / "qwen3-yarn", "Qwen3Config", "Qwen3ForCausalLM", head_dim=16,
                              rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                              rope_theta=10000.0),
        "llama-linear-rope": save_hf(root / "llama-linear", "LlamaConfig", "LlamaForCausalLM",
                                     rope_scaling={"rope_type": "linear", "factor": 3.0}, rope_theta=10000.0),
    }


def drive(model, config: ModelConfig, prompts: list[list[int]], extra: list[list[int]]):
    """Run a fixed schedule of mixed steps through the runner's input building.

    Step 1: seq 0 full prefill, seq 1 first chunk. Step 2: seq 0 decodes, seq 1 finishes its
    prompt (chunk at an offset), seq 2 full prefill. Then every sequence decodes the tokens of
    `extra` (seq 0 is one token ahead). Returns ({seq index: [(position, logits row)]},
    each sequence's final token ids).
    """
    num_blocks = 48
    caches = allocate_kv_caches(config, num_blocks, BLOCK_SIZE, model.dtype)
    runner = ModelRunner(model, config, caches, BLOCK_SIZE, sampler=lambda logits, seqs: None)
    blocks = list(range(num_blocks))
    random.Random(0).shuffle(blocks)            # non-contiguous block tables
    seqs = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(i, list(prompt), SamplingParams())
        seq.block_table = [blocks.pop() for _ in range(num_blocks // len(prompts))]
        seqs.append(seq)
    rows: dict[int, list] = {i: [] for i in range(len(seqs))}

    def run(items):
        batch = ScheduledBatch(tuple(ScheduledSeq(seq, start, n, True) for seq, start, n in items))
        inputs = runner.prepare(batch, None)
        with torch.inference_mode():
            logits = model.compute_logits(model(inputs.input_ids, inputs.ctx, caches))  # [T, vocab]
        row = 0
        for seq, start, n in items:
            rows[seq.seq_id] += [(start + j, logits[row + j]) for j in range(n)]
            row += n

    s0, s1, s2 = seqs
    half = s1.num_prompt_tokens // 2
    run([(s0, 0, s0.num_prompt_tokens), (s1, 0, half)])
    s0.output_token_ids.append(extra[0][0])
    run([(s0, s0.num_prompt_tokens, 1), (s1, half, s1.num_prompt_tokens - half),
         (s2, 0, s2.num_prompt_tokens)])
    for step in range(len(extra[0]) - 1):
        for i, seq in enumerate(seqs):
            seq.output_token_ids.append(extra[i][step + (i == 0)])
        run([(seq, seq.num_tokens - 1, 1) for seq in seqs])
    return rows, [seq.all_token_ids for seq in seqs]


def hf_logits(model_dir: Path, token_ids: list[int], dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()   # [len, vocab]


def check_against_hf(model_dir: Path, attention: str = "fast", dtype=torch.float32, atol=1e-4,
                     ops=TORCH_OPS):
    model, config = build_model(model_dir, QuantSpec(compute_dtype=dtype), attention=attention, ops=ops)
    gen = torch.Generator().manual_seed(7)
    vocab = min(config.vocab_size, 512)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 13, 5)]
    extra = [torch.randint(0, vocab, (4,), generator=gen).tolist() for _ in range(3)]
    rows, all_ids = drive(model, config, prompts, extra)
    for i, seq_rows in rows.items():
        expected = hf_logits(model_dir, all_ids[i], dtype)
        positions = [p for p, _ in seq_rows]
        assert positions == list(range(len(all_ids[i])))     # every position computed once
        ours = torch.stack([r for _, r in seq_rows])
        torch.testing.assert_close(ours, expected[positions], atol=atol, rtol=atol)
    return rows


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama3-rope", "untied", "llama-sharded", "qwen3",
                                  "qwen3-yarn", "llama-linear-rope"])
def test_logits_match_transformers(variants, name):
    rows = check_against_hf(variants[name])
    assert sum(len(r) for r in rows.values()) > 30


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama3-rope", "qwen3"])
def test_fused_cpu_kernels_match_transformers(variants, name, native_kernels):
    """The same mixed prefill/decode schedule through the fused C++ layer ops (native.py)."""
    rows = check_against_hf(variants[name], ops=layer_ops(KernelSet(native=native_kernels)))
    assert sum(len(r) for r in rows.values()) > 30


def test_reference_attention_matches_transformers(variants):
    check_against_hf(variants["llama"], attention="reference")


def test_bfloat16_logits_close_to_transformers(variants):
    """bfloat16 both sides; the two implementations round in different places: atol 0.05."""
    check_against_hf(variants["llama"], dtype=torch.bfloat16, atol=5e-2)


def test_variants_are_what_they_claim(variants):
    assert ModelConfig.from_dir(variants["qwen2"]).architecture == "Qwen2ForCausalLM"
    assert ModelConfig.from_dir(variants["mistral"]).sliding_window == 6
    assert ModelConfig.from_dir(variants["llama3-rope"]).rope.rope_type == "llama3"
    assert not ModelConfig.from_dir(variants["untied"]).tie_word_embeddings
    assert (variants["llama-sharded"] / "model.safetensors.index.json").is_file()
    assert ModelConfig.from_dir(variants["qwen3"]).qk_norm and not ModelConfig.from_dir(variants["qwen2"]).qk_norm
    yarn = ModelConfig.from_dir(variants["qwen3-yarn"]).rope
    assert (yarn.rope_type, yarn.factor, yarn.original_max_position_embeddings) == ("yarn", 4.0, 8)
    assert ModelConfig.from_dir(variants["llama-linear-rope"]).rope.rope_type == "linear"


def test_qwen3_decodes_on_the_layer_path(variants, native_kernels):
    """The one-call native decode stack runs the Llama layer only: Qwen3's head norms keep the
    layer path (the startup log says whether decode steps run in one native call)."""
    model, _ = build_model(variants["qwen3"], QuantSpec(), ops=layer_ops(KernelSet(native=native_kernels)))
    assert build_decode_stack(model, KernelSet(native=native_kernels)) is None


def test_model_structure(tiny_llama_dir):
    model, config = build_model(tiny_llama_dir, QuantSpec())
    targets = model.lora_targets()
    assert len(targets) == 4 * config.num_layers
    qkv, o, gate_up, down = targets[:4]
    assert qkv.sub_names == ("q_proj", "k_proj", "v_proj") and qkv.out_sizes == (64, 32, 32)
    assert gate_up.sub_names == ("gate_proj", "up_proj") and gate_up.out_sizes == (128, 128)
    assert (o.sub_names, down.sub_names) == (("o_proj",), ("down_proj",))
    params = config.num_layers * (64 * 128 + 64 * 64 + 2 * 64 * 128 + 128 * 64)
    assert model.linear_weight_bytes() == params * 4


def _write_config(tmp_path: Path, **changes) -> Path:
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10,
           "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, **changes}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_unsupported_architecture_is_refused(tmp_path):
    _write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        build_model(tmp_path, QuantSpec())


def test_config_parsing(tmp_path):
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported .dynamic NTK.*KV cache"):
        ModelConfig.from_dir(_write_config(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="longrope rope scaling needs original_max_position_embeddings"):
        ModelConfig.from_dir(_write_config(tmp_path, rope_scaling={"rope_type": "longrope", "factor": 2.0}))
    with pytest.raises(ValueError, match="rope type 'su' is not supported .Phi-3's name for longrope"):
        ModelConfig.from_dir(_write_config(tmp_path, rope_scaling={"type": "su", "factor": 2.0}))
    old_style = ModelConfig.from_dir(_write_config(tmp_path, rope_theta=5e5, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert (old_style.rope.theta, old_style.rope.rope_type, old_style.head_dim) == (5e5, "llama3", 4)
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_dir(_write_config(tmp_path, architectures=["Qwen2ForCausalLM"],
                                           use_sliding_window=True, sliding_window=4))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_dir(_write_config(tmp_path, hidden_act="gelu"))
    with pytest.raises(ValueError, match="neither model.safetensors"):
        build_model(_write_config(tmp_path), QuantSpec())


def test_tiny_llama_fixture_is_usable(tiny_llama_dir):
    """The shared fixture (SmolLM2 tokenizer, 49152 vocab) loads with our config reader."""
    config = ModelConfig.from_dir(tiny_llama_dir)
    assert (config.vocab_size, config.num_kv_heads, config.tie_word_embeddings) == (49152, 2, True)
    assert build_tiny_llama is not None


STACK_CASES = [("llama", "none", "aten"), ("qwen2", "none", "aten"), ("mistral", "none", "aten"),
               ("llama", "none", "onednn"), ("qwen2", "none", "onednn"), ("mistral", "none", "onednn"),
               ("llama", "bnb-nf4", "native"), ("llama", "hqq-4bit", "native"), ("llama", "bnb-int8", "native"),
               ("qwen2", "hqq-8bit", "native")]


@pytest.mark.parametrize("name,method,linear_kernel", STACK_CASES, ids=["-".join(c) for c in STACK_CASES])
def test_decode_stack_is_bit_equal_to_the_layer_path(variants, name, method, linear_kernel, native_kernels):
    """Decode-only steps through the one-call native stack give the layer-by-layer path's logits
    bit for bit (same kernels, same order: dense, oneDNN, fused quantized GEMMs, HQQ's and bnb
    4-bit's per-part projections); mixed prefill/decode steps keep the layer path."""
    if linear_kernel == "onednn" and not onednn_supported(torch.float32, "cpu"):
        pytest.skip("no oneDNN in this torch build")
    kernels = KernelSet(native=native_kernels)
    spec = QuantSpec(method=method, linear_kernel=linear_kernel)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 13, 5)]
    extra = [torch.randint(0, 512, (5,), generator=gen).tolist() for _ in range(3)]
    # One build for both paths: two builds of the same weights may differ in the last bit of
    # a decode logit (seen on an AVX-512 EPYC; the weights' addresses differ between builds),
    # which says nothing about the stack. The claim here is one model, two paths.
    model, config = build_model(variants[name], spec, ops=layer_ops(kernels))
    choose_linear_kernels(model, spec, kernels, log=lambda _m: None, cache=None)
    results, calls = [drive(model, config, prompts, extra)[0]], []
    stack = model.decode_stack = build_decode_stack(model, kernels)
    kernel = stack.kernel
    stack.kernel = lambda *args: calls.append(args[0].shape[0]) or kernel(*args)
    results.append(drive(model, config, prompts, extra)[0])
    assert calls == [3] * (len(extra[0]) - 1)          # every decode-only step, nothing else
    for seq, layer_rows in results[0].items():
        for (pos, want), (pos_stacked, got) in zip(layer_rows, results[1][seq]):
            assert pos == pos_stacked and torch.equal(got, want), f"seq {seq} position {pos}"


def test_decode_stack_leaves_library_kernels_to_the_layer_path(tiny_llama_dir, native_kernels):
    kernels = KernelSet(native=native_kernels)
    spec = QuantSpec(method="bnb-nf4", linear_kernel="library")
    model, _ = build_model(tiny_llama_dir, spec, ops=layer_ops(kernels))
    choose_linear_kernels(model, spec, kernels, log=lambda _m: None, cache=None)
    assert build_decode_stack(model, kernels).gemms(1) is None        # bitsandbytes' own path
    model, _ = build_model(tiny_llama_dir, QuantSpec(), ops=TORCH_OPS)
    assert build_decode_stack(model, kernels) is None                  # torch layer ops
    assert build_decode_stack(model, KernelSet()) is None              # no native build
