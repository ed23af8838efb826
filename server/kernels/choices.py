"""The --cpu-kernels choices (torch-free, so flags are checked before torch loads)."""

CPU_KERNEL_CHOICES = ("auto", "native", "torch")      # fused CPU kernels (native.py)
