"""No host sync inside a layer on the CUDA path: the functions a CUDA forward runs per layer
never read a tensor back to the host (.item(), .tolist(), .cpu(), .numpy(), synchronize)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from loraplex.server.layers import proj
from loraplex.server.lora import delta
from loraplex.server.lora.ops import triton_ops
from loraplex.server.model import attention, fused_ops, llama, triton_attention

SYNCING_CALLS = {"item", "tolist", "cpu", "numpy", "synchronize"}
PER_LAYER = [
    llama.DecoderLayer.forward, llama.CausalLM.forward, proj.ProjLinear.forward,
    delta.ProjLoraHook.add_delta, attention.paged_attention, attention._decode_attention,
    triton_attention.decode_attention, triton_attention.varlen_attention,
    triton_ops.TritonOps.prepare, triton_ops.TritonOps.add_delta, triton_ops._shrink,
    triton_ops._expand, triton_ops._launch, triton_ops._per_token,
    fused_ops.add_rms_norm_ref, fused_ops.rope_write_kv_ref, fused_ops.silu_mul_ref,
]


def _syncing_calls(fn) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return [node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in SYNCING_CALLS]


@pytest.mark.parametrize("fn", PER_LAYER, ids=lambda f: f.__qualname__)
def test_no_host_sync_on_the_cuda_layer_path(fn):
    assert _syncing_calls(fn) == []


def test_the_check_sees_a_sync():
    assert _syncing_calls(attention.varlen_attention_ref) == ["tolist", "tolist"]  # the host twin
