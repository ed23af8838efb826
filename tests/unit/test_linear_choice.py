"""Linear kernel choice by measurement: forced choices, the per-machine cache and its keys."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.server.kernels import native
from loraplex.server.layers import linear_choice
from loraplex.server.kernels.registry import KernelSet
from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.cpu_gemm import onednn_supported
from loraplex.server.layers.factory import build_linear


class CountingTimer:
    """A deterministic timer: 'native' is fastest up to 16 rows, 'library' beyond."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        fn()
        return 0.0


def _model(method: str, spec_kwargs=None, shapes=((64, 128), (32, 128))):
    spec = QuantSpec(method=method, **(spec_kwargs or {}))
    layers = [build_linear(torch.randn(o, i) * 0.05, None, spec) for o, i in shapes]
    return torch.nn.ModuleList(layers), spec


def _timer_preferring(ranking: dict[int, list[str]]):
    """Timer whose fastest kernel at each bucket is ranking[rows][0]."""
    def timer(fn):
        return 0.0
    calls = []

    def measure(layer, candidates, dense, timer=timer):
        calls.append(layer)
        if dense:
            return ((linear_choice.MAX_ROWS, ranking[1][0]),)
        return tuple((max_rows, ranking[rows][0]) for rows, max_rows in
                     zip(linear_choice.BUCKETS, linear_choice.RANGES))
    return measure, calls


def test_measured_choice_is_cached_and_reused(tmp_path, native_kernels, monkeypatch):
    measure, calls = _timer_preferring({1: ["native"], 16: ["native"], 64: ["library"]})
    monkeypatch.setattr(linear_choice, "measure_routes", measure)
    model, spec = _model("bnb-nf4")
    cache = tmp_path / "choice.json"
    lines: list[str] = []
    choices = linear_choice.choose_linear_kernels(model, spec, KernelSet(native=native_kernels),
                                                  log=lines.append, cache=cache)
    assert len(calls) == 2 and {c.source for c in choices} == {"measured"}
    assert choices[0].routes == ((4, "native"), (32, "native"), (64, "library"))
    assert any("native (1-4 rows)" in line and "library (33-64 rows)" in line for line in lines)
    layer = model[0]
    x = torch.randn(3, 128)
    assert torch.allclose(layer.linear(x), layer.kernel_candidates()["native"](x))
    # a second start on the same machine reads the cache: nothing is measured again
    model2, _ = _model("bnb-nf4")
    again = linear_choice.choose_linear_kernels(model2, spec, KernelSet(native=native_kernels),
                                                log=lines.append, cache=cache)
    assert len(calls) == 2 and {c.source for c in again} == {"cached"}
    assert again[0].routes == choices[0].routes
    # a new shape is measured; the known ones stay cached
    model3, _ = _model("bnb-nf4", shapes=((64, 128), (48, 256)))
    third = linear_choice.choose_linear_kernels(model3, spec, KernelSet(native=native_kernels),
                                                log=lines.append, cache=cache)
    assert [c.source for c in third] == ["cached", "measured"] and len(calls) == 3
    assert len(json.loads(cache.read_text())) == 3


def test_cache_file_changes_with_the_cpu_and_the_kernel_sources(tmp_path, monkeypatch):
    first = linear_choice.cache_file(tmp_path)
    monkeypatch.setattr(native, "_cpu_tag", lambda: "othercpu")
    other_cpu = linear_choice.cache_file(tmp_path)
    monkeypatch.setattr(native, "source_tag", lambda: "othersrc")
    other_src = linear_choice.cache_file(tmp_path)
    monkeypatch.setattr(linear_choice, "METHOD", "othermethod")
    other_method = linear_choice.cache_file(tmp_path)
    assert len({first, other_cpu, other_src, other_method}) == 4 and first.parent == other_method.parent


def test_one_timed_call_runs_the_candidate_over_every_layer_of_the_shape():
    """A decode step streams every layer's weight once; the measurement does the same."""
    model, _ = _model("none", shapes=((48, 64), (48, 64), (48, 64)))
    ran: list[int] = []
    for index, layer in enumerate(model):
        kernels = layer.kernel_candidates()
        layer.kernel_candidates = lambda kernels=kernels, index=index: {
            name: (lambda x, k=k: (ran.append(index), k(x))[1]) for name, k in kernels.items()}

    def timer(fn):
        ran.clear()
        fn()
        assert ran == [0, 1, 2]
        return 1.0
    routes = linear_choice.measure_routes(list(model), ["aten", "onednn"], dense=True, timer=timer)
    assert routes[0][1] in ("aten", "onednn")


@pytest.mark.parametrize("forced", ["native", "library"])
def test_forced_choice_is_not_measured(tmp_path, native_kernels, forced, monkeypatch):
    measure, calls = _timer_preferring({1: ["x"], 16: ["x"], 64: ["x"]})
    monkeypatch.setattr(linear_choice, "measure_routes", measure)
    model, spec = _model("hqq-4bit", {"linear_kernel": forced})
    choices = linear_choice.choose_linear_kernels(model, spec, KernelSet(native=native_kernels),
                                                  log=lambda _m: None, cache=tmp_path / "c.json")
    assert not calls and {c.source for c in choices} == {"forced"}
    assert all(name == forced for c in choices for _, name in c.routes)
    if forced == "library":
        assert model[0].native_kernel is None           # the unused nibble copy is dropped


def test_without_native_kernels_the_library_path_is_the_only_one(tmp_path):
    model, spec = _model("eetq")
    choices = linear_choice.choose_linear_kernels(model, spec, KernelSet(), log=lambda _m: None,
                                                  cache=tmp_path / "c.json")
    assert {c.source for c in choices} == {"only"} and not (tmp_path / "c.json").exists()


def test_real_measurement_picks_a_candidate_and_serves_it(tmp_path, native_kernels):
    model, spec = _model("hqq-8bit")
    timer = CountingTimer()
    choices = linear_choice.choose_linear_kernels(model, spec, KernelSet(native=native_kernels),
                                                  log=lambda _m: None, cache=tmp_path / "c.json",
                                                  timer=timer)
    assert timer.calls == 2 * 2 * len(linear_choice.BUCKETS)   # 2 shapes, 2 candidates
    for choice in choices:
        assert {name for _, name in choice.routes} <= {"native", "library"}
    layer, x = model[0], torch.randn(20, 128)
    torch.testing.assert_close(layer.linear(x), x @ layer.dequantized_weight().t(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not onednn_supported(torch.float32, "cpu"), reason="no oneDNN")
def test_dense_layers_keep_one_weight_copy(tmp_path):
    model, spec = _model("none")
    assert model[0].weight is not None and model[0].packed_weight is not None
    linear_choice.choose_linear_kernels(model, spec, KernelSet(), log=lambda _m: None,
                                        cache=tmp_path / "c.json")
    for layer in model:
        assert (layer.weight is None) != (layer.packed_weight is None)
        assert len(layer.route_names) == 1
