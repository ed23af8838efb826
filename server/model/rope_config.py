"""The rotary embedding's parameters, as config.json states them (read by config.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: `default`, Llama 3.1 `llama3`, `linear`, `yarn` or Phi-3 `longrope` scaling."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    attention_factor: float | None = None   # yarn: cos/sin scale (None: from factor, mscale)
    beta_fast: float = 32.0                 # yarn: ramp bounds, in rotations
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()    # longrope: per-frequency divisors up to the original length
