"""Fast kernels and their pure-torch twins: the registry (registry.py), the C++ CPU kernels
(csrc/, built by native.py), the quantized-GEMM weight packing (quant.py) and the measured
choice of linear kernels (linear_choice.py)."""
