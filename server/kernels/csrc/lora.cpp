// lora_bgmv: one projection's LoRA delta for a decode batch (one adapter per token), shrink
// and expand fused (twin: lora/ops/reference.py lora_bgmv_ref). Adapter weights are float32,
// bfloat16 or float16 (--adapter-dtype); half-precision rows are widened to float32 into a
// thread-local buffer as they are read, and every sum runs in float32.
#include "common.h"
#include "kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace loraplex {

namespace {

// dst[0 .. n) = float(src[0 .. n)); bfloat16 is the high half of a float32 (exact, vectorizes).
inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void widen(const c10::BFloat16* src, float* __restrict dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}
inline void widen(const c10::Half* src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);     // exact
}

// The n weights at src as float32: src itself, or widened into buf.
template <typename W>
inline const float* as_float(const W* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<W, float>) {
    return src;
  } else {
    buf.resize(static_cast<size_t>(n));
    widen(src, buf.data(), n);
    return buf.data();
  }
}

// h[r] = scale * dot(a_rows[r], x) for r < ranks; a_rows [ranks, in] row-major.
void lora_shrink_row(const float* __restrict a_rows, const float* __restrict x, float* __restrict h,
                     int64_t ranks, int64_t in, float scale) {
  for (int64_t r = 0; r < ranks; ++r) h[r] = dot(a_rows + r * in, x, in) * scale;
}

// y[j] += sum_r h[r] * bt[r, j] for j < out; bt [rank, out] row-major. Four ranks per pass
// over y, so y is loaded and stored rank / 4 times instead of rank times.
void lora_expand_row(const float* __restrict h, const float* __restrict bt, float* __restrict y,
                     int64_t rank, int64_t out) {
  int64_t r = 0;
  for (; r + 4 <= rank; r += 4) {
    const float h0 = h[r], h1 = h[r + 1], h2 = h[r + 2], h3 = h[r + 3];
    const float *b0 = bt + r * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;
#pragma omp simd
    for (int64_t j = 0; j < out; ++j) y[j] += h0 * b0[j] + h1 * b1[j] + h2 * b2[j] + h3 * b3[j];
  }
  for (; r < rank; ++r) {
    const float hr = h[r];
    const float* b = bt + r * out;
#pragma omp simd
    for (int64_t j = 0; j < out; ++j) y[j] += hr * b[j];
  }
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
    std::vector<float> h(static_cast<size_t>(ranks)), a_buf, b_buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_ptr[t];
      if (slot < 0) continue;
      lora_shrink_row(as_float(a_ptr + slot * ranks * in, ranks * in, a_buf), x_ptr + t * x_stride,
                      h.data(), ranks, in, scale_ptr[slot]);
      for (int64_t m = 0; m < subs; ++m) {
        const float* bt = as_float(bt_ptrs[m] + slot * rank * outs[m], rank * outs[m], b_buf);
        lora_expand_row(h.data() + m * rank, bt, y_ptr + t * y_stride + col_starts[m], rank, outs[m]);
      }
    }
  });
}

}  // namespace

}  // namespace loraplex
