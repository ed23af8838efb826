// lora_bgmv: one projection's LoRA delta for a decode batch (one adapter per token), shrink
// and expand fused (twin: lora/ops/reference.py lora_bgmv_ref).
#include "common.h"
#include "kernels.h"

namespace loraplex {

namespace {

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
void lora_bgmv(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
               const std::vector<at::Tensor>& bts, const std::vector<int64_t>& col_starts,
               const at::Tensor& token_slots, const at::Tensor& scales) {
  check_float_rows(x, "lora_bgmv x");
  check_float_rows(y, "lora_bgmv y");
  const int64_t tokens = x.size(0), in = x.size(1), subs = static_cast<int64_t>(bts.size());
  TORCH_CHECK(subs > 0 && static_cast<int64_t>(col_starts.size()) == subs,
              "lora_bgmv: one column start per B stack");
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && a.scalar_type() == at::kFloat && a.size(2) == in &&
              a.size(1) % subs == 0, "lora_bgmv: a must be contiguous float32 [S, subs * R, in]");
  const int64_t slots = a.size(0), rank = a.size(1) / subs;
  TORCH_CHECK(y.size(0) == tokens && token_slots.numel() == tokens && token_slots.is_contiguous() &&
              token_slots.scalar_type() == at::kLong, "lora_bgmv: y rows and int64 token_slots [T]");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat && scales.numel() == slots,
              "lora_bgmv: scales must be float32 [S]");
  std::vector<const float*> bt_ptrs;
  std::vector<int64_t> outs;
  for (int64_t m = 0; m < subs; ++m) {
    const at::Tensor& bt = bts[m];
    TORCH_CHECK(bt.dim() == 3 && bt.is_contiguous() && bt.scalar_type() == at::kFloat &&
                bt.size(0) == slots && bt.size(1) == rank, "lora_bgmv: B stack ", m,
                " must be contiguous float32 [S, R, out_m]");
    TORCH_CHECK(col_starts[m] >= 0 && col_starts[m] + bt.size(2) <= y.size(1),
                "lora_bgmv: sub-module ", m, " columns fall outside y");
    bt_ptrs.push_back(bt.data_ptr<float>());
    outs.push_back(bt.size(2));
  }
  const int64_t* slot_ptr = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot_ptr[t] >= -1 && slot_ptr[t] < slots, "lora_bgmv: token ", t, " has slot ",
                slot_ptr[t], " (pool holds ", slots, ")");
  }
  const float* x_ptr = x.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  const float* a_ptr = a.data_ptr<float>();
  const float* scale_ptr = scales.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0), ranks = subs * rank;
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(static_cast<size_t>(ranks));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_ptr[t];
      if (slot < 0) continue;
      lora_shrink_row(a_ptr + slot * ranks * in, x_ptr + t * x_stride, h.data(), ranks, in,
                      scale_ptr[slot]);
      for (int64_t m = 0; m < subs; ++m) {
        lora_expand_row(h.data() + m * rank, bt_ptrs[m] + slot * rank * outs[m],
                        y_ptr + t * y_stride + col_starts[m], rank, outs[m]);
      }
    }
  });
}

}  // namespace loraplex
