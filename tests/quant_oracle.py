"""Reference models for the correctness oracle: transformers with the same quantization.

`load_reference_model(model_dir, method)` returns a transformers causal LM whose linear layers
hold the same quantized weights that loraplex's `--quantize method` backend builds from the
same checkpoint (see tests/unit/test_quant_backends.py, which proves it layer by layer). Wrap
it with PEFT (`PeftModel.from_pretrained(..., adapter_name=...)`) for mixed-batch oracles.

How each method is made (all on CPU with `device="cpu"`):
- `none`: plain `from_pretrained(dtype=compute_dtype)`.
- `bnb-nf4`, `bnb-fp4`, `bnb-int8`: transformers' own `BitsAndBytesConfig` loading with
  `device_map`. On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit` in eval mode repacks its
  weight and computes in bfloat16 whatever the compute dtype; the oracle switches that off
  (`cpu_bf16_kernel=False`) so a float32 compute dtype really computes in float32, as loraplex
  does. The quantized data is the same either way.
- `hqq-*`: transformers 5.x accepts `HqqConfig` but cannot load with it (`HqqHfQuantizer` has
  no `get_quantize_ops`: "QuantizationMethod.HQQ is not available yet"). The oracle therefore
  does what transformers 4.x did: load float weights, then swap every decoder `nn.Linear` for
  `hqq.core.quantize.HQQLinear(linear, HqqConfig(nbits, group_size).quant_config, ...)`
  (lm_head skipped, as `HqqConfig.skip_modules`). PEFT's LoRA supports HQQLinear bases.
- `eetq`: no transformers integration runs without the CUDA-only eetq wheel; each decoder
  `nn.Linear` keeps its module but gets loraplex's int8-per-channel dequantized weight, which
  is exactly the weight the torch path multiplies by (up to the order of rounding).
"""

from __future__ import annotations

from pathlib import Path

import torch

HQQ_SKIP_MODULES = ("lm_head",)


def load_reference_model(model_dir: Path | str, method: str, *,
                         compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
                         hqq_group_size: int = 64, bnb_double_quant: bool = False,
                         bnb_int8_threshold: float = 6.0, cpu_bf16_kernel: bool = False):
    """A transformers model for `method` (any of QUANTIZE_CHOICES), in eval mode."""
    from transformers import AutoModelForCausalLM

    from loraplex.server.layers.base import QuantSpec

    spec = QuantSpec(method=method, compute_dtype=compute_dtype, device=device,
                     hqq_group_size=hqq_group_size, bnb_double_quant=bnb_double_quant,
                     bnb_int8_threshold=bnb_int8_threshold)
    kwargs = {"dtype": compute_dtype, "device_map": device}
    if method.startswith("bnb-"):
        kwargs["quantization_config"] = _bnb_config(spec)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    if method in ("bnb-nf4", "bnb-fp4") and not cpu_bf16_kernel:
        _disable_bnb_cpu_bf16_kernel(model)
    if method.startswith("hqq-"):
        _swap_in_hqq(model, spec)
    if method == "eetq":
        _load_eetq_weights(model, spec)
    return model


def _bnb_config(spec):
    from transformers import BitsAndBytesConfig

    if spec.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.bnb_int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec.method.removeprefix("bnb-"),
        bnb_4bit_compute_dtype=spec.compute_dtype,
        bnb_4bit_use_double_quant=spec.bnb_double_quant,
        bnb_4bit_quant_storage=torch.uint8)


def _disable_bnb_cpu_bf16_kernel(model) -> None:
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _decoder_linears(model, skip: tuple[str, ...] = HQQ_SKIP_MODULES):
    """(parent, attribute name, module) for every nn.Linear outside `skip`."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is torch.nn.Linear and not any(s in full_name for s in skip):
                found.append((parent, child_name, child))
    return found


def _swap_in_hqq(model, spec) -> None:
    from hqq.core.quantize import HQQLinear
    from transformers import HqqConfig

    from loraplex.server.layers.hqq import hqq_nbits

    config = HqqConfig(nbits=hqq_nbits(spec.method), group_size=spec.hqq_group_size)
    for parent, name, linear in _decoder_linears(model):
        setattr(parent, name, HQQLinear(linear, config.quant_config,
                                        compute_dtype=spec.compute_dtype, device=spec.device))


def _load_eetq_weights(model, spec) -> None:
    from loraplex.server.layers.eetq import EetqLinear

    for _parent, _name, linear in _decoder_linears(model):
        weight = EetqLinear(linear.weight.data, None, spec).dequantized_weight()
        linear.weight.data = weight.to(linear.weight.dtype)
