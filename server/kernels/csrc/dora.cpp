// dora_scale_rows: DoRA's per-output scale on the rows of DoRA tokens, in place (twin:
// lora/dora.py dora_scale_rows_ref). After a projection's base output plus its LoRA delta,
// y = bias + W x + s B A x, a DoRA row becomes bias + f[slot] * (y - bias), with
// f = m / ||W + s B A|| per output column (lora/dora.py explains the factor).
//
// Numerics: each element is the same three correctly rounded float32 operations as the twin
// (subtract the bias, multiply, add it back; one multiply without a bias), in that order, so
// the result equals the twin's bit for bit on every CPU. The function is compiled without
// floating-point contraction: GCC would otherwise fuse the multiply and the add into one FMA
// (one rounding fewer), and the decode stack would no longer match the layer-by-layer path.
#include "common.h"
#include "kernels.h"

namespace loraplex {

namespace {

#if defined(__GNUC__) && !defined(__clang__)
#define LORAPLEX_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define LORAPLEX_NO_CONTRACT      // clang contracts only within one expression; the loop splits it
#endif

LORAPLEX_NO_CONTRACT void scale_row(float* __restrict y, const float* __restrict factor,
                                    const float* __restrict bias, int64_t width) {
  if (bias == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) y[c] = y[c] * factor[c];
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    const float centred = y[c] - bias[c];
    const float scaled = centred * factor[c];
    y[c] = scaled + bias[c];
  }
}

}  // namespace

// y [T, out] float32 (unit column stride), rows [Td] int64 (rows of y to scale, distinct),
// slots [Td] int64 (each row's adapter slot), scales [S, out] float32 contiguous, bias [out]
// float32 or None. Rows of y not listed are left untouched.
void dora_scale_rows(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& slots,
                     const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  check_float_rows(y, "dora_scale_rows y");
  const int64_t n = rows.numel(), width = y.size(1);
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.is_contiguous() &&
                  slots.is_contiguous() && slots.numel() == n,
              "dora_scale_rows: rows and slots must be contiguous int64 [Td] of one length");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kFloat &&
                  scales.size(1) == width,
              "dora_scale_rows: scales must be contiguous float32 [S, out] with y's width");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == at::kFloat &&
                                    bias->numel() == width),
              "dora_scale_rows: bias must be contiguous float32 [out] or None");
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(row_ptr[i] >= 0 && row_ptr[i] < y.size(0) && slot_ptr[i] >= 0 && slot_ptr[i] < scales.size(0),
                "dora_scale_rows: entry ", i, " has row ", row_ptr[i], " (y has ", y.size(0), ") and slot ",
                slot_ptr[i], " (scales hold ", scales.size(0), ")");
  }
  float* y_ptr = y.data_ptr<float>();
  const float* scale_ptr = scales.data_ptr<float>();
  const float* bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t stride = y.stride(0);
  at::parallel_for(0, n, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scale_row(y_ptr + row_ptr[i] * stride, scale_ptr + slot_ptr[i] * width, bias_ptr, width);
    }
  });
}

}  // namespace loraplex
