"""Blob store -> host tier: read a weights blob, verify its sha256, parse it into a LoadedAdapter.

Loads run on a small thread pool (`prefetch`) so the engine's step loop never waits on disk;
concurrent requests for the same key share one load.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors

from .cache import HostCache
from .errors import AdapterNotFound, IntegrityError
from .records import AdapterRecord
from .expert_tensors import expert_weights, split_experts, targeted_params
from .tensor_names import parse_tensor_name
from .types import LoadedAdapter
from .vocab_tensors import split_vocab, vocab_weights

RecordLookup = Callable[[str], AdapterRecord]          # key -> loadable record, or AdapterNotFound
CorruptHandler = Callable[[str, str], None]            # (key, reason) -> quarantine


Finisher = Callable[[LoadedAdapter], LoadedAdapter]   # derives serving tensors (DoRA scales) at load


def parse_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """PEFT tensors -> {(layer, module): (A [r, in], B [out, r])} in `dtype` (magnitudes skipped)."""
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = parse_tensor_name(name)
        if parsed.factor != "M":
            factors.setdefault((parsed.layer_idx, parsed.module), {})[parsed.factor] = tensor.to(dtype).contiguous()
    return {key: (pair["A"], pair["B"]) for key, pair in sorted(factors.items())}


def parse_magnitudes(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """DoRA magnitude vectors: {(layer, module): m [out]} in float32 (PEFT keeps them in float32)."""
    magnitudes = {}
    for name, tensor in tensors.items():
        parsed = parse_tensor_name(name)
        if parsed.factor == "M":
            magnitudes[(parsed.layer_idx, parsed.module)] = tensor.to(torch.float32).contiguous()
    return dict(sorted(magnitudes.items()))


def build_loaded_adapter(key: str, config, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> LoadedAdapter:
    """A LoadedAdapter from a validated adapter's tensors (nbytes counts every tensor held; the
    base-table copies PEFT may save beside embedding LoRA are dropped; MoE expert tensors go to
    `experts`)."""
    tensors, vocab_tensors = split_vocab(tensors)
    tensors, expert_tensors = split_experts(tensors)
    weights = parse_weights(tensors, dtype)
    magnitudes = parse_magnitudes(tensors)
    vocab = vocab_weights(vocab_tensors, dtype)
    experts = expert_weights(expert_tensors, targeted_params(config.target_modules), dtype)
    nbytes = (sum(a.nbytes + b.nbytes for a, b in weights.values()) + sum(m.nbytes for m in magnitudes.values())
              + (0 if vocab is None else vocab.nbytes) + sum(a.nbytes + b.nbytes for a, b in experts.values()))
    return LoadedAdapter(key=key, config=config, weights=weights, nbytes=nbytes, magnitudes=magnitudes,
                         vocab=vocab, experts=experts)


def read_verified(read: Callable[[str], bytes], expected_sha256: str, key: str) -> bytes:
    """The blob's bytes (from `read(digest)`); IntegrityError if they no longer hash to the recorded digest."""
    data = read(expected_sha256)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise IntegrityError(f"adapter {key}: weights blob {expected_sha256} hashes to {actual}, not the "
                             f"recorded digest; the stored blob was corrupted. The adapter is quarantined; "
                             f"delete it and upload it again")
    return data


class AdapterLoader:
    """Loads adapters into the host cache, on demand (`load`) or in the background (`prefetch`)."""

    def __init__(self, cache: HostCache, read_blob: Callable[[str], bytes], lookup: RecordLookup,
                 on_corrupt: CorruptHandler, num_threads: int, dtype: torch.dtype = torch.float32):
        self.cache = cache
        self._read_blob = read_blob
        self._lookup = lookup
        self._on_corrupt = on_corrupt
        self._dtype = dtype
        self._finish: Finisher | None = None
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="adapter-load")
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}

    def load(self, key: str) -> LoadedAdapter:
        """The adapter from the host cache, loading it from disk (in this thread) on a miss."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        with self._lock:
            future = self._inflight.get(key)
        if future is not None:
            return future.result()
        return self._load_from_disk(key)

    def prefetch(self, key: str) -> Future:
        """A future of the loaded adapter; completes at once if it is already in host memory."""
        with self._lock:
            future = self._inflight.get(key)
            if future is not None:
                return future
            if self.cache.contains(key):
                done: Future = Future()
                done.set_result(self.cache.get(key))
                return done
            future = self._pool.submit(self._load_from_disk, key)
            self._inflight[key] = future
        future.add_done_callback(lambda _f, k=key: self._forget(k))
        return future

    def is_loaded(self, key: str) -> bool:
        return self.cache.contains(key)

    def set_finisher(self, finish: Finisher | None) -> None:
        """Run `finish` on every adapter loaded from now on, on the load thread, before it enters
        the host cache (the engine derives DoRA's per-output scales there, off the step loop)."""
        self._finish = finish

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _load_from_disk(self, key: str) -> LoadedAdapter:
        started = time.perf_counter()
        record = self._lookup(key)
        try:
            data = read_verified(self._read_blob, record.sha256, key)
        except FileNotFoundError:
            self._lookup(key)                          # raises AdapterNotFound if it was deleted meanwhile
            reason = f"adapter {key}: its weights blob is missing from the blob store; delete and upload it again"
            self._on_corrupt(key, reason)
            raise IntegrityError(reason) from None
        except IntegrityError as error:
            self._on_corrupt(key, str(error))
            raise
        adapter = build_loaded_adapter(key, record.config, load_safetensors(data), self._dtype)
        if self._finish is not None:
            adapter = self._finish(adapter)
        self.cache.put(adapter)
        try:
            self._lookup(key)
        except AdapterNotFound:
            self.cache.pop(key)                        # deleted while loading: keep it out of the cache
            raise
        self.cache.record_load(time.perf_counter() - started)
        return adapter
