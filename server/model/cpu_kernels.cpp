// Fused CPU kernels for the decode layer (float32), built at first use by native.py.
//
// Each kernel replaces a run of small torch ops whose per-call overhead, not arithmetic,
// dominated a decode step; each has a pure-torch twin with the same signature (fused_ops.py,
// attention.py, lora/ops/reference.py), and tests/unit/test_native_kernels.py compares them.
//
// decode_attention: one query token per sequence attends to its keys in the paged KV cache,
// reading K/V rows where they lie (no gather, no transposes, no mask tensor). Work is split
// over (sequence, kv head) pairs with at::parallel_for; each pair handles its `group` query
// heads together so every K/V row is loaded once for all of them.
// add_rms_norm: residual += x (optional), then RMSNorm of the residual (HF order of operations).
// rope_write_kv: rotary embedding of q and k in place in the fused qkv output, then the new
// k and v rows into their KV-cache slots.
// silu_mul: silu(gate) * up from the fused gate_up output.
// lora_bgmv: one projection's LoRA delta for a decode batch (one adapter per token), shrink
// and expand fused (twin: lora/ops/reference.py bgmv_delta).
// argmax_rows: each logits row's first maximum for greedy sampling (twin:
// engine/sampling.py argmax_rows, i.e. torch.argmax, NaN counting as largest).
//
// Dot products keep 16 lane-wise partial sums and add them as a tree (dot()): a plain
// `omp simd` reduction ends in a serial 16-add chain, which dominated short dots.
//
// Numerics: float32 throughout; sums run in a different order than torch (differences ~1e-7
// relative). exp is a degree-6 polynomial on [-ln2/2, ln2/2] after range reduction (relative
// error ~2e-7, about 2 ulp), written so the compiler vectorizes it; it takes arguments <= 0.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

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

// a . b over n floats: 16 lane-wise partial sums (one vector register), then a tree.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) lanes[j] += a[i] * b[i];
  return sum_lanes(lanes);
}

struct DecodeShape {
  int64_t num_heads, num_kv_heads, head_dim, group, block_size, max_blocks;
};

// Calls fn(t, row) for the keys first_key .. first_key + num_keys - 1 of one sequence, t
// counting from 0, row pointing at that key's head_dim floats in the cache. Walks block by
// block: no integer division per key.
template <typename Fn>
inline void for_each_key(const float* cache, const int64_t* blocks, int64_t first_key, int64_t num_keys,
                         int64_t block_size, int64_t row_stride, Fn&& fn) {
  int64_t t = 0;
  int64_t offset = first_key % block_size;
  for (int64_t b = first_key / block_size; t < num_keys; ++b, offset = 0) {
    const float* block = cache + blocks[b] * block_size * row_stride;
    const int64_t stop = std::min(block_size, offset + num_keys - t);
    for (int64_t off = offset; off < stop; ++off, ++t) fn(t, block + off * row_stride);
  }
}

// Softmax in place over each of `group` rows of `num_keys` scores.
void softmax_rows(float* sc, int64_t group, int64_t num_keys) {
  for (int64_t g = 0; g < group; ++g) {
    float* row = sc + g * num_keys;
    float row_max = row[0];
    for (int64_t t = 1; t < num_keys; ++t) row_max = row[t] > row_max ? row[t] : row_max;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < num_keys; ++t) {
      row[t] = exp_nonpositive(row[t] - row_max);
      total += row[t];
    }
    const float inv = 1.0f / total;
#pragma omp simd
    for (int64_t t = 0; t < num_keys; ++t) row[t] *= inv;
  }
}

// Starts loading one sequence's K and V rows of kv head `kvh`, all of them in flight at once
// (decode_attention issues it as each task starts): after the GEMMs the rows come from DRAM,
// and fetching one row at a time leaves the memory system idle between misses.
void prefetch_rows(const float* k_cache, const float* v_cache, const int64_t* blocks, int64_t first_key,
                   int64_t num_keys, int64_t kvh, const DecodeShape& s) {
  const int64_t hd = s.head_dim, row_stride = s.num_kv_heads * hd;
  for (const float* cache : {k_cache, v_cache}) {
    for_each_key(cache + kvh * hd, blocks, first_key, num_keys, s.block_size, row_stride,
                 [&](int64_t, const float* row) {
      for (int64_t i = 0; i < hd; i += 16) __builtin_prefetch(row + i);
    });
  }
}

// Attention of one sequence's `group` query heads that share kv head `kvh`.
// q: [group, head_dim] rows, out: same; scores: scratch of group * num_keys floats.
// HD > 0 and G > 0 fix head_dim and group at compile time, so the query rows and the output
// accumulators live in registers; 0 reads them from `s`.
template <int64_t HD, int64_t G>
void attend_one(const float* q, float* out, const float* k_cache, const float* v_cache,
                const int64_t* blocks, int64_t first_key, int64_t num_keys, int64_t kvh,
                float scale, const DecodeShape& s, std::vector<float>& scores) {
  constexpr int64_t kMaxLocal = 2048;                                // floats of q / acc on stack
  const int64_t hd = HD > 0 ? HD : s.head_dim, group = G > 0 ? G : s.group;
  const int64_t row_stride = s.num_kv_heads * hd;
  const bool local = group * hd <= kMaxLocal;
  float q_local[kMaxLocal], acc_local[kMaxLocal];
  std::vector<float> heap;
  if (!local) heap.resize(static_cast<size_t>(2 * group * hd));
  float* __restrict qs = local ? q_local : heap.data();              // q * scale
  float* __restrict acc = local ? acc_local : heap.data() + group * hd;
  for (int64_t i = 0; i < group * hd; ++i) {
    qs[i] = q[i] * scale;
    acc[i] = 0.0f;
  }
  scores.resize(static_cast<size_t>(group * num_keys));
  float* sc = scores.data();
  for_each_key(k_cache + kvh * hd, blocks, first_key, num_keys, s.block_size, row_stride,
               [&](int64_t t, const float* __restrict k) {             // scores[g, t] = q_g . k_t
    for (int64_t g = 0; g < group; ++g) sc[g * num_keys + t] = dot(qs + g * hd, k, hd);
  });
  softmax_rows(sc, group, num_keys);
  for_each_key(v_cache + kvh * hd, blocks, first_key, num_keys, s.block_size, row_stride,
               [&](int64_t t, const float* __restrict v) {             // acc[g] += p[g, t] v_t
    for (int64_t g = 0; g < group; ++g) {
      const float p = sc[g * num_keys + t];
      float* a = acc + g * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) a[i] += p * v[i];
    }
  });
  std::copy(acc, acc + group * hd, out);
}

using AttendFn = void (*)(const float*, float*, const float*, const float*, const int64_t*, int64_t,
                          int64_t, int64_t, float, const DecodeShape&, std::vector<float>&);

template <int64_t HD>
AttendFn attend_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_one<HD, 1>;
    case 2: return attend_one<HD, 2>;
    case 3: return attend_one<HD, 3>;
    case 4: return attend_one<HD, 4>;
    case 5: return attend_one<HD, 5>;
    case 6: return attend_one<HD, 6>;
    case 7: return attend_one<HD, 7>;
    case 8: return attend_one<HD, 8>;
    default: return attend_one<HD, 0>;
  }
}

// Specialized for the common head sizes (64, 128) and groups (1..8); generic otherwise.
AttendFn attend_for(const DecodeShape& s) {
  if (s.head_dim == 64) return attend_for_group<64>(s.group);
  if (s.head_dim == 128) return attend_for_group<128>(s.group);
  return attend_one<0, 0>;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: q [D, H, hd], caches [blocks, block_size, kv_heads, hd]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "decode_attention: caches contiguous, q rows [H, hd] dense");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "decode_attention: block_tables and seq_lens are int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
              seq_lens.numel() == q.size(0), "decode_attention: one table row and length per query");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "decode_attention: head_dim mismatch or heads not a multiple of kv heads");
}

}  // namespace

// q [D, H, hd]; caches [num_blocks, block_size, kv_heads, hd]; block_tables [D, max_blocks];
// seq_lens [D] (keys per sequence, this step's included); window 0 = none, else the last
// `window` keys only. Returns [D, H, hd].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables_in, const at::Tensor& seq_lens_in,
                            double scale, int64_t window) {
  check_inputs(q, k_cache, v_cache, block_tables_in, seq_lens_in);
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  const DecodeShape s{q.size(1), k_cache.size(2), q.size(2), q.size(1) / k_cache.size(2),
                      k_cache.size(1), block_tables.size(1)};
  const int64_t num_seqs = q.size(0);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* table_ptr = block_tables.data_ptr<int64_t>();
  for (int64_t d = 0; d < num_seqs; ++d) {                            // no read outside the cache
    TORCH_CHECK(lens[d] > 0 && lens[d] <= s.max_blocks * s.block_size,
                "decode_attention: sequence ", d, " has ", lens[d], " keys; its block table holds ",
                s.max_blocks * s.block_size);
    for (int64_t b = 0; b < (lens[d] + s.block_size - 1) / s.block_size; ++b) {
      const int64_t block = table_ptr[d * s.max_blocks + b];
      TORCH_CHECK(block >= 0 && block < k_cache.size(0), "decode_attention: block id ", block,
                  " outside the cache's ", k_cache.size(0), " blocks");
    }
  }
  at::Tensor out = at::empty(q.sizes(), q.options());               // contiguous [D, H, hd]
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k_cache.data_ptr<float>();
  const float* v_ptr = v_cache.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t seq_stride = s.num_heads * s.head_dim, group_stride = s.group * s.head_dim;
  const int64_t q_seq_stride = q.stride(0);
  const AttendFn attend = attend_for(s);
  at::parallel_for(0, num_seqs * s.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / s.num_kv_heads, kvh = task % s.num_kv_heads;
      const int64_t first = window > 0 ? std::max<int64_t>(0, lens[d] - window) : 0;
      const int64_t* blocks = table_ptr + d * s.max_blocks;
      const int64_t head_offset = kvh * group_stride;
      prefetch_rows(k_ptr, v_ptr, blocks, first, lens[d] - first, kvh, s);
      attend(q_ptr + d * q_seq_stride + head_offset, out_ptr + d * seq_stride + head_offset,
             k_ptr, v_ptr, blocks, first, lens[d] - first, kvh,
             static_cast<float>(scale), s, scores);
    }
  });
  return out;
}

namespace {

int64_t rows_per_task(int64_t row_width) {                           // ~16k floats per task
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_width));
}

void check_float_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1,
              name, ": a float32 [rows, width] tensor with unit column stride");
}

}  // namespace

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
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < width; ++j) sum += src[j] * src[j];
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

// o = silu(g) * u over n floats; silu(g) = g / (1 + exp(-g)), with exp's argument kept <= 0.
void silu_mul_row(const float* __restrict g, const float* __restrict u, float* __restrict o, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(-std::fabs(g[j]));                  // exp(-|g|)
    const float numerator = g[j] >= 0.0f ? g[j] : g[j] * e;            // one division, no branch
    const float silu = numerator / (1.0f + e);
    o[j] = silu * u[j];
  }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_rows", &argmax_rows, "argmax over the last dim of [rows, vocab], float32");
  m.def("decode_attention", &decode_attention, "paged decode attention, float32");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm, float32");
  m.def("rope_write_kv", &rope_write_kv, "rotary embedding in place + K/V cache write, float32");
  m.def("silu_mul", &silu_mul, "silu(gate) * up, float32");
  m.def("lora_bgmv", &lora_bgmv, "fused LoRA shrink + expand, one adapter per token, float32");
}
