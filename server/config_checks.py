"""Start-time checks of a ServerConfig: one line per problem, naming the flag to fix."""

from __future__ import annotations

import math
from pathlib import Path

from .config import MiB, ServerConfig


def validate(config: ServerConfig):
    """Yield one line per problem, naming the flag to fix."""
    from .engine.config import ADAPTER_DTYPE_CHOICES, DTYPE_CHOICES
    from .layers.base import QUANTIZE_CHOICES
    from .layers.cpu_gemm import LINEAR_KERNEL_CHOICES
    from .kernels.native import CPU_KERNEL_CHOICES

    if config.quantize not in QUANTIZE_CHOICES:
        yield f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)} (got {config.quantize!r})"
    if config.dtype not in DTYPE_CHOICES:
        yield f"--dtype must be one of {', '.join(DTYPE_CHOICES)} (got {config.dtype!r})"
    if config.linear_kernel not in LINEAR_KERNEL_CHOICES:
        yield f"--linear-kernel must be one of {', '.join(LINEAR_KERNEL_CHOICES)} (got {config.linear_kernel!r})"
    if config.cpu_kernels not in CPU_KERNEL_CHOICES:
        yield f"--cpu-kernels must be one of {', '.join(CPU_KERNEL_CHOICES)} (got {config.cpu_kernels!r})"
    if config.adapter_dtype not in ADAPTER_DTYPE_CHOICES:
        yield f"--adapter-dtype must be one of {', '.join(ADAPTER_DTYPE_CHOICES)}"
    if config.model != "default" and not (Path(config.model).expanduser() / "config.json").is_file():
        yield f"--model {config.model!r}: not a Hugging Face directory with config.json (or use 'default')"
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(config, name) <= 65535:
            yield f"--{name.replace('_', '-')} must be in [0, 65535]"
    if config.port and config.port == config.metrics_port:
        yield "--port and --metrics-port must differ"
    yield from _validate_limits(config)
    if config.max_batch_tokens < config.max_num_seqs:
        yield (f"--max-batch-tokens ({config.max_batch_tokens}) must be >= --max-num-seqs "
               f"({config.max_num_seqs}) so every running request can decode each step")
    yield from _validate_security(config)
    for root in config.allowed_register_roots:
        if not Path(root).expanduser().is_dir():
            yield f"--allowed-register-root {root!r} is not an existing directory"
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        yield "--log-level must be debug, info, warning or error"


def _validate_limits(config: ServerConfig):
    positive = ("max_loras", "max_lora_rank", "max_input_tokens", "max_total_tokens", "max_new_tokens",
                "max_queued_requests", "max_num_seqs", "max_batch_tokens", "host_cache_bytes",
                "adapter_quota_bytes", "max_adapter_bytes")
    for name in positive:
        if getattr(config, name) < 1:
            yield f"--{name.replace('_', '-')} must be >= 1 (got {getattr(config, name)})"
    if config.max_stop_sequences < 0:
        yield "--max-stop-sequences must be >= 0"
    if config.metrics_adapter_labels < 0:
        yield "--metrics-adapter-labels must be >= 0"
    if config.max_input_tokens >= config.max_total_tokens:
        yield "--max-input-tokens must be smaller than --max-total-tokens"
    if config.max_message_bytes < 2 * MiB:
        yield "--max-message-bytes must be >= 2MiB (uploads send 1 MiB chunks)"
    if not (math.isfinite(config.grace_period_s) and config.grace_period_s >= 0):
        yield "--grace-period must be a number of seconds >= 0"


def _validate_security(config: ServerConfig):
    for flag, keys in (("--api-key", config.api_keys), ("--admin-key", config.admin_keys)):
        if any(len(key.secret) < 8 for key in keys):
            yield f"{flag}: keys must be at least 8 characters"
    overlap = {k.secret for k in config.api_keys} & {k.secret for k in config.admin_keys}
    if overlap:
        yield "the same key is configured as both --api-key and --admin-key"
    if bool(config.tls_cert) != bool(config.tls_key):
        yield "TLS needs both --tls-cert and --tls-key"
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        if path and not Path(path).expanduser().is_file():
            yield f"{flag} {path!r} is not a readable file"
