"""Pure-decode steps: every decoder layer in one native call.

A decode step's non-GEMM work is small (a 576-wide norm costs microseconds), so at small
batches the step's time besides the GEMMs is mostly the interpreter: ~20 Python-level calls a
layer (the projection chain, the layer ops, views). `DecodeStack` hands the whole layer loop
to the C++ kernel `decode_stack` (kernels/csrc/decode_stack.cpp), which calls the same kernels
in the same order as DecoderLayer, so its results are bit-equal to the layer-by-layer path.

It applies when the step is decode-only, the layer ops are the native ones, every projection's
GEMM(s) are ones the kernel runs (float32 F.linear or oneDNN prepacked, or the fused 4-bit /
8-bit dequantize-GEMM; a ConcatLinear's parts each) and every LoRA delta of the step (if any)
takes the fused lora_bgmv kernel, which the stack then calls after each GEMM as the
projection's hook would; on a step with rows on DoRA adapters it then scales those rows by
their slot's DoRA factors (dora_scale_rows, as the hook's apply_dora does). Anything else
(prefill chunks, the libraries' own quantized paths, LoRA deltas on a torch route, the
reference attention) takes the layer-by-layer path. The GEMM choice per projection comes from
each layer's kernel routes (layers/linear_choice.py) for the step's row count; build the stack
after the routes are set.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels.quant import QuantPack, quant_linear_4bit_ref, quant_linear_8bit_ref
from ..layers.base import QuantizedLinear
from ..layers.concat import ConcatLinear
from ..layers.cpu_gemm import packed_linear
from ..layers.dense import DenseLinear
from ..lora.delta import LoraStep
from ..lora.dora import dora_scale_rows_ref
from ..lora.ops.reference import lora_bgmv_ref
from .attention import AttentionPlan, decode_attention_ref, paged_attention
from .context import ForwardContext
from .fused_ops import add_rms_norm_ref, rope_write_kv_ref, silu_mul_ref

# Kinds of a projection part, with the tensors each takes:
#   GEMM_ATEN    F.linear on the plain weight          [weight, bias]
#   GEMM_ONEDNN  oneDNN prepacked weight               [packed weight, bias]
#   GEMM_QUANT4  fused 4-bit dequantize-GEMM           [codes, lut, scales, zeros, bias]
#   GEMM_QUANT8  fused 8-bit dequantize-GEMM           [codes, scales, zeros, bias]
GEMM_ATEN, GEMM_ONEDNN, GEMM_QUANT4, GEMM_QUANT8 = 0, 1, 2, 3

StackKernel = Callable[..., torch.Tensor]        # decode_stack_ref's signature
Part = tuple[list[torch.Tensor | None], int, int]                 # (tensors, kind, group)
# per projection, per part: tensors, kinds, groups (the kernel's gemm_* arguments)
GemmSpec = tuple[list[list[list[torch.Tensor | None]]], list[list[int]], list[list[int]]]


def part_linear(tensors: Sequence[torch.Tensor | None], kind: int, group: int,
                quant4: Callable = quant_linear_4bit_ref,
                quant8: Callable = quant_linear_8bit_ref) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [T, in] -> [T, out_part] for one part (see GEMM_*); quant4 / quant8: the fused
    quantized GEMMs to call (the pure-torch twins by default, the native ones in benches)."""
    if kind == GEMM_ATEN:
        return lambda x: F.linear(x, tensors[0], tensors[1])
    if kind == GEMM_ONEDNN:
        return lambda x: packed_linear(x, tensors[0], tensors[1])
    if kind == GEMM_QUANT4:
        return lambda x: quant4(x, *tensors[:4], group, tensors[4], False)
    return lambda x: quant8(x, *tensors[:3], group, tensors[3], False)


def decode_stack_ref(hidden: torch.Tensor, norms: Sequence[torch.Tensor],
                     gemm_tensors: Sequence[Sequence[Sequence[torch.Tensor | None]]],
                     gemm_kinds: Sequence[Sequence[int]], gemm_groups: Sequence[Sequence[int]], cos: torch.Tensor,
                     sin: torch.Tensor, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                     slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, window: int, eps: float, num_heads: int, num_kv_heads: int,
                     lora_a: Sequence[torch.Tensor | None] = (),
                     lora_bts: Sequence[Sequence[torch.Tensor]] = (),
                     lora_col_starts: Sequence[Sequence[int]] = (),
                     token_slots: torch.Tensor | None = None,
                     lora_scales: torch.Tensor | None = None,
                     dora_scales: Sequence[torch.Tensor | None] = (),
                     dora_biases: Sequence[torch.Tensor | None] = (),
                     dora_rows: torch.Tensor | None = None,
                     dora_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch twin of the native decode_stack, same signature.

    hidden [D, hidden] embeddings (one row per sequence); norms: per layer the input and
    post-attention norm weights, then the final norm (2 L + 1); gemm_tensors/kinds/groups: per
    projection (qkv, o, gate_up, down of each layer: 4 L) per part its tensors (see GEMM_*),
    kind and quantization group, the parts' outputs concatenated; cos, sin [D, hd]; per-layer
    caches [blocks, block_size, KV, hd]; slots [D]; block_tables [D, max_blocks]; seq_lens [D].
    LoRA (empty lists for none): per projection lora_bgmv's a (or None), bts and col_starts, and
    the step's token_slots [D] and per-slot scales; each GEMM is then followed by lora_bgmv.
    DoRA (empty lists for none): per projection the per-slot factors [S, out] (or None) and base
    bias [out] (or None), the step's DoRA rows [Dd] and their slots [Dd]; a projection with
    factors then scales those rows (dora_scale_rows) after its delta.
    Writes this step's K/V; returns the final-normed hidden [D, hidden].
    """
    def gemm(x: torch.Tensor, index: int) -> torch.Tensor:
        parts = [part_linear(t, kind, group)(x) for t, kind, group
                 in zip(gemm_tensors[index], gemm_kinds[index], gemm_groups[index])]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if lora_a and lora_a[index] is not None:
            lora_bgmv_ref(x, y, lora_a[index], list(lora_bts[index]), list(lora_col_starts[index]),
                          token_slots, lora_scales)
        if dora_scales and dora_scales[index] is not None:
            dora_scale_rows_ref(y, dora_rows, dora_slots, dora_scales[index], dora_biases[index])
        return y

    rows, head_dim = hidden.shape[0], k_caches[0].shape[3] if k_caches else 0
    q_size = num_heads * head_dim
    x, residual = hidden, None
    for layer, (k_cache, v_cache) in enumerate(zip(k_caches, v_caches)):
        if residual is None:
            normed, residual = add_rms_norm_ref(x, None, norms[0], eps), x
        else:
            normed = add_rms_norm_ref(x, residual, norms[2 * layer], eps)
        qkv = gemm(normed, 4 * layer)                                              # [D, q + 2 kv]
        rope_write_kv_ref(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
        q = qkv[:, :q_size].view(rows, num_heads, head_dim)
        attn = decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, window)
        attn_out = gemm(attn.reshape(rows, q_size), 4 * layer + 1)
        normed = add_rms_norm_ref(attn_out, residual, norms[2 * layer + 1], eps)
        x = gemm(silu_mul_ref(gemm(normed, 4 * layer + 2)), 4 * layer + 3)
    return add_rms_norm_ref(x, residual, norms[-1], eps)


def stack_parts(layer: QuantizedLinear, rows: int) -> list[Part] | None:
    """The parts the kernel runs for this layer at `rows` rows, or None when one of its GEMMs
    is not float32 dense (F.linear / oneDNN) or the fused quantized kernel (then the step
    stays on the layer path)."""
    if isinstance(layer, ConcatLinear):
        joined = layer.joined_native(rows)
        if joined is not None:
            return [_quant_part(*joined)]
        parts = [stack_parts(part, rows) for part in layer.parts]
        return None if any(p is None for p in parts) else [q for p in parts for q in p]
    if layer.compute_dtype != torch.float32:
        return None
    route = layer.served_route(rows)
    if isinstance(layer, DenseLinear):
        if route == "library":
            route = "aten" if layer.weight is not None else "onednn"
        if route == "onednn" and layer.packed_weight is not None:
            return [([layer.packed_weight, layer.bias], GEMM_ONEDNN, 0)]
        if route == "aten" and layer.weight is not None and layer.weight.device.type == "cpu":
            return [([layer.weight, layer.bias], GEMM_ATEN, 0)]
        return None
    if route == "native" and layer.native_kernel is not None:
        return [_quant_part(*layer.native_kernel[1:])]
    return None


def _quant_part(pack: QuantPack, bias: torch.Tensor | None) -> Part:
    if pack.bits == 4:
        return ([pack.codes, pack.lut, pack.scales, pack.zeros, bias], GEMM_QUANT4, pack.group)
    return ([pack.codes, pack.scales, pack.zeros, bias], GEMM_QUANT8, pack.group)


def build_decode_stack(model, kernels) -> "DecodeStack | None":
    """The model's DecodeStack when the native kernels are built and serve its layer ops, else
    None. Call after the linear kernel routes are chosen (layers/linear_choice.py)."""
    from ..kernels.registry import implementation

    kernel = implementation("decode_stack", "native", kernels.native)
    if kernel is None or model.ops.name != "native" or model.dtype != torch.float32:
        return None
    if not stack_supports(model.config):
        return None
    return DecodeStack(model, kernel)


def stack_supports(config) -> bool:
    """Whether the native kernel runs this architecture's layer (the Llama layer exactly: no
    per-head q/k norm, no routed experts, no Gemma layer; Phi-3's is one); other families take the
    layer-by-layer path."""
    return not config.qk_norm and getattr(config, "moe", None) is None and getattr(config, "gemma", None) is None


class DecodeStack:
    """Runs a pure-decode step's decoder layers through one `decode_stack` kernel call."""

    def __init__(self, model, kernel: StackKernel):
        self.model = model
        self.kernel = kernel
        self.config = model.config
        self.norms = [w for layer in model.layers for w in (layer.input_norm, layer.post_attention_norm)]
        self.norms.append(model.final_norm)
        self.targets = model.lora_targets()                # ProjLinear, in the kernel's order
        self._gemms: dict[int, GemmSpec | None] = {}      # per row count; routes fixed at build
        self._caches: tuple = (None, [], [])               # (kv_caches, K list, V list)
        self._fused_attention = all(layer.attention is paged_attention for layer in model.layers)

    def gemms(self, rows: int) -> GemmSpec | None:
        """The kernel's gemm_* arguments for `rows` rows, or None when a projection's GEMM is
        one the kernel does not run."""
        if rows not in self._gemms:
            projections = [stack_parts(proj.base, rows) for proj in self.targets]
            if any(parts is None for parts in projections):
                self._gemms[rows] = None
            else:
                self._gemms[rows] = ([[t for t, _, _ in parts] for parts in projections],
                                     [[kind for _, kind, _ in parts] for parts in projections],
                                     [[group for _, _, group in parts] for parts in projections])
        return self._gemms[rows]

    def applies(self, ctx: ForwardContext, plan: AttentionPlan) -> bool:
        """True for a decode-only step whose attention runs the fused kernel."""
        return (plan.decode_kernel is not None and plan.varlen_kernel is None
                and plan.has_decodes and plan.decode_rows is None and not plan.prefills
                and self._fused_attention)

    def lora_args(self, step: LoraStep | None) -> tuple | None:
        """The kernel's nine LoRA and DoRA arguments for this step (empty lists when no token has
        a delta or no row is on a DoRA adapter), or None when some projection's delta does not
        take the fused kernel."""
        none = ([], [], [], None, None, [], [], None, None)
        if step is None:
            return none
        a, bts, col_starts = [], [], []
        for target in self.targets:
            args = None if target.lora is None else target.lora.native_args(step)
            if args is None and target.lora is not None:
                return None
            a_i, bts_i, col_starts_i = args or (None, [], [])   # no hook, or () = nothing to add
            a.append(a_i)
            bts.append(bts_i)
            col_starts.append(col_starts_i)
        if all(t is None for t in a):
            return none
        return (a, bts, col_starts, step.info.token_slots, step.scales) + self._dora_args(step)

    def _dora_args(self, step: LoraStep) -> tuple:
        """The kernel's four DoRA arguments: per projection (factors [S, out], bias [out] or
        None), the DoRA rows and their slots; empty lists and None when the step has none."""
        if step.dora is None:
            return [], [], None, None
        pairs = [target.lora.native_dora() if target.lora is not None else (None, None) for target in self.targets]
        return [s for s, _ in pairs], [b for _, b in pairs], step.dora.rows, step.dora.slots

    def __call__(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext,
                 plan: AttentionPlan, kv_caches, gemms: GemmSpec, lora: tuple) -> torch.Tensor:
        """hidden [D, hidden] embeddings -> final-normed hidden [D, hidden]; writes K/V.
        gemms from `gemms(rows)`, lora from `lora_args(ctx.lora)`."""
        config = self.config
        if self._caches[0] is not kv_caches:
            self._caches = (kv_caches, [k for k, _ in kv_caches], [v for _, v in kv_caches])
        _, k_caches, v_caches = self._caches
        return self.kernel(hidden, self.norms, *gemms, rope[0], rope[1],
                           k_caches, v_caches, ctx.attn.slot_mapping,
                           plan.decode_block_tables, plan.decode_lens, plan.scale,
                           plan.sliding_window or 0, config.rms_norm_eps, config.num_heads,
                           config.num_kv_heads, *lora)
