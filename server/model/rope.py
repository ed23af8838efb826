"""Rotary position embedding with a precomputed cos/sin cache (HF `rotate_half` layout)."""

from __future__ import annotations

import math

import torch

from .rope_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, with llama3 / linear / yarn scaling when configured."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    elif rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "yarn":
        inv_freq = _yarn_scale(rope, head_dim)
    elif rope.rope_type == "longrope":
        if len(rope.short_factor) != head_dim // 2:
            raise ValueError(f"longrope short_factor has {len(rope.short_factor)} entries; head_dim "
                             f"{head_dim} needs {head_dim // 2}")
        inv_freq = inv_freq / torch.tensor(rope.short_factor, dtype=torch.float32)
    return inv_freq


def position_limit(rope: RopeConfig) -> int | None:
    """The most positions this rotary serves exactly, None for no limit: LongRoPE switches every
    position to its long factors past the original length, which cached keys cannot follow."""
    return rope.original_max_position_embeddings if rope.rope_type == "longrope" else None


def check_position_limit(rope: RopeConfig, max_model_len: int) -> None:
    """ValueError when requests of max_model_len tokens would pass the rotary's position limit."""
    limit = position_limit(rope)
    if limit is not None and max_model_len > limit:
        raise ValueError(f"rope type 'longrope' is served up to original_max_position_embeddings={limit} tokens "
                         f"(past it transformers re-rotates every cached key with the long factors); "
                         f"max_model_len is {max_model_len}: set --max-total-tokens to at most {limit}")


def trained_length_note(max_positions: int, max_model_len: int) -> str | None:
    """A startup warning when requests may run past the positions the model was trained on
    (config.json's max_position_embeddings): served, but quality past that length is the
    model's own risk; None when max_model_len fits."""
    if max_model_len <= max_positions:
        return None
    return (f"max_model_len={max_model_len} is longer than the model's max_position_embeddings="
            f"{max_positions}: requests past {max_positions} tokens are served but the model was not "
            f"trained on such positions (set --max-total-tokens to at most {max_positions} to refuse them)")


def attention_scaling(rope: RopeConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's attention temperature, LongRoPE's
    sqrt(1 + ln(factor) / ln(original length)); 1 otherwise)."""
    if rope.rope_type == "longrope":
        if rope.attention_factor is not None:
            return rope.attention_factor
        if rope.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_scale(rope: RopeConfig, dim: int) -> torch.Tensor:
    """YaRN (transformers' _compute_yarn_parameters): interpolate the low frequencies by `factor`,
    keep the high ones, ramp linearly between the beta_fast and beta_slow rotation counts."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp                                          # 1: keep the frequency
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by `factor`, keep high ones, blend in between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Holds cos/sin for positions [0, max_positions); grows on demand (`ensure_length`)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.inv_freq = inverse_frequencies(rope, head_dim).to(device)   # [head_dim // 2] float32
        self.scaling = attention_scaling(rope)
        self.limit = position_limit(rope)
        self.dtype = dtype
        self.cos = self.sin = torch.empty(0)
        self._build(max_positions if self.limit is None else min(max_positions, self.limit))

    def _build(self, max_positions: int) -> None:
        positions = torch.arange(max_positions, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(positions, self.inv_freq)                   # [P, head_dim // 2]
        emb = torch.cat([freqs, freqs], dim=-1)                          # [P, head_dim]
        self.cos = (emb.cos() * self.scaling).to(self.dtype)
        self.sin = (emb.sin() * self.scaling).to(self.dtype)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def ensure_length(self, num_positions: int) -> None:
        """Make positions up to num_positions - 1 available (doubling, so rarely rebuilt)."""
        if num_positions > self.max_positions:
            if self.limit is not None and num_positions > self.limit:
                raise ValueError(f"longrope rotary serves {self.limit} positions (original_max_position_embeddings); "
                                 f"{num_positions} asked: set --max-total-tokens to at most {self.limit}")
            grown = max(num_positions, 2 * self.max_positions)
            self._build(grown if self.limit is None else min(grown, self.limit))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin each [T, head_dim] (contiguous)."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, head_dim] -> rotated [T, H, head_dim] (new tensor): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, rotated, sin)
