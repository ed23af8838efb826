// Shared helpers of the fused CPU kernels (see kernels.h for the list of kernels).
//
// Numerics: float32 throughout; sums run in a different order than torch (differences ~1e-7
// relative). exp is a degree-6 polynomial on [-ln2/2, ln2/2] after range reduction (relative
// error ~2e-7, about 2 ulp), written so the compiler vectorizes it; it takes arguments <= 0.
// Dot products keep 16 lane-wise partial sums and add them as a tree (dot()): a plain
// `omp simd` reduction ends in a serial 16-add chain, which dominated short dots.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace loraplex {

// exp(x) for x <= 0; returns 0 below about -87 (float underflow), like std::exp.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;                                     // (std::max blocks vectorizing)
  const float n = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));   // round(x / ln 2)
  const float r = std::fma(n, -0.693145751953125f, x);             // x - n * ln2 (hi part)
  const float s = std::fma(n, -1.428606765330187e-06f, r);         // ... (lo part)
  float p = 1.9875691500e-4f;
  p = std::fma(p, s, 1.3981999507e-3f);
  p = std::fma(p, s, 8.3334519073e-3f);
  p = std::fma(p, s, 4.1665795894e-2f);
  p = std::fma(p, s, 1.6666665459e-1f);
  p = std::fma(p, s, 5.0000001201e-1f);
  p = std::fma(p * s, s, s) + 1.0f;                                  // 1 + s + s^2 p(s)
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;        // 2^n, n in [-126, 0]
  return p * std::bit_cast<float>(bits);
}

// Sum of 16 lanes as a balanced tree (a serial sum is a 16-add dependency chain).
inline float sum_lanes(const float* __restrict v) {
  float a[8], b[4];
#pragma omp simd
  for (int j = 0; j < 8; ++j) a[j] = v[j] + v[j + 8];
#pragma omp simd
  for (int j = 0; j < 4; ++j) b[j] = a[j] + a[j + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// One stored weight as float32: float32 itself, or bfloat16 bits (the high half of a float32;
// exact, and a shift the compiler vectorizes).
inline float to_float(float w) { return w; }
inline float to_float(uint16_t bf16_bits) { return std::bit_cast<float>(static_cast<uint32_t>(bf16_bits) << 16); }

// a . b over n elements (a float32 or bfloat16 bits, b float32): 16 lane-wise partial sums
// (one vector register), then a tree.
template <typename E>
inline float dot(const E* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) lanes[j] += to_float(a[i + j]) * b[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) lanes[j] += to_float(a[i]) * b[i];
  return sum_lanes(lanes);
}

inline int64_t rows_per_task(int64_t row_width) {                    // ~16k floats per task
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_width));
}

inline void check_float_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1,
              name, ": a float32 [rows, width] tensor with unit column stride");
}

}  // namespace loraplex
