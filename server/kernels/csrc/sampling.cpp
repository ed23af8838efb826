// argmax_rows: each logits row's first maximum for greedy sampling (twin:
// engine/sampling.py argmax_rows_ref, i.e. torch.argmax, NaN counting as largest).
#include "common.h"
#include "kernels.h"

namespace loraplex {

namespace {

// Index of the largest of x[0 .. n): the first one on ties, the first NaN if there is one
// (torch.argmax's rules). 16 lanes keep a running best value and its index, each lane taking
// only a strictly greater value, so every lane holds its first maximum.
int64_t argmax_row(const float* __restrict x, int64_t n) {
  int64_t i = 0, best_index = 0;
  float best = x[0];
  if (n >= 16) {
    float lane_best[16];
    int32_t lane_index[16], lane_nan[16];
    for (int j = 0; j < 16; ++j) {
      lane_best[j] = x[j];
      lane_index[j] = j;
      lane_nan[j] = x[j] != x[j];
    }
    for (i = 16; i + 16 <= n; i += 16) {
#pragma omp simd
      for (int j = 0; j < 16; ++j) {
        const float v = x[i + j];
        const bool greater = v > lane_best[j];
        lane_best[j] = greater ? v : lane_best[j];
        lane_index[j] = greater ? static_cast<int32_t>(i + j) : lane_index[j];
        lane_nan[j] |= v != v;
      }
    }
    int32_t any_nan = 0;
    for (int j = 0; j < 16; ++j) any_nan |= lane_nan[j];
    if (any_nan) {
      for (int64_t k = 0; k < n; ++k) if (x[k] != x[k]) return k;
    }
    best = lane_best[0];
    best_index = lane_index[0];
    for (int j = 1; j < 16; ++j) {
      if (lane_best[j] > best || (lane_best[j] == best && lane_index[j] < best_index)) {
        best = lane_best[j];
        best_index = lane_index[j];
      }
    }
  } else {
    if (best != best) return 0;
    i = 1;
  }
  for (; i < n; ++i) {                                               // the tail, in order
    if (x[i] != x[i]) return i;
    if (x[i] > best) {
      best = x[i];
      best_index = i;
    }
  }
  return best_index;
}

}  // namespace

// logits [n, vocab] float32 -> [n] int64: each row's argmax, as torch.argmax(dim=-1).
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
              logits.size(1) > 0 && logits.size(1) < (int64_t{1} << 31),
              "argmax_rows: logits must be contiguous float32 [rows, vocab] with 0 < vocab < 2^31");
  const int64_t rows = logits.size(0), width = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* in = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) o[r] = argmax_row(in + r * width, width);
  });
  return out;
}

}  // namespace loraplex
