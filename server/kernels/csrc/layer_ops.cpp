// Per-layer ops of the decoder (twins: model/fused_ops.py *_ref):
// add_rms_norm: residual += x (optional), then RMSNorm of the residual (HF order of operations).
// rope_write_kv: rotary embedding of q and k in place in the fused qkv output, then the new
// k and v rows into their KV-cache slots.
// silu_mul: silu(gate) * up from the fused gate_up output.
#include "common.h"
#include "kernels.h"

namespace loraplex {

// x [T, H]; residual [T, H] or None; weight [H]. With a residual: residual += x in place and
// the result normalizes residual; without: normalizes x. Returns [T, H] (new tensor).
at::Tensor add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                        const at::Tensor& weight, double eps) {
  check_float_rows(x, "add_rms_norm x");
  const int64_t rows = x.size(0), width = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == width && weight.scalar_type() == at::kFloat,
              "add_rms_norm: weight must be float32 [", width, "]");
  if (residual.has_value()) {
    check_float_rows(*residual, "add_rms_norm residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "add_rms_norm: residual and x shapes differ");
  }
  at::Tensor out = at::empty({rows, width}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  float* r_ptr = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const float* w = weight.data_ptr<float>();
  float* o_ptr = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0), r_stride = residual.has_value() ? residual->stride(0) : 0;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x_ptr + i * x_stride;
      if (r_ptr != nullptr) {
        float* r = r_ptr + i * r_stride;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) r[j] += src[j];
        src = r;
      }
      const float sum = dot(src, src, width);                          // 16 partial sums
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + feps);
      float* o = o_ptr + i * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) o[j] = w[j] * (src[j] * inv);
    }
  });
  return out;
}

// qkv [T, (H + 2 KV) * hd] (rows may be strided); cos, sin [T, hd]; caches [blocks,
// block_size, KV, hd]; slots [T] int64. Rotates the q and k heads of qkv in place
// (x * cos + rotate_half(x) * sin) and stores k and v at their slots.
void rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                   int64_t num_heads, int64_t num_kv_heads) {
  check_float_rows(qkv, "rope_write_kv qkv");
  const int64_t tokens = qkv.size(0), hd = k_cache.size(3), half = hd / 2;
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd && k_cache.size(2) == num_kv_heads,
              "rope_write_kv: qkv width or cache heads do not match the head counts");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat && cos.numel() == tokens * hd && sin.numel() == tokens * hd,
              "rope_write_kv: cos and sin must be contiguous float32 [T, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "rope_write_kv: caches must be contiguous float32 of one shape");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens,
              "rope_write_kv: slots must be int64 [T]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), row = num_kv_heads * hd;
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < num_slots, "rope_write_kv: slot ", slot_ptr[t],
                " outside the cache's ", num_slots, " slots");
  }
  float* qkv_ptr = qkv.data_ptr<float>();
  const float* cos_ptr = cos.data_ptr<float>();
  const float* sin_ptr = sin.data_ptr<float>();
  float* k_ptr = k_cache.data_ptr<float>();
  float* v_ptr = v_cache.data_ptr<float>();
  const int64_t stride = qkv.stride(0), rotated_heads = num_heads + num_kv_heads;
  at::parallel_for(0, tokens, rows_per_task(qkv.size(1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {                          // the cache rows are cold:
      for (int64_t i = 0; i < row; i += 16) {                        // start their loads first
        __builtin_prefetch(k_ptr + slot_ptr[t] * row + i, 1);
        __builtin_prefetch(v_ptr + slot_ptr[t] * row + i, 1);
      }
    }
    for (int64_t t = begin; t < end; ++t) {
      float* x_row = qkv_ptr + t * stride;
      const float* c = cos_ptr + t * hd;
      const float* s = sin_ptr + t * hd;
      for (int64_t h = 0; h < rotated_heads; ++h) {
        float* x = x_row + h * hd;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float lo = x[i], hi = x[i + half];
          x[i] = lo * c[i] + (-hi) * s[i];
          x[i + half] = hi * c[i + half] + lo * s[i + half];
        }
      }
      const int64_t slot = slot_ptr[t];
      std::memcpy(k_ptr + slot * row, x_row + num_heads * hd, sizeof(float) * row);
      std::memcpy(v_ptr + slot * row, x_row + rotated_heads * hd, sizeof(float) * row);
    }
  });
}

namespace {

// o[j] = silu(g[j]) * u[j]; silu(g) = g / (1 + exp(-g)), with exp's argument kept <= 0.
inline float silu_mul_one(float g, float u) {
  const float e = exp_nonpositive(-std::fabs(g));                       // exp(-|g|)
  const float numerator = g >= 0.0f ? g : g * e;                        // one division, no branch
  return numerator / (1.0f + e) * u;
}

// o = silu(g) * u over n floats, 16 at a time: the vectors of one block are independent, so
// their long exp-and-divide chains overlap (one vector per iteration waited on its own chain).
void silu_mul_row(const float* __restrict g, const float* __restrict u, float* __restrict o, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
#pragma omp simd
    for (int64_t k = j; k < j + 16; ++k) o[k] = silu_mul_one(g[k], u[k]);
  }
  for (; j < n; ++j) o[j] = silu_mul_one(g[j], u[j]);
}

}  // namespace

// gate_up [T, 2 I] (gate columns first) -> silu(gate) * up [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float_rows(gate_up, "silu_mul gate_up");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up width must be even");
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o_ptr = out.data_ptr<float>();
  const int64_t stride = gate_up.stride(0);
  at::parallel_for(0, rows, rows_per_task(inter), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      silu_mul_row(in + i * stride, in + i * stride + inter, o_ptr + i * inter, inter);
    }
  });
  return out;
}

}  // namespace loraplex
