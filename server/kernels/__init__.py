"""Fast kernels and their pure-torch twins: the registry (registry.py), the C++ CPU kernels
(csrc/, built by native.py) and the quantized-GEMM weight packing (quant.py). The ground
floor: nothing here imports layers/, model/ or lora/ (tests/unit/test_import_cycles.py); the
measured choice of linear kernels per layer lives with the layers (layers/linear_choice.py)."""
