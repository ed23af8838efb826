"""Every fused CPU kernel (kernels/csrc via kernels/native.py) against its pure-torch twin."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from error_bounds import (assert_within, assert_within_bound, attention_bound, exact_rms_norm, rms_norm_bound,
                          silu_mul_bound)
from loraplex.server.engine.sampling import argmax_rows_ref
from loraplex.server.kernels import native
from loraplex.server.model.attention import decode_attention_ref
from loraplex.server.kernels.registry import KernelSet
from loraplex.server.model.fused_ops import TORCH_OPS, layer_ops



def paged_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, gen):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


# (9, 3, 64) and (4, 4, 128): compile-time head size and group; (32, 2, 64): group 16, runtime;
# (6, 2, 48): all runtime; (16, 1, 256): group * head_dim past the on-stack buffers (heap path).
@pytest.mark.parametrize("heads,kv_heads,head_dim",
                         [(9, 3, 64), (4, 4, 128), (32, 2, 64), (6, 2, 48), (16, 1, 256)])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_matches_twin(native_kernels, heads, kv_heads, head_dim, window):
    gen = torch.Generator().manual_seed(heads * head_dim + window)
    block_size, seqs, max_blocks = 4, 6, 7
    k_cache, v_cache = paged_cache(60, block_size, kv_heads, head_dim, gen)
    tables = torch.randperm(60, generator=gen)[: seqs * max_blocks].view(seqs, max_blocks)
    lens = torch.tensor([1, 3, 4, 9, 17, 28])                       # 28 = every block in use
    # q as a strided view, like the q columns of the fused qkv output
    qkv = torch.randn(seqs, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q = qkv[:, : heads * head_dim].view(seqs, heads, head_dim)
    ours = native_kernels.decode_attention(q, k_cache, v_cache, tables, lens, 0.3, window)
    twin = decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.3, window)
    assert ours.shape == (seqs, heads, head_dim) and ours.is_contiguous()
    wide = (q.double(), k_cache.double())
    exact = decode_attention_ref(*wide, v_cache.double(), tables, lens, 0.3, window)
    values = decode_attention_ref(*wide, v_cache.double().abs(), tables, lens, 0.3, window)
    bound = attention_bound(q, k_cache, 0.3, int(lens.max()), values)
    assert_within(ours, exact, bound, "native decode_attention")
    assert_within(twin, exact, bound, "twin decode_attention_ref")


def test_decode_attention_refuses_bad_tables(native_kernels):
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = paged_cache(4, 4, 1, 64, gen)
    q = torch.randn(1, 2, 64)
    with pytest.raises(RuntimeError, match="block id 9 outside"):
        native_kernels.decode_attention(q, k_cache, v_cache, torch.tensor([[0, 9]]), torch.tensor([6]), 1.0, 0)
    with pytest.raises(RuntimeError, match="has 9 keys"):
        native_kernels.decode_attention(q, k_cache, v_cache, torch.tensor([[0, 1]]), torch.tensor([9]), 1.0, 0)
    with pytest.raises(RuntimeError, match="float32 only"):
        native_kernels.decode_attention(q.double(), k_cache, v_cache, torch.tensor([[0]]), torch.tensor([1]), 1.0, 0)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_add_rms_norm_matches_twin(native_kernels, with_residual, rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen) * 3
    weight = torch.randn(576, generator=gen)
    residual = torch.randn(rows, 576, generator=gen) if with_residual else None
    twin_residual = residual.clone() if with_residual else None
    exact = exact_rms_norm(x.double() if residual is None else x.double() + residual.double(), weight, 1e-5)
    ours = layer_ops(KernelSet(native=native_kernels)).add_rms_norm(x, residual, weight, 1e-5)
    twin = TORCH_OPS.add_rms_norm(x, twin_residual, weight, 1e-5)
    for got, what in ((ours, "native add_rms_norm"), (twin, "twin add_rms_norm")):
        assert_within(got, exact, rms_norm_bound(exact, x.shape[1]), what=what)
    if with_residual:
        torch.testing.assert_close(residual, twin_residual, atol=0, rtol=0)   # the same adds


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_rope_write_kv_matches_twin(native_kernels, tokens):
    gen = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width + 8, generator=gen)[:, :width]     # strided rows, like a slice
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    caches = [torch.zeros(8, block_size, kv_heads, head_dim) for _ in range(4)]
    slots = torch.randperm(8 * block_size, generator=gen)[:tokens]
    twin_qkv = qkv.clone()
    exact = qkv.double()                                                 # rotated in place below
    TORCH_OPS.rope_write_kv(exact, cos.double(), sin.double(), caches[0].double(), caches[1].double(), slots,
                            heads, kv_heads)
    magnitude = _rope_magnitude(qkv, cos, sin, heads + kv_heads, head_dim)
    layer_ops(KernelSet(native=native_kernels)).rope_write_kv(qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    TORCH_OPS.rope_write_kv(twin_qkv, cos, sin, caches[2], caches[3], slots, heads, kv_heads)
    for got, what in ((qkv, "native rope_write_kv"), (twin_qkv, "twin rope_write_kv")):
        # two products and one sum per element (an FMA or not): no reduction order to assume
        assert_within_bound(got, exact, magnitude, terms=3, what=what)
    k_start = heads * head_dim
    for got, cache in ((qkv, caches[0]), (twin_qkv, caches[2])):        # each writes its own rotated k
        rotated_k = got[:, k_start:k_start + kv_heads * head_dim].reshape(tokens, kv_heads, head_dim)
        assert torch.equal(cache.view(-1, kv_heads, head_dim)[slots], rotated_k)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)       # v is copied as is
    assert caches[0].view(-1, kv_heads, head_dim)[slots].abs().sum() > 0


def _rope_magnitude(qkv, cos, sin, num_rotated: int, head_dim: int) -> torch.Tensor:
    """|x| |cos| + |rotate_half(x)| |sin| for the rotated q and k heads, |x| for v (float64)."""
    magnitude = qkv.double().abs().clone()
    rotated = magnitude[:, : num_rotated * head_dim].view(qkv.shape[0], num_rotated, head_dim)
    half = head_dim // 2
    swapped = torch.cat([rotated[..., half:], rotated[..., :half]], -1)
    rotated.copy_(rotated * cos.double().abs().unsqueeze(1) + swapped * sin.double().abs().unsqueeze(1))
    return magnitude


def test_rope_write_kv_refuses_bad_slots(native_kernels):
    qkv = torch.zeros(2, 3 * 64)
    cache = torch.zeros(2, 4, 1, 64)
    with pytest.raises(RuntimeError, match="slot 8 outside"):
        native_kernels.rope_write_kv(qkv, torch.ones(2, 64), torch.zeros(2, 64), cache, cache.clone(),
                                     torch.tensor([0, 8]), 1, 1)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_silu_mul_matches_twin(native_kernels, scale):
    gen = torch.Generator().manual_seed(int(scale))
    gate_up = torch.randn(17, 2 * 1536, generator=gen) * scale
    ours = native_kernels.silu_mul(gate_up)
    twin = TORCH_OPS.silu_mul(gate_up.clone())
    # elementwise, no reduction; exp may be a vectorized approximation (see silu_mul_bound)
    gate, up = gate_up.double().chunk(2, dim=1)
    exact = torch.nn.functional.silu(gate) * up
    bound = silu_mul_bound(gate_up)
    for got, what in ((ours, "native silu_mul"), (twin, "twin silu_mul")):
        assert_within(got, exact, bound, what=what)


@pytest.mark.parametrize("width", [1, 7, 16, 17, 49152, 49155])
def test_argmax_rows_matches_twin(native_kernels, width):
    gen = torch.Generator().manual_seed(width)
    logits = torch.randn(12, width, generator=gen)
    ties = torch.randint(0, 4, (12, width), generator=gen).float()   # many equal maxima
    logits[6:] = ties[6:]
    logits[3] = float("-inf")                                        # all -inf: index 0
    logits[4, width // 2] = float("nan")                             # NaN counts as largest
    logits[4, width - 1] = float("nan")
    logits[5] = float("-inf")
    logits[5, width - 1] = 1e30                                      # max in the last element
    ours = native_kernels.argmax_rows(logits)
    assert ours.dtype == torch.int64 and ours.shape == (12,)
    assert ours.tolist() == argmax_rows_ref(logits).tolist()


def test_argmax_rows_refuses_bad_input(native_kernels):
    with pytest.raises(RuntimeError, match="contiguous float32"):
        native_kernels.argmax_rows(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        native_kernels.argmax_rows(torch.zeros(8, 2).t())
    assert native_kernels.argmax_rows(torch.zeros(0, 8)).shape == (0,)


def test_resolve_choices(native_kernels):
    assert native.resolve("torch", torch.float32, "cpu") is None
    assert native.resolve("auto", torch.bfloat16, "cpu") is None          # float32 only
    assert native.resolve("auto", torch.float32, "cpu") is native_kernels
    with pytest.raises(ValueError, match="needs a CPU device and dtype float32"):
        native.resolve("native", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="choose one of auto, native, torch"):
        native.resolve("fast", torch.float32, "cpu")


def test_auto_falls_back_when_the_build_fails(monkeypatch):
    """A machine without a working compiler still serves, on the torch path, and says so."""
    def broken_build(*_args, **_kwargs):
        raise RuntimeError("Error building extension 'loraplex_cpu_kernels'\nc++: not found")

    monkeypatch.setattr(native, "load", broken_build)
    lines: list[str] = []
    assert native.resolve("auto", torch.float32, "cpu", log=lines.append) is None
    assert "unavailable (Error building extension" in lines[0] and "pure-torch path" in lines[0]
    with pytest.raises(RuntimeError, match="--cpu-kernels native: building kernels/csrc failed"):
        native.resolve("native", torch.float32, "cpu", log=lines.append)


def test_build_dir_is_keyed_by_the_sources(tmp_path, monkeypatch):
    """A changed kernel source builds into a new directory, never over a loaded copy."""
    import shutil

    sources = tmp_path / "csrc"
    shutil.copytree(native.SOURCE_DIR, sources)
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    before = native.build_dir(tmp_path)
    assert before == native.build_dir(tmp_path) and before.parent == tmp_path / "cpu-kernels"
    (sources / "lora.cpp").write_text((sources / "lora.cpp").read_text() + "\n// changed\n")
    assert native.build_dir(tmp_path) != before


def test_build_dir_is_keyed_by_the_torch_install(tmp_path, monkeypatch):
    """Two virtual environments (their build files name their own torch include paths) never
    share a build directory, where each would rebuild over the other's build."""
    here = native.build_dir(tmp_path)
    monkeypatch.setattr(native.torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert native.build_dir(tmp_path) != here and native.build_dir(tmp_path).parent == here.parent


def test_kernels_release_the_gil_while_they_run(native_kernels):
    """Another Python thread runs during a long native call: a served decode step (one native
    call) must not stop the server's event loop, adapter loaders or mask thread. A thread that
    holds the GIL in native code lets no Python run, so no tick can fall inside the call."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (8192, 4096), generator=gen, dtype=torch.int8)
    scales, x = torch.rand(8192, 1, generator=gen), torch.randn(64, 4096, generator=gen)
    ticks: list[float] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        inside = 0
        for _attempt in range(5):                   # a busy machine may not schedule the ticker at once
            start = time.perf_counter()
            native_kernels.quant_linear_8bit(x, codes, scales, None, 4096, None, False)
            end = time.perf_counter()
            margin = (end - start) / 4              # the middle half of the call only
            inside = sum(start + margin < tick < end - margin for tick in ticks)
            if inside:
                break
    finally:
        stop.set()
        thread.join(10)
    assert inside > 0, f"no Python ran during a {1e3 * (end - start):.0f} ms native call: the kernel holds the GIL"


def test_every_install_of_the_same_source_builds_from_the_same_paths(tmp_path, monkeypatch):
    """Two installs (worktrees, venvs) share one build: ninja's build file must name the same
    source paths for both, or each rebuilds whenever the other built last."""
    import os
    import shutil

    from loraplex.server.kernels import native

    directory = tmp_path / "cache" / "build"
    staged_by_install = []
    for install in ("a", "b"):
        csrc = tmp_path / install / "csrc"
        shutil.copytree(native.SOURCE_DIR, csrc)
        monkeypatch.setattr(native, "SOURCE_DIR", csrc)
        monkeypatch.setattr(native, "SOURCES", tuple(sorted(csrc.glob("*.cpp"))))
        staged_by_install.append(native._staged_sources(directory))
        if install == "a":
            first_mtimes = {p: os.stat(p).st_mtime_ns for p in (directory / "src").iterdir()}
    first, second = staged_by_install
    assert first == second and all(p.parent == directory / "src" for p in first)
    assert {p.name for p in first} == {p.name for p in native.SOURCES}
    assert (directory / "src" / "common.h").read_bytes() == (native.SOURCE_DIR / "common.h").read_bytes()
    # a staged file is never rewritten (a newer mtime would make ninja rebuild)
    assert {p: os.stat(p).st_mtime_ns for p in (directory / "src").iterdir()} == first_mtimes
