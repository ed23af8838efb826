"""Teacher-forced log-probabilities of a text under base (+ one adapter), through loraplex's model.

The model runs once over the whole token sequence as a single prefill: one ForwardContext with
one sequence, a private paged KV cache just big enough for it, and (optionally) a one-slot LoRA
pool so the adapter's delta is computed unmerged, exactly as the server computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...adapters_store.types import LoadedAdapter
from ..engine.builder import resolve_device, resolve_dtype
from ..layers.base import QuantSpec
from ..lora.batch_info import LoraBatchInfo
from ..lora.fingerprint import base_spec_from_model_config
from ..lora.slot_pool import SlotPool
from ..model.context import AttentionMetadata, ForwardContext
from ..model.kv_cache import allocate_kv_caches
from ..model.llama import build_model

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Perplexity:
    """Mean negative log-likelihood over the predicted tokens (all but the first) and its exp."""

    nll: float
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll).exp())


class Scorer:
    """A loaded (maybe quantized) base model that scores token sequences, with or without an adapter."""

    def __init__(self, model_dir: str | Path, quantize: str = "none", dtype: str = "float32",
                 device: str = "cpu", hqq_group_size: int = 64, max_lora_rank: int = 256,
                 adapter_dtype: str = "float32"):
        """adapter_dtype: float32, bfloat16 or float16 slots; the served LoRA kernels run them
        (the fused CPU kernel, float32 sums, where it builds)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        spec = QuantSpec(method=quantize, compute_dtype=self.dtype, device=self.device,
                         hqq_group_size=hqq_group_size)
        self.model, self.config = build_model(model_dir, spec)
        self.base_spec = base_spec_from_model_config(self.config, quantize)
        self.max_lora_rank = max_lora_rank
        self.adapter_dtype = getattr(torch, adapter_dtype)
        self._pool: SlotPool | None = None

    def resident_bytes(self) -> int:
        """Resident bytes of the decoder's linear weights (quantized data, scales, zeros)."""
        return self.model.linear_weight_bytes()

    def set_adapter(self, adapter: LoadedAdapter | None) -> None:
        """Use `adapter` (unmerged, in slot 0) for the following calls; None = base only."""
        if adapter is None:
            if self._pool is not None:
                self._pool.clear(0)
            return
        if self._pool is None:
            from ..kernels.registry import KernelSet
            from ..lora.ops import select_ops

            kernels = KernelSet.resolve("auto", self.dtype, self.device, log=lambda _m: None)
            from ..lora.vocab import VocabSlots

            vocab = VocabSlots(self.config.vocab_size, self.config.hidden_size, self.dtype, self.device)
            self._pool = SlotPool(self.model.lora_targets(), 1, self.max_lora_rank, self.adapter_dtype,
                                  self.device, ops=select_ops(self.device, cpu_kernels=kernels.native), vocab=vocab)
        self._pool.load(0, adapter)

    @property
    def has_adapter(self) -> bool:
        return self._pool is not None and self._pool.slot_ranks[0] > 0

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T] token ids -> [T, vocab] float32 logits (row t predicts token t + 1)."""
        if not token_ids:
            raise ValueError("cannot score an empty token sequence")
        n = len(token_ids)
        num_blocks = -(-n // BLOCK_SIZE)
        kv_caches = allocate_kv_caches(self.config, num_blocks, BLOCK_SIZE, self.dtype, self.device)
        self.model.ensure_positions(n)
        ctx = self._context(n, num_blocks)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, ctx, kv_caches)                # [T, hidden]
            logits = self.model.compute_logits(hidden)              # [T, vocab]
            if ctx.lora is not None and ctx.lora.vocab is not None:   # the adapter's own lm_head
                logits = ctx.lora.vocab.widened_logits(hidden, logits, ctx.lora.info.token_slots,
                                                       ctx.lora.info.active_slots)
            return logits

    def token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """[T - 1] float32: log p(token t | tokens < t) for t = 1..T-1 (teacher forcing)."""
        logits = self.logits(token_ids)[:-1]                        # [T-1, vocab]
        targets = torch.tensor(token_ids[1:], dtype=torch.int64, device=logits.device)
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)

    def perplexity(self, token_ids: list[int], window: int = 1024) -> Perplexity:
        """Perplexity over non-overlapping windows of `window` tokens (each scored from scratch)."""
        if len(token_ids) < 2:
            raise ValueError("perplexity needs at least 2 tokens")
        total, count = 0.0, 0
        for start in range(0, len(token_ids) - 1, window):
            chunk = token_ids[start:start + window]
            if len(chunk) < 2:
                break
            logprobs = self.token_logprobs(chunk)
            total -= float(logprobs.double().sum())
            count += logprobs.numel()
        return Perplexity(nll=total / count, num_tokens=count)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation by re-scoring the growing sequence (simple; for fidelity checks)."""
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[len(prompt_ids):]

    def _context(self, n: int, num_blocks: int) -> ForwardContext:
        device = self.device
        attn = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int64, device=device),
            seq_lens=torch.tensor([n], dtype=torch.int64, device=device),
            block_tables=torch.arange(num_blocks, dtype=torch.int64, device=device)[None, :],
            slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
            query_lens=(n,), context_lens=(n,), block_size=BLOCK_SIZE)
        lora = None
        if self.has_adapter:
            info = LoraBatchInfo.from_token_slots(torch.zeros(n, dtype=torch.int64), device)
            lora = self._pool.prepare_step(info)                    # the step's LoRA routing, once
        return ForwardContext(positions=torch.arange(n, dtype=torch.int64, device=device), attn=attn, lora=lora)
