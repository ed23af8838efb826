"""Assemble an LLMEngine from an EngineConfig: model, KV cache, runner, scheduler, LoRA slots."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..layers.base import QuantSpec
from ..lora.experts import ExpertSlots
from ..lora.fingerprint import base_spec_from_model_config
from ..lora.manager import AdapterManager
from ..lora.ops import select_ops
from ..lora.slot_pool import SlotPool
from ..lora.vocab import VocabSlots
from ..layers.linear_choice import choose_linear_kernels
from ..model.decode_stack import build_decode_stack
from ..kernels.registry import KernelSet
from ..model.config import ModelConfig
from ..model.fused_ops import layer_ops
from ..model.kv_cache import allocate_kv_caches
from ..model.kv_sizing import KVCacheDemand, KVCachePlan, plan_kv_cache
from ..model.llama import build_model
from ..model.rope import check_position_limit, trained_length_note
from .adapters import AdapterGateway
from .block_manager import BlockManager
from .config import EngineConfig
from .engine import LLMEngine
from .io import EngineInfo
from .adapter_tokenizers import AdapterTokenizers, base_tokens
from .prompt import eos_token_ids, load_tokenizer
from .runner import ModelRunner
from .sampling import Sampler
from .scheduler import Scheduler
from .warmup import warm_up

Log = Callable[[str], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """'auto' -> cuda when usable, else cpu. An explicit cuda device must work: no silent CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        require_cuda(device)
    return device


class DeviceUnavailable(RuntimeError):
    """--device names a device this process cannot use."""


def require_cuda(device: str) -> None:
    """Raise DeviceUnavailable with the reason when `device` (cuda, cuda:N) cannot run a kernel."""
    hint = "; use --device cpu (or auto) to serve on the CPU"
    if torch.version.cuda is None:
        raise DeviceUnavailable(f"--device {device}: this torch ({torch.__version__}) is a CPU-only "
                                f"build without CUDA{hint}")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {device}: torch {torch.__version__} (CUDA {torch.version.cuda}) "
                                f"finds no usable GPU or driver (is the GPU passed to the container, "
                                f"e.g. docker run --gpus all?){hint}")
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                                f"are visible{hint}")
    try:
        torch.ones(1, device=device).add_(1).cpu()
    except RuntimeError as exc:
        raise DeviceUnavailable(f"--device {device}: a first CUDA operation failed ({exc}){hint}") from exc


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def build_engine(config: EngineConfig, store: Any = None, log: Log = print,
                 detokenize: bool = True) -> tuple[LLMEngine, EngineInfo]:
    """Load and quantize the model, size the KV cache, wire the engine, and warm it up.
    detokenize=False: an engine whose outputs carry token ids only (LLMEngine)."""
    started = time.monotonic()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    spec = QuantSpec.resolve(config.quant, dtype, device)
    log(f"[loraplex] loading {config.model_dir} ({spec.method}, {str(dtype).removeprefix('torch.')}, {device})")
    kernels = KernelSet.resolve(config.cpu_kernels, dtype, device, log)
    ops = layer_ops(kernels, config.cpu_kernels)
    model, model_config = build_model(config.model_dir, spec, ops=ops)
    check_position_limit(model_config.rope, config.scheduler.max_model_len)
    note = trained_length_note(model_config.max_position_embeddings, config.scheduler.max_model_len)
    if note:
        log(f"[loraplex] warning: {note}")
    linear_kernels = choose_linear_kernels(model, spec, kernels, log=log)
    model.decode_stack = build_decode_stack(model, kernels)
    tokenizer = load_tokenizer(config.model_dir)

    cache, sched = config.cache, config.scheduler
    kv_plan = plan_kv_cache_for(config, model_config, dtype, device)
    num_blocks = kv_plan.num_blocks
    kv_caches = allocate_kv_caches(model_config, num_blocks, cache.block_size, dtype, device)
    log(f"[loraplex] KV cache: {kv_plan.describe()}")

    constraints, guided = structured_output(config, tokenizer, model_config.vocab_size,
                                            eos_token_ids(config.model_dir, tokenizer))
    sampler = Sampler(model_config.vocab_size, device=device, seed=config.seed,
                      argmax=kernels.get("argmax_rows"), logits_mask=guided)
    blocks = BlockManager(num_blocks=num_blocks, block_size=cache.block_size,
                          enable_caching=cache.prefix_caching, model_namespace=f"{config.model_dir}|{spec.method}|{dtype}")
    scheduler = Scheduler(sched, blocks)

    base_spec = base_spec_from_model_config(model_config, spec.method)
    gateway = pool = vocab = None
    if store is not None:
        adapter_dtype = dtype if config.lora.adapter_dtype == "compute" else _DTYPES[config.lora.adapter_dtype]
        vocab = VocabSlots(model_config.vocab_size, model_config.hidden_size, dtype, device)
        if model_config.gemma is not None and model_config.gemma.final_softcap is not None:
            vocab = None     # an lm_head delta would land after the final soft-cap: such adapters are refused
        blocks = model.moe_blocks()
        experts = (ExpertSlots(blocks, sched.max_loras, config.lora.max_lora_rank, adapter_dtype, device)
                   if blocks else None)
        pool = SlotPool(model.lora_targets(), sched.max_loras, config.lora.max_lora_rank, adapter_dtype, device,
                        ops=select_ops(device, cpu_kernels=kernels.native), vocab=vocab, experts=experts)
        gateway = AdapterGateway(store, AdapterManager(pool))
        set_finisher = getattr(store, "set_load_finisher", None)
        if set_finisher is not None:     # DoRA scales derived once per version, on the load threads
            set_finisher(pool.dora_scaler)
    runner = ModelRunner(model, model_config, kv_caches, cache.block_size, sampler, device=device, lora=pool)

    tokenizers = AdapterTokenizers(tokenizer, model_config.vocab_size, store)
    engine = LLMEngine(config, scheduler, runner, tokenizer, eos_token_ids(config.model_dir, tokenizer),
                       adapters=gateway, constraints=constraints, guided=guided, tokenizers=tokenizers,
                       detokenize=detokenize)
    set_template_check = getattr(store, "set_template_check", None)
    if set_template_check is not None:   # adapters' own chat templates: test-rendered at upload
        set_template_check(engine.chat.check_adapter_template)
    set_base_tokens = getattr(store, "set_base_tokens", None)
    if set_base_tokens is not None and vocab is not None:   # resized vocabularies: checked against these
        set_base_tokens(base_tokens(tokenizer))
    info = EngineInfo(model=str(config.model_dir), architecture=model_config.architecture,
                      quantization=spec.method, dtype=str(dtype).removeprefix("torch."),
                      device=device, base_fingerprint=base_spec.fingerprint,
                      linear_weight_bytes=model.linear_weight_bytes(), base_spec=base_spec,
                      vocab_size=model_config.vocab_size, linear_kernels=linear_kernels,
                      cpu_isa="" if kernels.native is None else kernels.native.quant_isa(),
                      decode_path="layers" if model.decode_stack is None else "native-stack",
                      max_prompt_bytes=engine.max_prompt_bytes,
                      chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else "")
    warm_up(engine, pool, log)
    log(f"[loraplex] model ready in {time.monotonic() - started:.1f}s "
        f"(linear weights {info.linear_weight_bytes / 2**20:.1f} MiB, {ops.name} layer ops"
        f"{', decode steps in one native call' if model.decode_stack is not None else ''})")
    return engine, info


def plan_kv_cache_for(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                      device: str, available_bytes: int | None = None) -> KVCachePlan:
    """The KV cache's block count for this engine (kv_sizing.py); ValueError when one request of
    max_model_len would not fit."""
    cache, sched = config.cache, config.scheduler
    demand = KVCacheDemand(sched.max_num_seqs, sched.max_model_len, cache.block_size,
                           cache.prefix_cache_share if cache.prefix_caching else 0.0)
    plan = plan_kv_cache(cache.kv_cache_memory, cache.kv_cache_max_memory, demand, model_config, dtype,
                         device, available_bytes)
    if plan.num_blocks < demand.blocks_per_seq:
        flag = "--kv-cache-memory" if plan.demand_blocks == 0 else "--kv-cache-max-memory"
        raise ValueError(f"KV cache: {plan.describe()}; one request of max_model_len={sched.max_model_len} "
                         f"needs {demand.blocks_per_seq} blocks: raise {flag} or lower --max-total-tokens")
    return plan


def structured_output(config: EngineConfig, tokenizer: Any, lm_vocab_size: int, eos_ids: tuple[int, ...]):
    """(ConstraintCompiler, GuidedDecoding), or (None, None) when turned off."""
    structured = config.structured
    if not structured.structured_output:
        return None, None
    from .constraints.compiler import ConstraintCompiler
    from .constraints.masks import GuidedDecoding
    from .constraints.spec import ConstraintLimits

    limits = ConstraintLimits(max_source_bytes=config.limits.max_constraint_bytes,
                              cache_size=structured.constraint_cache_size,
                              compile_timeout_s=structured.constraint_timeout_s,
                              max_mask_ms=structured.constraint_mask_budget_ms)
    compiler = ConstraintCompiler(tokenizer, lm_vocab_size, eos_ids, limits)
    return compiler, GuidedDecoding(compiler.vocab_size, lm_vocab_size, max_mask_ms=limits.max_mask_ms)


def base_spec_for(config: EngineConfig):
    """The served base's BaseSpec (fingerprint, module shapes) from config.json alone.

    The adapter store needs it before the (slow) model load, to validate uploads.
    """
    return base_spec_from_model_config(ModelConfig.from_dir(config.model_dir), config.quant.method)
