"""Shared helpers for the LoRA tests: small real projections, random adapters, a direct oracle."""

from __future__ import annotations

import torch

from loraplex.adapters_store.types import LoadedAdapter, LoraConfigInfo
from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.dense import DenseLinear
from loraplex.server.layers.proj import ProjLinear

HIDDEN, KV, INTER = 24, 8, 40
MODULE_SHAPES = {  # name -> (in_features, out_features)
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def make_targets(num_layers: int = 2, dtype: torch.dtype = torch.float32) -> list[ProjLinear]:
    """Real ProjLinear projections (dense random bases) in the model's order."""
    gen = torch.Generator().manual_seed(123)
    spec = QuantSpec(compute_dtype=dtype)
    targets = []
    for layer in range(num_layers):
        for names in GROUPS:
            in_features = MODULE_SHAPES[names[0]][0]
            outs = tuple(MODULE_SHAPES[n][1] for n in names)
            weight = torch.randn(sum(outs), in_features, generator=gen) * 0.1
            targets.append(ProjLinear(DenseLinear(weight.to(dtype), None, spec), layer, names, outs))
    return targets


def make_adapter(key: str, rank: int, seed: int, modules=tuple(MODULE_SHAPES), num_layers: int = 2,
                 alpha: float = 16.0, rslora: bool = False) -> LoadedAdapter:
    """A random adapter with non-zero A and B on `modules` of every layer."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(num_layers):
        for name in modules:
            in_features, out_features = MODULE_SHAPES[name]
            weights[(layer, name)] = (torch.randn(rank, in_features, generator=gen) * 0.3,
                                      torch.randn(out_features, rank, generator=gen) * 0.3)
    config = LoraConfigInfo(rank=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=tuple(modules))
    nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
    return LoadedAdapter(key=key, config=config, weights=weights, nbytes=nbytes)


def oracle_delta(target: ProjLinear, x: torch.Tensor, token_adapters: list[LoadedAdapter | None],
                 absolute: bool = False) -> torch.Tensor:
    """[T, out] delta straight from the adapters' own tensors (float64, no pool, no ops).
    absolute: the same on |x|, |A|, |B|, |scaling| (each element's sum of |products|, for
    tests/error_bounds.py)."""
    wide = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    delta = torch.zeros(x.shape[0], target.out_features, dtype=torch.float64)
    col = 0
    for name, out_m in zip(target.sub_names, target.out_sizes):
        for t, adapter in enumerate(token_adapters):
            pair = adapter.weights.get((target.layer_idx, name)) if adapter is not None else None
            if pair is not None:
                lora_a, lora_b = (wide(w) for w in pair)
                scaling = abs(adapter.config.scaling) if absolute else adapter.config.scaling
                delta[t, col:col + out_m] = scaling * (wide(x[t]) @ lora_a.T @ lora_b.T)
        col += out_m
    return delta
