"""Kernel choice by measurement for the model's linear layers (`--linear-kernel auto`).

At start-up, for each distinct layer shape (backend, dtype, out x in, quantization group) the
candidate kernels (`QuantizedLinear.kernel_candidates`: "library", "native" fused
dequantize-GEMM, "onednn", "aten") are timed on row counts 1, 16 and 64 and the fastest
serves each row range (dense layers: one kernel for all rows, the fastest in total, so only
one copy of the weight stays). Quantized layers serve more than 64 rows with "library"
(dequantize, then one GEMM). One timed call runs the candidate over every layer of that
shape in turn, as a decode step does, so the weights stream from memory instead of sitting in
a cache that one layer alone fits in (timed on one hot layer, an AVX2 EPYC picked F.linear for
shapes that served faster with prepacked oneDNN). The choices are cached per machine in
`$LORAPLEX_CACHE/kernel-choice/<cpu>-torch<version>-src<kernels hash>-<method>.json`, so a restart
does not measure again, and a new CPU, torch, kernel source or measuring method (or an
unseen shape) does.
`--linear-kernel NAME` forces NAME on every layer that has it and measures the others.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..cache_dirs import cache_root
from ..kernels import native
from .base import QuantizedLinear, QuantSpec
from .concat import ConcatLinear

BUCKETS = (1, 16, 64)             # measured row counts
RANGES = (4, 32, 64)              # rows <= 4 take bucket 1's choice, <= 32 bucket 16's, ...
MAX_ROWS = 2**62
# Layers of one shape timed together: enough to sweep weights out of the caches as decode does;
# a MoE model has hundreds of expert layers per shape, which would make the first start crawl.
MAX_MEASURED_LAYERS = 32
METHOD = "sweep1"                 # how choices are measured; part of the cache file name
Log = Callable[[str], None]
Timer = Callable[[Callable[[], object]], float]


@dataclass(frozen=True)
class KernelChoice:
    """The kernels serving one layer shape: (max_rows, kernel) ranges, ascending."""

    key: str                                  # backend|dtype|out x in|group
    num_layers: int
    routes: tuple[tuple[int, str], ...]
    source: str                               # measured, cached or forced

    def describe(self) -> str:
        ranges, low = [], 1
        for max_rows, name in self.routes:
            high = "" if max_rows >= MAX_ROWS else str(max_rows)
            ranges.append(f"{name} ({low}-{high} rows)" if high else f"{name} ({low}+ rows)")
            low = max_rows + 1
        return f"{self.key} x{self.num_layers}: {', '.join(ranges)} [{self.source}]"


def layer_key(layer: QuantizedLinear) -> str:
    pack = layer.native_kernel[1] if layer.native_kernel is not None else None
    group = f"|g{pack.group}" if pack is not None else ""
    dtype = str(getattr(layer, "compute_dtype", "")).removeprefix("torch.")
    return f"{type(layer).__name__}{getattr(layer, 'method_tag', '')}|{dtype}|{layer.out_features}x{layer.in_features}{group}"


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Fastest wall time of fn over `repeats` calls after two warm-up calls (other processes
    only ever slow a call down, so the minimum is the least noisy estimate on a shared host)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cache_file(root: Path | None = None) -> Path:
    version = f"torch{torch.__version__}"
    name = f"{native._cpu_tag()}-{version}-src{native.source_tag()}-{METHOD}.json"
    return (root or cache_root()) / "kernel-choice" / name


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)                       # atomic: concurrent servers never read half a file


def measure_routes(layers: list[QuantizedLinear], candidates: Iterable[str], dense: bool,
                   timer: Timer = best_seconds) -> tuple[tuple[int, str], ...]:
    """Time every candidate on BUCKETS rows, one call running it over all `layers` (the layers of
    one shape, in model order); the routes serving each range with the fastest."""
    per_layer = [layer.kernel_candidates() for layer in layers]
    names = [n for n in candidates if n in per_layer[0]]
    dtype = getattr(layers[0], "compute_dtype", torch.float32)
    times = {}
    with torch.inference_mode():
        for rows in BUCKETS:
            x = torch.randn(rows, layers[0].in_features, dtype=dtype)             # [rows, in]
            for name in names:
                sweep = [kernels[name] for kernels in per_layer]
                times[rows, name] = timer(lambda sweep=sweep: [kernel(x) for kernel in sweep])
    if dense:
        best = min(names, key=lambda n: sum(times[r, n] / r for r in BUCKETS))
        return ((MAX_ROWS, best),)
    return tuple((max_rows, min(names, key=lambda n: times[rows, n]))
                 for rows, max_rows in zip(BUCKETS, RANGES))


def choose_linear_kernels(model, spec: QuantSpec, kernels, log: Log = print,
                          cache: Path | None | str = "default",
                          timer: Timer = best_seconds) -> tuple[KernelChoice, ...]:
    """Attach the native kernels, pick each layer shape's routes, set them, log them; then let
    each ConcatLinear join its parts' packs (`ConcatLinear.join_native`)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.kernel_candidates()]
    for layer in layers:
        layer.attach_native(kernels.native)
    path = cache_file() if cache == "default" else cache
    cached = _read_cache(path)
    groups: dict[str, list[QuantizedLinear]] = {}
    for layer in layers:
        groups.setdefault(layer_key(layer), []).append(layer)
    choices, changed = [], False
    for key, members in groups.items():
        candidates = members[0].kernel_candidates()
        dense = "native" not in candidates and "library" not in candidates
        routes, source = _forced(spec.linear_kernel, candidates, dense)
        if routes is None and len(candidates) == 1:
            routes, source = _single(next(iter(candidates)), dense), "only"
        if routes is None and key in cached:
            routes, source = tuple((int(r), str(n)) for r, n in cached[key]), "cached"
            if any(n not in candidates for _, n in routes):
                routes = None
        if routes is None:
            routes, source = measure_routes(members[:MAX_MEASURED_LAYERS], candidates, dense, timer), "measured"
            cached[key], changed = [list(r) for r in routes], True
        for layer in members:
            layer.set_kernel_routes(routes)
        choices.append(KernelChoice(key, len(members), routes, source))
    if changed:
        _write_cache(path, cached)
    for module in model.modules():
        if isinstance(module, ConcatLinear):
            module.join_native()
    for choice in choices:
        log(f"[loraplex] linear kernel {choice.describe()}")
    return tuple(choices)


def _single(name: str, dense: bool) -> tuple[tuple[int, str], ...]:
    return ((MAX_ROWS, name),) if dense else tuple((r, name) for r in RANGES)


def _forced(choice: str, candidates: dict, dense: bool):
    if choice == "auto" or choice not in candidates:
        return None, ""
    return _single(choice, dense), "forced"
