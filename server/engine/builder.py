"""Assemble an LLMEngine from an EngineConfig: model, KV cache, runner, scheduler, LoRA slots."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..layers.base import QuantSpec
from ..lora.fingerprint import base_spec_from_model_config
from ..lora.manager import AdapterManager
from ..lora.ops import select_ops
from ..lora.slot_pool import SlotPool
from ..kernels.linear_choice import choose_linear_kernels
from ..kernels.registry import KernelSet
from ..model.fused_ops import layer_ops
from ..model.config import ModelConfig
from ..model.kv_cache import allocate_kv_caches, num_blocks_for_budget
from ..model.llama import build_model
from .adapters import AdapterGateway
from .block_manager import BlockManager
from .config import EngineConfig
from .engine import LLMEngine
from .io import EngineInfo, GenerationRequest
from .prompt import eos_token_ids, load_tokenizer
from .runner import ModelRunner
from .sampling import Sampler
from .scheduler import Scheduler
from .sequence import SamplingParams

Log = Callable[[str], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def build_engine(config: EngineConfig, store: Any = None, log: Log = print) -> tuple[LLMEngine, EngineInfo]:
    """Load and quantize the model, size the KV cache, wire the engine, and warm it up."""
    started = time.monotonic()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    spec = QuantSpec.resolve(config.quant, dtype, device)
    log(f"[loraplex] loading {config.model_dir} ({spec.method}, {str(dtype).removeprefix('torch.')}, {device})")
    kernels = KernelSet.resolve(config.cpu_kernels, dtype, device, log)
    ops = layer_ops(kernels)
    model, model_config = build_model(config.model_dir, spec, ops=ops)
    linear_kernels = choose_linear_kernels(model, spec, kernels, log=log)
    tokenizer = load_tokenizer(config.model_dir)

    cache, sched = config.cache, config.scheduler
    num_blocks = num_blocks_for_budget(cache.kv_cache_memory, model_config, cache.block_size, dtype, device)
    min_blocks = -(-sched.max_model_len // cache.block_size)
    if num_blocks < min_blocks:
        raise ValueError(f"kv_cache_memory={cache.kv_cache_memory!r} gives {num_blocks} KV blocks; one "
                         f"request of max_model_len={sched.max_model_len} needs {min_blocks}: raise "
                         "--kv-cache-memory or lower --max-total-tokens")
    kv_caches = allocate_kv_caches(model_config, num_blocks, cache.block_size, dtype, device)
    log(f"[loraplex] KV cache: {num_blocks} blocks of {cache.block_size} tokens")

    sampler = Sampler(model_config.vocab_size, device=device, seed=config.seed,
                      argmax=kernels.get("argmax_rows"))
    scheduler = Scheduler(sched, BlockManager(num_blocks=num_blocks, block_size=cache.block_size))

    base_spec = base_spec_from_model_config(model_config, spec.method)
    gateway = pool = None
    if store is not None:
        adapter_dtype = dtype if config.lora.adapter_dtype == "compute" else _DTYPES[config.lora.adapter_dtype]
        pool = SlotPool(model.lora_targets(), sched.max_loras, config.lora.max_lora_rank, adapter_dtype, device,
                        ops=select_ops(device, cpu_kernels=kernels.native))
        gateway = AdapterGateway(store, AdapterManager(pool))
    runner = ModelRunner(model, model_config, kv_caches, cache.block_size, sampler, device=device, lora=pool)

    engine = LLMEngine(config, scheduler, runner, tokenizer, eos_token_ids(config.model_dir, tokenizer),
                       adapters=gateway)
    info = EngineInfo(model=str(config.model_dir), architecture=model_config.architecture,
                      quantization=spec.method, dtype=str(dtype).removeprefix("torch."),
                      device=device, base_fingerprint=base_spec.fingerprint,
                      linear_weight_bytes=model.linear_weight_bytes(), base_spec=base_spec,
                      vocab_size=model_config.vocab_size, linear_kernels=linear_kernels,
                      cpu_isa="" if kernels.native is None else kernels.native.quant_isa())
    warm_up(engine)
    log(f"[loraplex] model ready in {time.monotonic() - started:.1f}s "
        f"(linear weights {info.linear_weight_bytes / 2**20:.1f} MiB, {ops.name} layer ops)")
    return engine, info


def warm_up(engine: LLMEngine) -> None:
    """Run one short request end to end so the first real request pays no start-up cost."""
    request = GenerationRequest(request_id="__warmup__", prompt_token_ids=(1, 2, 3),
                                sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.add_request(request)
    while engine.has_work():
        engine.step()


def base_spec_for(config: EngineConfig):
    """The served base's BaseSpec (fingerprint, module shapes) from config.json alone.

    The adapter store needs it before the (slow) model load, to validate uploads.
    """
    return base_spec_from_model_config(ModelConfig.from_dir(config.model_dir), config.quant.method)
