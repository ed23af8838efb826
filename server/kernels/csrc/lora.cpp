// lora_bgmv: one projection's LoRA delta for a decode batch (one adapter per token), shrink
// and expand fused (twin: lora/ops/reference.py lora_bgmv_ref). Adapter weights are float32,
// bfloat16 or float16 (--adapter-dtype); every sum runs in float32.
//
// Decode reads each token's adapter rows once, so the kernel should run at streaming speed;
// the arithmetic must stay cheaper than the bytes and overlap with them. Shrink computes four
// rank rows at a time (x loaded once for four rows, eight independent accumulators instead of
// one dependency chain). bfloat16 rows are read in place: a bfloat16 is the high half of a
// float32, so widening is an unpack against zero (x86: one shuffle per 4-8 values; the shrink
// permutes x once per token to match the in-lane order of the 256-bit unpack, and the expand
// stays at 128 bits, where the unpack keeps order without lane-crossing permutes, which are
// slow on some AVX2 cores). Elsewhere the loops widen with a shift (common.h to_float) and let
// the compiler vectorize. float16 rows are widened into a thread-local buffer (F16C where
// present) and take the float32 loops.
#include "common.h"
#include "kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <type_traits>

namespace loraplex {

namespace {

inline void widen(const c10::Half* src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);     // exact
}

inline float sum8(const float* v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

// h[r] = scale * dot(a_rows[r], x) for r < ranks; a_rows [ranks, in] row-major. Portable.
template <typename E>
void shrink_portable(const E* __restrict a_rows, const float* __restrict x, float* __restrict h,
                     int64_t ranks, int64_t in, float scale) {
  int64_t r = 0;
  for (; r + 4 <= ranks; r += 4) {
    const E *a0 = a_rows + r * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
    float l0[8] = {}, l1[8] = {}, l2[8] = {}, l3[8] = {};
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
#pragma omp simd
      for (int j = 0; j < 8; ++j) {
        const float xv = x[i + j];
        l0[j] += to_float(a0[i + j]) * xv;
        l1[j] += to_float(a1[i + j]) * xv;
        l2[j] += to_float(a2[i + j]) * xv;
        l3[j] += to_float(a3[i + j]) * xv;
      }
    }
    for (int j = 0; i < in; ++i, ++j) {
      const float xv = x[i];
      l0[j] += to_float(a0[i]) * xv;
      l1[j] += to_float(a1[i]) * xv;
      l2[j] += to_float(a2[i]) * xv;
      l3[j] += to_float(a3[i]) * xv;
    }
    h[r] = sum8(l0) * scale;
    h[r + 1] = sum8(l1) * scale;
    h[r + 2] = sum8(l2) * scale;
    h[r + 3] = sum8(l3) * scale;
  }
  for (; r < ranks; ++r) h[r] = dot(a_rows + r * in, x, in) * scale;
}

// y[j] += sum_r h[r] * bt[r, j] for j < out; bt [rank, out] row-major. Four ranks per pass
// over y, so y is loaded and stored rank / 4 times instead of rank times. Portable.
template <typename E>
void expand_portable(const float* __restrict h, const E* __restrict bt, float* __restrict y,
                     int64_t rank, int64_t out) {
  int64_t r = 0;
  for (; r + 4 <= rank; r += 4) {
    const float h0 = h[r], h1 = h[r + 1], h2 = h[r + 2], h3 = h[r + 3];
    const E *b0 = bt + r * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;
#pragma omp simd
    for (int64_t j = 0; j < out; ++j) {
      y[j] += h0 * to_float(b0[j]) + h1 * to_float(b1[j]) + h2 * to_float(b2[j]) + h3 * to_float(b3[j]);
    }
  }
  for (; r < rank; ++r) {
    const float hr = h[r];
    const E* b = bt + r * out;
#pragma omp simd
    for (int64_t j = 0; j < out; ++j) y[j] += hr * to_float(b[j]);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Ask for the cache line holding p: the bfloat16 loops fetch the next four rows while these
// compute (measured on an AVX2 EPYC, 16 distinct adapters at batch 16: 12.6 -> 10.9 ms per
// step; the float32 loops gain nothing from it, the hardware prefetchers keep them streaming).
inline void prefetch_line(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// 16 bfloat16 at p -> lo = float(p[0..3, 8..11]), hi = float(p[4..7, 12..15]) (in-lane unpack).
inline void widen16(const uint16_t* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}

// shrink_portable for bfloat16 rows; xp: scratch of in floats for x in widen16's order.
void shrink_bf16(const uint16_t* __restrict a_rows, const float* __restrict x, float* __restrict h,
                 int64_t ranks, int64_t in, float scale, float* __restrict xp) {
  const int64_t n16 = in / 16 * 16;
  for (int64_t i = 0; i < n16; i += 16) {                  // [x0-3, x8-11, x4-7, x12-15]
    for (int k = 0; k < 4; ++k) {
      xp[i + k] = x[i + k];
      xp[i + 4 + k] = x[i + 8 + k];
      xp[i + 8 + k] = x[i + 4 + k];
      xp[i + 12 + k] = x[i + 12 + k];
    }
  }
  int64_t r = 0;
  for (; r + 4 <= ranks; r += 4) {
    const uint16_t* rows[4] = {a_rows + r * in, a_rows + (r + 1) * in, a_rows + (r + 2) * in, a_rows + (r + 3) * in};
    __m256 lo_acc[4], hi_acc[4];
    for (int k = 0; k < 4; ++k) lo_acc[k] = hi_acc[k] = _mm256_setzero_ps();
    const bool ahead = r + 8 <= ranks;
    for (int64_t i = 0; i < n16; i += 16) {
      if (ahead && (i & 31) == 0) {                       // a line per row: the next four rows
        for (int k = 0; k < 4; ++k) prefetch_line(rows[k] + 4 * in + i);
      }
      const __m256 x_lo = _mm256_loadu_ps(xp + i), x_hi = _mm256_loadu_ps(xp + i + 8);
      for (int k = 0; k < 4; ++k) {
        __m256 lo, hi;
        widen16(rows[k] + i, lo, hi);
        lo_acc[k] = _mm256_fmadd_ps(lo, x_lo, lo_acc[k]);
        hi_acc[k] = _mm256_fmadd_ps(hi, x_hi, hi_acc[k]);
      }
    }
    for (int k = 0; k < 4; ++k) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_add_ps(lo_acc[k], hi_acc[k]));
      float acc = sum8(lanes);
      for (int64_t i = n16; i < in; ++i) acc += to_float(rows[k][i]) * x[i];
      h[r + k] = acc * scale;
    }
  }
  for (; r < ranks; ++r) h[r] = dot(a_rows + r * in, x, in) * scale;
}

// expand_portable for bfloat16 rows: 128-bit unpacks keep the order of y.
void expand_bf16(const float* __restrict h, const uint16_t* __restrict bt, float* __restrict y,
                 int64_t rank, int64_t out) {
  const __m128i zero = _mm_setzero_si128();
  const auto lo = [&](__m128i v) { return _mm_castsi128_ps(_mm_unpacklo_epi16(zero, v)); };
  const auto hi = [&](__m128i v) { return _mm_castsi128_ps(_mm_unpackhi_epi16(zero, v)); };
  const int64_t rank4 = rank / 4 * 4, out8 = out / 8 * 8;
  for (int64_t r = 0; r < rank4; r += 4) {
    const __m128 h0 = _mm_set1_ps(h[r]), h1 = _mm_set1_ps(h[r + 1]), h2 = _mm_set1_ps(h[r + 2]),
                 h3 = _mm_set1_ps(h[r + 3]);
    const uint16_t *b0 = bt + r * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;
    const bool ahead = r + 8 <= rank4;
    for (int64_t j = 0; j < out8; j += 8) {
      if (ahead && (j & 31) == 0) {                       // a line per row: the next four rows
        prefetch_line(b0 + 4 * out + j);
        prefetch_line(b1 + 4 * out + j);
        prefetch_line(b2 + 4 * out + j);
        prefetch_line(b3 + 4 * out + j);
      }
      const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + j));
      const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + j));
      const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b2 + j));
      const __m128i v3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b3 + j));
      __m128 s_lo = _mm_mul_ps(h0, lo(v0)), s_hi = _mm_mul_ps(h0, hi(v0));
      s_lo = _mm_fmadd_ps(h1, lo(v1), s_lo);
      s_hi = _mm_fmadd_ps(h1, hi(v1), s_hi);
      s_lo = _mm_fmadd_ps(h2, lo(v2), s_lo);
      s_hi = _mm_fmadd_ps(h2, hi(v2), s_hi);
      s_lo = _mm_fmadd_ps(h3, lo(v3), s_lo);
      s_hi = _mm_fmadd_ps(h3, hi(v3), s_hi);
      _mm_storeu_ps(y + j, _mm_add_ps(_mm_loadu_ps(y + j), s_lo));
      _mm_storeu_ps(y + j + 4, _mm_add_ps(_mm_loadu_ps(y + j + 4), s_hi));
    }
    for (int64_t j = out8; j < out; ++j) {
      y[j] += h[r] * to_float(b0[j]) + h[r + 1] * to_float(b1[j]) + h[r + 2] * to_float(b2[j]) +
              h[r + 3] * to_float(b3[j]);
    }
  }
  if (rank4 < rank) expand_portable(h + rank4, bt + rank4 * out, y, rank - rank4, out);
}
#endif

// The first 64-byte boundary at or after p (p points into a buffer with 16 floats to spare).
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

// One token's shrink and expand, by element type (float32 or bfloat16 bits).
inline void shrink(const float* a, const float* x, float* h, int64_t ranks, int64_t in, float scale, float*) {
  shrink_portable(a, x, h, ranks, in, scale);
}
inline void shrink(const uint16_t* a, const float* x, float* h, int64_t ranks, int64_t in, float scale,
                   float* xp) {
#if defined(__AVX2__) && defined(__FMA__)
  shrink_bf16(a, x, h, ranks, in, scale, xp);
#else
  (void)xp;
  shrink_portable(a, x, h, ranks, in, scale);
#endif
}
inline void expand(const float* h, const float* bt, float* y, int64_t rank, int64_t out) {
  expand_portable(h, bt, y, rank, out);
}
inline void expand(const float* h, const uint16_t* bt, float* y, int64_t rank, int64_t out) {
#if defined(__AVX2__) && defined(__FMA__)
  expand_bf16(h, bt, y, rank, out);
#else
  expand_portable(h, bt, y, rank, out);
#endif
}

// A token's adapter rows as the element type the loops read: float32 and bfloat16 bits in
// place, float16 widened into buf.
inline const float* rows(const float* src, int64_t, std::vector<float>&) { return src; }
inline const uint16_t* rows(const c10::BFloat16* src, int64_t, std::vector<float>&) {
  return reinterpret_cast<const uint16_t*>(src);
}
inline const float* rows(const c10::Half* src, int64_t n, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(n));
  widen(src, buf.data(), n);
  return buf.data();
}

}  // namespace

// The LoRA delta of one projection, one adapter per token (BGMV), shrink and expand fused:
// for each token t with slot s = token_slots[t] >= 0 and each sub-module m,
//   y[t, col_starts[m] : + out_m] += scales[s] * (a[s, m*R:(m+1)*R] @ x[t]) @ bts[m][s].
// x [T, in] and y [T, out] may have strided rows; a [S, subs * R, in]; bts[m] [S, R, out_m].
// Tokens are split across threads; each token reads its adapter's rows once, so a batch of
// distinct adapters streams each adapter once (decode). Prefill-sized groups of one adapter
// belong to GEMMs instead (the torch routes); lora/ops/torch_ops.py picks.
namespace {

template <typename W>
void lora_bgmv_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                     const std::vector<at::Tensor>& bts, const std::vector<int64_t>& col_starts,
                     const at::Tensor& token_slots, const at::Tensor& scales);

}  // namespace

void lora_bgmv(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
               const std::vector<at::Tensor>& bts, const std::vector<int64_t>& col_starts,
               const at::Tensor& token_slots, const at::Tensor& scales) {
  switch (a.scalar_type()) {
    case at::kFloat: return lora_bgmv_typed<float>(x, y, a, bts, col_starts, token_slots, scales);
    case at::kBFloat16: return lora_bgmv_typed<c10::BFloat16>(x, y, a, bts, col_starts, token_slots, scales);
    case at::kHalf: return lora_bgmv_typed<c10::Half>(x, y, a, bts, col_starts, token_slots, scales);
    default: TORCH_CHECK(false, "lora_bgmv: adapter weights must be float32, bfloat16 or float16");
  }
}

namespace {

template <typename W>
void lora_bgmv_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                     const std::vector<at::Tensor>& bts, const std::vector<int64_t>& col_starts,
                     const at::Tensor& token_slots, const at::Tensor& scales) {
  const auto wtype = a.scalar_type();
  check_float_rows(x, "lora_bgmv x");
  check_float_rows(y, "lora_bgmv y");
  const int64_t tokens = x.size(0), in = x.size(1), subs = static_cast<int64_t>(bts.size());
  TORCH_CHECK(subs > 0 && static_cast<int64_t>(col_starts.size()) == subs,
              "lora_bgmv: one column start per B stack");
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && a.size(2) == in &&
              a.size(1) % subs == 0, "lora_bgmv: a must be contiguous [S, subs * R, in]");
  const int64_t slots = a.size(0), rank = a.size(1) / subs;
  TORCH_CHECK(y.size(0) == tokens && token_slots.numel() == tokens && token_slots.is_contiguous() &&
              token_slots.scalar_type() == at::kLong, "lora_bgmv: y rows and int64 token_slots [T]");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat && scales.numel() == slots,
              "lora_bgmv: scales must be float32 [S]");
  std::vector<const W*> bt_ptrs;
  std::vector<int64_t> outs;
  for (int64_t m = 0; m < subs; ++m) {
    const at::Tensor& bt = bts[m];
    TORCH_CHECK(bt.dim() == 3 && bt.is_contiguous() && bt.scalar_type() == wtype &&
                bt.size(0) == slots && bt.size(1) == rank, "lora_bgmv: B stack ", m,
                " must be contiguous [S, R, out_m] in a's dtype");
    TORCH_CHECK(col_starts[m] >= 0 && col_starts[m] + bt.size(2) <= y.size(1),
                "lora_bgmv: sub-module ", m, " columns fall outside y");
    bt_ptrs.push_back(reinterpret_cast<const W*>(bt.data_ptr()));
    outs.push_back(bt.size(2));
  }
  const int64_t* slot_ptr = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot_ptr[t] >= -1 && slot_ptr[t] < slots, "lora_bgmv: token ", t, " has slot ",
                slot_ptr[t], " (pool holds ", slots, ")");
  }
  const float* x_ptr = x.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  const W* a_ptr = reinterpret_cast<const W*>(a.data_ptr());
  const float* scale_ptr = scales.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0), ranks = subs * rank;
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    // xp: x in the bfloat16 shrink's order (only that path reads it), 64-byte aligned so its
    // 256-bit loads never split cache lines.
    std::vector<float> h(static_cast<size_t>(ranks)), a_buf, b_buf;
    std::vector<float> xp_buf(std::is_same_v<W, c10::BFloat16> ? static_cast<size_t>(in + 16) : 0);
    float* xp = xp_buf.empty() ? nullptr : align64(xp_buf.data());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_ptr[t];
      if (slot < 0) continue;
      shrink(rows(a_ptr + slot * ranks * in, ranks * in, a_buf), x_ptr + t * x_stride, h.data(), ranks,
             in, scale_ptr[slot], xp);
      for (int64_t m = 0; m < subs; ++m) {
        const auto* bt = rows(bt_ptrs[m] + slot * rank * outs[m], rank * outs[m], b_buf);
        expand(h.data() + m * rank, bt, y_ptr + t * y_stride + col_starts[m], rank, outs[m]);
      }
    }
  });
}

}  // namespace

}  // namespace loraplex
