// Fused dequantize + GEMM for the quantized bases (decode-sized row counts), float32.
//
// y [T, out] = x [T, in] @ W^T (+ bias), W read from its packed codes, group by group:
//   4-bit: codes [out, in / 2] uint8, element 2j in the HIGH nibble of byte j, 2j + 1 in the low
//          one (bitsandbytes' order, so bnb nf4/fp4 data is read where it lies);
//          w = (lut[q] - zero[g]) * scale[g]   (lut: nf4/fp4 code table, or 0..15 for HQQ)
//   8-bit: codes [out, in] int8 (bnb-int8, eetq) or uint8 (hqq-8bit);
//          w = (q - zero[g]) * scale[g]
// scales / zeros are float32 [out, in / group] (zeros optional = 0), one group never straddles
// a row. These are the libraries' own dequantization formulas in float32: the paths that
// dequantize (tiles, byte tables) multiply exactly the library's dequantized weights (for
// bnb-int8 the scale is absmax / 127 precomputed: one rounding apart), only the order of the
// sums differs; the folded path (below) applies scale and zero once per group, which differs
// by float rounding.
//
// Work: blocks of 4 output rows over at::parallel_for; each block's rows are dequantized once
// into a thread-local float buffer and multiplied with every activation row, so a decode batch
// of T rows reads each weight byte once. The AVX2/FMA path (checked at run time, see
// quant_isa) unpacks 8 codes per step and runs a 3-row x 4-output register tile; for 1-3 rows
// it dequantizes in registers instead (no buffer), 4 (1 row) or 2 (2-3 rows) output rows at a
// time so that independent FMA chains overlap. For 1-3 rows, codes whose value is the code
// (8-bit; HQQ's nibbles) take the folded path: each group's scale and zero are applied to
// its sum of code x activation products, so the inner loop is widen, convert, FMA (see
// folded_rows_avx2). Other 4-bit codes in groups of a multiple of 32 take byte-table lookups
// (see lut32: in-lane shuffles, no lane-crossing permutes, which are slow on some AVX2
// cores), with the activations permuted once per call to match. The portable path is plain
// loops. AVX-512/VNNI/AMX paths are not written (no machine here to test them).
// Twins: kernels/quant.py quant_linear_4bit_ref / quant_linear_8bit_ref (dequantize, F.linear).
#include "common.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LORAPLEX_X86 1
#endif

namespace loraplex {

namespace {

constexpr int64_t kRowBlock = 4;

struct Packed {
  const uint8_t* codes;
  int64_t row_bytes, in, out, group;
  const float* lut;          // 16 floats (4-bit) or nullptr (8-bit)
  const float* scales;       // [out, in / group]
  const float* zeros;        // [out, in / group] or nullptr
  bool is_signed;            // 8-bit codes are int8
  bool identity_lut;         // 4-bit: lut[q] == q (HQQ), skip the table
};

// ---- portable path --------------------------------------------------------------------

void dequant_row_portable(const Packed& w, int64_t o, float* __restrict dst) {
  const uint8_t* c = w.codes + o * w.row_bytes;
  const int64_t groups = w.in / w.group;
  const float* s = w.scales + o * groups;
  const float* z = w.zeros == nullptr ? nullptr : w.zeros + o * groups;
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = s[g], zero = z == nullptr ? 0.0f : z[g];
    const int64_t first = g * w.group, last = first + w.group;
    if (w.lut != nullptr) {
      for (int64_t i = first; i < last; i += 2) {
        const uint8_t b = c[i / 2];
        dst[i] = (w.lut[b >> 4] - zero) * scale;
        dst[i + 1] = (w.lut[b & 15] - zero) * scale;
      }
    } else if (w.is_signed) {
      const int8_t* q = reinterpret_cast<const int8_t*>(c);
      for (int64_t i = first; i < last; ++i) dst[i] = (static_cast<float>(q[i]) - zero) * scale;
    } else {
      for (int64_t i = first; i < last; ++i) dst[i] = (static_cast<float>(c[i]) - zero) * scale;
    }
  }
}

void tile_portable(const float* x, int64_t x_stride, int64_t rows, const float* wbuf, int64_t nr,
                   int64_t in, float* y, int64_t y_stride) {
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t r = 0; r < nr; ++r) y[t * y_stride + r] = dot(x + t * x_stride, wbuf + r * in, in);
  }
}

#ifdef LORAPLEX_X86
// ---- AVX2 / FMA path ------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 codes from 4 bytes at p, element order (high nibble of byte j first): one broadcast load
// and one variable shift put code k in the low 4 bits of lane k; the bits above are garbage
// (nibble_values ignores them, the identity path masks them).
__attribute__((target("avx2,fma"))) inline __m256i unpack_nibbles(const uint8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  return _mm256_srlv_epi32(_mm256_set1_epi32(four), shifts);
}

// The values of 8 nibble codes (lane k: code in bits 0-3): lut[q] (two 8-entry permutes,
// which read bits 0-2, and a blend on bit 3 moved to the sign), or q itself when the table is
// the identity (HQQ).
__attribute__((target("avx2,fma"))) inline __m256 nibble_values(__m256i q, __m256 lut_lo, __m256 lut_hi,
                                                                bool identity) {
  if (identity) return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, q), _mm256_permutevar8x32_ps(lut_hi, q),
                          _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

// The 8 raw values (before zero and scale) of row c's columns i..i+7.
__attribute__((target("avx2,fma"))) inline __m256 raw_values(const Packed& w, const uint8_t* c, int64_t i,
                                                             __m256 lut_lo, __m256 lut_hi) {
  if (w.lut != nullptr) return nibble_values(unpack_nibbles(c + i / 2), lut_lo, lut_hi, w.identity_lut);
  const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i));
  return _mm256_cvtepi32_ps(w.is_signed ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight));
}

__attribute__((target("avx2,fma")))
void dequant_row_avx2(const Packed& w, int64_t o, float* __restrict dst) {
  const uint8_t* c = w.codes + o * w.row_bytes;
  const int64_t groups = w.in / w.group;
  const float* s = w.scales + o * groups;
  const float* z = w.zeros == nullptr ? nullptr : w.zeros + o * groups;
  __m256 lut_lo = _mm256_setzero_ps(), lut_hi = _mm256_setzero_ps();
  if (w.lut != nullptr) {
    lut_lo = _mm256_loadu_ps(w.lut);
    lut_hi = _mm256_loadu_ps(w.lut + 8);
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 scale = _mm256_set1_ps(s[g]);
    const __m256 zero = _mm256_set1_ps(z == nullptr ? 0.0f : z[g]);
    const int64_t first = g * w.group, last = first + w.group;
    for (int64_t i = first; i < last; i += 8) {
      const __m256 v = raw_values(w, c, i, lut_lo, lut_hi);
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_sub_ps(v, zero), scale));
    }
  }
}

// y[t, r] = x_t . w_r for MR activation rows and 4 weight rows, 8 columns per step.
template <int MR>
__attribute__((target("avx2,fma")))
void micro_avx2(const float* x, int64_t x_stride, const float* wbuf, int64_t in, float* y, int64_t y_stride) {
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * x_stride + k);
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(wbuf + r * in + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < 4; ++r) {
      float sum = hsum(acc[m][r]);
      for (int64_t j = k; j < in; ++j) sum += x[m * x_stride + j] * wbuf[r * in + j];
      y[m * y_stride + r] = sum;
    }
  }
}

// Up to 3 activation rows against NR output rows at once, dequantizing in registers (no
// buffer): each weight is (raw - zero) * scale, the library's value, then one FMA per activation
// row. The NR rows' independent accumulator chains keep the FMA units busy (one row alone waits
// on its own FMA latency at every step).
template <int MR, int NR>
__attribute__((target("avx2,fma")))
void fused_rows_avx2(const Packed& w, int64_t o0, const float* x, int64_t x_stride, float* y,
                     int64_t y_stride, const float* bias) {
  const int64_t groups = w.in / w.group;
  const uint8_t* c[NR];
  for (int r = 0; r < NR; ++r) c[r] = w.codes + (o0 + r) * w.row_bytes;
  __m256 lut_lo = _mm256_setzero_ps(), lut_hi = _mm256_setzero_ps();
  if (w.lut != nullptr) {
    lut_lo = _mm256_loadu_ps(w.lut);
    lut_hi = _mm256_loadu_ps(w.lut + 8);
  }
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale[NR], zero[NR];
    for (int r = 0; r < NR; ++r) {
      scale[r] = _mm256_set1_ps(w.scales[(o0 + r) * groups + g]);
      zero[r] = _mm256_set1_ps(w.zeros == nullptr ? 0.0f : w.zeros[(o0 + r) * groups + g]);
    }
    const int64_t first = g * w.group, last = first + w.group;
    for (int64_t i = first; i < last; i += 8) {
      __m256 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * x_stride + i);
      for (int r = 0; r < NR; ++r) {
        const __m256 v = _mm256_mul_ps(_mm256_sub_ps(raw_values(w, c[r], i, lut_lo, lut_hi), zero[r]), scale[r]);
        for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], v, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * y_stride + o0 + r] = hsum(acc[m][r]) + (bias ? bias[o0 + r] : 0.0f);
}

// Output rows [begin, end) for MR activation rows: NR at a time, the rest one by one.
template <int MR, int NR>
void fused_range_avx2(const Packed& w, int64_t begin, int64_t end, const float* x, int64_t x_stride,
                      float* y, int64_t y_stride, const float* bias) {
  int64_t o = begin;
  for (; o + NR <= end; o += NR) fused_rows_avx2<MR, NR>(w, o, x, x_stride, y, y_stride, bias);
  for (; o < end; ++o) fused_rows_avx2<MR, 1>(w, o, x, x_stride, y, y_stride, bias);
}

void small_rows_avx2(const Packed& w, const float* x, int64_t x_stride, int64_t rows, float* y,
                     int64_t y_stride, const float* bias) {
  at::parallel_for(0, w.out, 16, [&](int64_t begin, int64_t end) {
    if (rows == 1) fused_range_avx2<1, 4>(w, begin, end, x, x_stride, y, y_stride, bias);
    if (rows == 2) fused_range_avx2<2, 2>(w, begin, end, x, x_stride, y, y_stride, bias);
    if (rows == 3) fused_range_avx2<3, 2>(w, begin, end, x, x_stride, y, y_stride, bias);
  });
}

void tile_avx2(const float* x, int64_t x_stride, int64_t rows, const float* wbuf, int64_t nr,
               int64_t in, float* y, int64_t y_stride) {
  if (nr != kRowBlock) {
    tile_portable(x, x_stride, rows, wbuf, nr, in, y, y_stride);
    return;
  }
  int64_t t = 0;
  for (; t + 3 <= rows; t += 3) micro_avx2<3>(x + t * x_stride, x_stride, wbuf, in, y + t * y_stride, y_stride);
  if (rows - t == 2) micro_avx2<2>(x + t * x_stride, x_stride, wbuf, in, y + t * y_stride, y_stride);
  if (rows - t == 1) micro_avx2<1>(x + t * x_stride, x_stride, wbuf, in, y + t * y_stride, y_stride);
}

// ---- AVX2, 4-bit codes through byte tables (group a multiple of 32) ----------------------
// 32 codes (16 packed bytes) become 4 vectors of 8 float32 values with four in-lane byte
// shuffles (one per byte of the 16 table values) and two rounds of unpacking: ~4 cheap ops per
// 8 weights instead of two lane-crossing permutes and a blend. The vectors come out in "split
// order": vector k holds elements 8k+{0,2,4,6} in its low lane and 8k+{1,3,5,7} in its high
// lane; the activations are read in the same order (split_rows permutes each block of 8 once
// per call), so every product pairs the same weight and activation as the plain order.
struct LutBytes {
  __m256i plane[4];          // byte j of lut[q] at position q of both 128-bit lanes
};

__attribute__((target("avx2,fma"))) inline LutBytes lut_bytes(const float* lut) {
  alignas(32) uint8_t planes[4][32];
  for (int q = 0; q < 16; ++q) {
    uint32_t bits;
    std::memcpy(&bits, lut + q, 4);
    for (int j = 0; j < 4; ++j) planes[j][q] = planes[j][q + 16] = static_cast<uint8_t>(bits >> (8 * j));
  }
  LutBytes t;
  for (int j = 0; j < 4; ++j) t.plane[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes[j]));
  return t;
}

// lut[code] of the 32 codes in the 16 bytes at p, in split order (see above).
__attribute__((target("avx2,fma"))) inline void lut32(const uint8_t* p, const LutBytes& t, __m256 v[4]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nibble = _mm_set1_epi8(15);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);     // elements 0, 2, .., 30
  const __m128i low = _mm_and_si128(packed, nibble);                          // elements 1, 3, .., 31
  const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(high), low, 1);
  const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], q), b1 = _mm256_shuffle_epi8(t.plane[1], q);
  const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], q), b3 = _mm256_shuffle_epi8(t.plane[3], q);
  const __m256i w01_lo = _mm256_unpacklo_epi8(b0, b1), w01_hi = _mm256_unpackhi_epi8(b0, b1);
  const __m256i w23_lo = _mm256_unpacklo_epi8(b2, b3), w23_hi = _mm256_unpackhi_epi8(b2, b3);
  v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01_lo, w23_lo));
  v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01_lo, w23_lo));
  v[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01_hi, w23_hi));
  v[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01_hi, w23_hi));
}

// rows x [rows, in] (row stride x_stride) -> dst [rows, in] contiguous, each block of 8 in split order.
__attribute__((target("avx2,fma")))
void split_rows(const float* x, int64_t x_stride, int64_t rows, int64_t in, float* dst) {
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t i = 0; i < in; i += 8) {
      _mm256_storeu_ps(dst + t * in + i, _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + t * x_stride + i), order));
    }
  }
}

// One weight row dequantized into dst in split order: (lut[q] - zero) * scale, the library's values.
__attribute__((target("avx2,fma")))
void dequant_row_lut32(const Packed& w, const LutBytes& t, int64_t o, float* __restrict dst) {
  const uint8_t* c = w.codes + o * w.row_bytes;
  const int64_t groups = w.in / w.group;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 scale = _mm256_set1_ps(w.scales[o * groups + g]);
    const __m256 zero = _mm256_set1_ps(w.zeros == nullptr ? 0.0f : w.zeros[o * groups + g]);
    for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 32) {
      __m256 v[4];
      lut32(c + i / 2, t, v);
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(dst + i + 8 * k, _mm256_mul_ps(_mm256_sub_ps(v[k], zero), scale));
    }
  }
}

// MR split activation rows (stride in) against NR weight rows, dequantizing in registers: each
// group's (lut[q] - zero) . x is summed in two partial accumulators, then scaled once.
template <int MR, int NR>
__attribute__((target("avx2,fma")))
void fused_rows_lut32(const Packed& w, const LutBytes& t, int64_t o0, const float* xs, float* y,
                      int64_t y_stride, const float* bias) {
  const int64_t groups = w.in / w.group;
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[MR][NR][2];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) part[m][r][0] = part[m][r][1] = _mm256_setzero_ps();
    for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 32) {
      for (int r = 0; r < NR; ++r) {
        __m256 v[4];
        lut32(w.codes + (o0 + r) * w.row_bytes + i / 2, t, v);
        if (w.zeros != nullptr) {
          const __m256 zero = _mm256_set1_ps(w.zeros[(o0 + r) * groups + g]);
          for (int k = 0; k < 4; ++k) v[k] = _mm256_sub_ps(v[k], zero);
        }
        for (int m = 0; m < MR; ++m) {
          const float* xm = xs + m * w.in + i;
          for (int k = 0; k < 4; ++k) {
            part[m][r][k & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8 * k), v[k], part[m][r][k & 1]);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 scale = _mm256_set1_ps(w.scales[(o0 + r) * groups + g]);
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = _mm256_fmadd_ps(_mm256_add_ps(part[m][r][0], part[m][r][1]), scale, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * y_stride + o0 + r] = hsum(acc[m][r]) + (bias ? bias[o0 + r] : 0.0f);
}

template <int MR, int NR>
void fused_range_lut32(const Packed& w, const LutBytes& t, int64_t begin, int64_t end, const float* xs,
                       float* y, int64_t y_stride, const float* bias) {
  int64_t o = begin;
  for (; o + NR <= end; o += NR) fused_rows_lut32<MR, NR>(w, t, o, xs, y, y_stride, bias);
  for (; o < end; ++o) fused_rows_lut32<MR, 1>(w, t, o, xs, y, y_stride, bias);
}

// The 4-bit path when the group is a multiple of 32: x split once, then the register path for
// 1-3 rows or dequantize-4-rows-then-tile (the tile reads the split x) for more.
void run_lut32(const at::Tensor& x, const Packed& w, const float* b_ptr, float* y_ptr) {
  const int64_t rows = x.size(0);
  at::Tensor xs = at::empty({rows, w.in}, x.options());                       // [rows, in] split order
  split_rows(x.data_ptr<float>(), x.stride(0), rows, w.in, xs.data_ptr<float>());
  const float* xs_ptr = xs.data_ptr<float>();
  const LutBytes t = lut_bytes(w.lut);
  if (rows <= 3) {
    at::parallel_for(0, w.out, 16, [&](int64_t begin, int64_t end) {
      if (rows == 1) fused_range_lut32<1, 2>(w, t, begin, end, xs_ptr, y_ptr, w.out, b_ptr);
      if (rows == 2) fused_range_lut32<2, 1>(w, t, begin, end, xs_ptr, y_ptr, w.out, b_ptr);
      if (rows == 3) fused_range_lut32<3, 1>(w, t, begin, end, xs_ptr, y_ptr, w.out, b_ptr);
    });
    return;
  }
  const int64_t blocks = (w.out + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(static_cast<size_t>(kRowBlock * w.in));
    std::vector<float> ybuf(static_cast<size_t>(rows * kRowBlock));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t o0 = blk * kRowBlock, nr = std::min(kRowBlock, w.out - o0);
      for (int64_t r = 0; r < nr; ++r) dequant_row_lut32(w, t, o0 + r, wbuf.data() + r * w.in);
      tile_avx2(xs_ptr, w.in, rows, wbuf.data(), nr, w.in, ybuf.data(), kRowBlock);
      for (int64_t tt = 0; tt < rows; ++tt) {
        for (int64_t r = 0; r < nr; ++r) {
          y_ptr[tt * w.out + o0 + r] = ybuf[tt * kRowBlock + r] + (b_ptr ? b_ptr[o0 + r] : 0.0f);
        }
      }
    }
  });
}

// ---- AVX2, linear codes with the group's affine folded out of the inner loop ---------------
// For codes whose value is the code itself (8-bit, and HQQ's 4/3/2-bit nibbles) a group's
// sum_k (q_k - zero) * scale * x_k is computed as scale * (sum_k q_k x_k - zero * sum_k x_k),
// lane-wise: the inner loop is only widen, convert and FMA. The lane-wise group sums of the
// activations (xsum) are taken once per call. Differs from dequantize-then-multiply by float
// rounding only (the zero term is subtracted per lane, after at most group / 8 products).
// 4-bit codes: 8 bytes widen to 8 lanes; the high nibbles are elements 0, 2, .., 14 of the 16
// and the low ones 1, 3, .., 15, so the activations are read with each block of 16 split into
// its even then its odd elements (folded_rows, once per call).

// rows x [rows, in] -> xs [rows, in] contiguous, each block of 16 even-then-odd (split16; else
// xs is x itself and nothing is written) and, when xsum is given, xsum [rows, in / group, 8]:
// lane j of group g sums the activations xs places in lane j of that group's vectors.
__attribute__((target("avx2,fma")))
void folded_rows(const float* x, int64_t x_stride, int64_t rows, int64_t in, int64_t group, bool split16,
                 float* xs, float* xsum) {
  const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t t = 0; t < rows; ++t) {
    const float* src = x + t * x_stride;
    const float* row = split16 ? xs + t * in : src;                  // the row the kernel reads
    if (split16) {
      for (int64_t i = 0; i < in; i += 16) {
        const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + i), even_odd);      // 0 2 4 6 | 1 3 5 7
        const __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + i + 8), even_odd);  // 8 .. 14 | 9 .. 15
        _mm256_storeu_ps(xs + t * in + i, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(xs + t * in + i + 8, _mm256_permute2f128_ps(a, b, 0x31));
      }
    }
    if (xsum == nullptr) continue;
    for (int64_t g = 0; g < in / group; ++g) {
      __m256 sum = _mm256_setzero_ps();
      for (int64_t i = g * group; i < (g + 1) * group; i += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(row + i));
      _mm256_storeu_ps(xsum + (t * (in / group) + g) * 8, sum);
    }
  }
}

// The group's contribution to acc: scale * (part - zero * xsum), lane-wise.
__attribute__((target("avx2,fma"))) inline __m256 fold_group(__m256 acc, __m256 part, const Packed& w,
                                                             int64_t at, const float* xsum_g) {
  if (w.zeros != nullptr) part = _mm256_fnmadd_ps(_mm256_set1_ps(w.zeros[at]), _mm256_loadu_ps(xsum_g), part);
  return _mm256_fmadd_ps(part, _mm256_set1_ps(w.scales[at]), acc);
}

// MR prepared activation rows (xs, row stride xs_stride) against NR weight rows of linear
// codes, 16 (4-bit) or 8 (8-bit) weights per step.
template <int MR, int NR>
__attribute__((target("avx2,fma")))
void folded_rows_avx2(const Packed& w, int64_t o0, const float* xs, int64_t xs_stride, const float* xsum,
                      float* y, int64_t y_stride, const float* bias) {
  const int64_t groups = w.in / w.group;
  const bool nibbles = w.lut != nullptr;
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) part[m][r] = _mm256_setzero_ps();
    if (nibbles) {
      for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 16) {
        __m256 xe[MR], xo[MR];
        for (int m = 0; m < MR; ++m) {
          xe[m] = _mm256_loadu_ps(xs + m * xs_stride + i);
          xo[m] = _mm256_loadu_ps(xs + m * xs_stride + i + 8);
        }
        for (int r = 0; r < NR; ++r) {
          const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.codes + (o0 + r) * w.row_bytes + i / 2));
          const __m256i bytes = _mm256_cvtepu8_epi32(eight);
          const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));         // elements 0, 2, .., 14
          const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low4));        // elements 1, 3, .., 15
          for (int m = 0; m < MR; ++m) part[m][r] = _mm256_fmadd_ps(xo[m], low, _mm256_fmadd_ps(xe[m], high, part[m][r]));
        }
      }
    } else {
      for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 8) {
        __m256 xv[MR];
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(xs + m * xs_stride + i);
        for (int r = 0; r < NR; ++r) {
          const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.codes + (o0 + r) * w.row_bytes + i));
          const __m256 v = _mm256_cvtepi32_ps(w.is_signed ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight));
          for (int m = 0; m < MR; ++m) part[m][r] = _mm256_fmadd_ps(xv[m], v, part[m][r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = fold_group(acc[m][r], part[m][r], w, (o0 + r) * groups + g,
                               xsum == nullptr ? nullptr : xsum + (m * groups + g) * 8);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * y_stride + o0 + r] = hsum(acc[m][r]) + (bias ? bias[o0 + r] : 0.0f);
}

template <int MR, int NR>
void folded_range_avx2(const Packed& w, int64_t begin, int64_t end, const float* xs, int64_t xs_stride,
                       const float* xsum, float* y, int64_t y_stride, const float* bias) {
  int64_t o = begin;
  for (; o + NR <= end; o += NR) folded_rows_avx2<MR, NR>(w, o, xs, xs_stride, xsum, y, y_stride, bias);
  for (; o < end; ++o) folded_rows_avx2<MR, 1>(w, o, xs, xs_stride, xsum, y, y_stride, bias);
}

// True when the folded path takes this weight: linear codes (8-bit, or the identity table)
// in groups of whole steps.
bool folds(const Packed& w) {
  return w.lut == nullptr ? w.group % 8 == 0 : w.identity_lut && w.group % 16 == 0;
}

// 1-3 activation rows through the folded path.
void run_folded(const float* x, int64_t x_stride, int64_t rows, const Packed& w, const float* b_ptr, float* y_ptr) {
  const int64_t groups = w.in / w.group;
  const bool split16 = w.lut != nullptr;                              // 4-bit: even/odd order
  std::vector<float> split(split16 ? static_cast<size_t>(rows * w.in) : 0);      // [rows, in]
  std::vector<float> xsum(w.zeros == nullptr ? 0 : static_cast<size_t>(rows * groups * 8));   // [rows, G, 8]
  float* xsum_ptr = w.zeros == nullptr ? nullptr : xsum.data();
  folded_rows(x, x_stride, rows, w.in, w.group, split16, split.data(), xsum_ptr);
  const float* xs = split16 ? split.data() : x;
  const int64_t xs_stride = split16 ? w.in : x_stride;
  at::parallel_for(0, w.out, 16, [&](int64_t begin, int64_t end) {
    if (rows == 1) folded_range_avx2<1, 4>(w, begin, end, xs, xs_stride, xsum_ptr, y_ptr, w.out, b_ptr);
    if (rows == 2) folded_range_avx2<2, 2>(w, begin, end, xs, xs_stride, xsum_ptr, y_ptr, w.out, b_ptr);
    if (rows == 3) folded_range_avx2<3, 1>(w, begin, end, xs, xs_stride, xsum_ptr, y_ptr, w.out, b_ptr);
  });
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool cpu_has_avx2() { return false; }
#endif

using DequantFn = void (*)(const Packed&, int64_t, float*);
using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);

at::Tensor run(const at::Tensor& x, const Packed& w, const std::optional<at::Tensor>& bias, bool portable) {
  DequantFn dequant = dequant_row_portable;
  TileFn tile = tile_portable;
#ifdef LORAPLEX_X86
  if (!portable && cpu_has_avx2() && w.group % 8 == 0) {
    dequant = dequant_row_avx2;
    tile = tile_avx2;
  }
#endif
  const int64_t rows = x.size(0), x_stride = x.stride(0);
  at::Tensor y = at::empty({rows, w.out}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  const float* b_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t blocks = (w.out + kRowBlock - 1) / kRowBlock;
  if (rows == 0) return y;
#ifdef LORAPLEX_X86
  if (dequant == dequant_row_avx2 && rows <= 3 && folds(w)) {       // decode, linear codes
    run_folded(x_ptr, x_stride, rows, w, b_ptr, y_ptr);
    return y;
  }
  if (dequant == dequant_row_avx2 && w.lut != nullptr && w.group % 32 == 0) {
    run_lut32(x, w, b_ptr, y_ptr);
    return y;
  }
  if (dequant == dequant_row_avx2 && rows <= 3) {                   // decode: no weight buffer
    small_rows_avx2(w, x_ptr, x_stride, rows, y_ptr, w.out, b_ptr);
    return y;
  }
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(static_cast<size_t>(kRowBlock * w.in));
    std::vector<float> ybuf(static_cast<size_t>(rows * kRowBlock));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t o0 = blk * kRowBlock, nr = std::min(kRowBlock, w.out - o0);
      for (int64_t r = 0; r < nr; ++r) dequant(w, o0 + r, wbuf.data() + r * w.in);
      tile(x_ptr, x_stride, rows, wbuf.data(), nr, w.in, ybuf.data(), kRowBlock);
      for (int64_t t = 0; t < rows; ++t) {
        for (int64_t r = 0; r < nr; ++r) {
          y_ptr[t * w.out + o0 + r] = ybuf[t * kRowBlock + r] + (b_ptr ? b_ptr[o0 + r] : 0.0f);
        }
      }
    }
  });
  return y;
}

void check_common(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, int64_t group, int64_t out,
                  const std::optional<at::Tensor>& bias) {
  check_float_rows(x, "quant_linear x");
  const int64_t in = x.size(1);
  TORCH_CHECK(group > 0 && in % group == 0, "quant_linear: group ", group, " must divide in_features ", in);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.size(0) == out,
              "quant_linear: codes must be contiguous [out, ...]");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat &&
              scales.numel() == out * (in / group), "quant_linear: scales must be float32 [out, in / group]");
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->is_contiguous() && zeros->scalar_type() == at::kFloat &&
                zeros->numel() == scales.numel(), "quant_linear: zeros must be float32 like scales");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == out,
                "quant_linear: bias must be float32 [out]");
  }
}

}  // namespace

at::Tensor quant_linear_4bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                             const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                             int64_t group, const std::optional<at::Tensor>& bias, bool portable) {
  const int64_t out = codes.size(0);
  check_common(x, codes, scales, zeros, group, out, bias);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.size(1) * 2 == x.size(1) && group % 2 == 0,
              "quant_linear_4bit: codes must be uint8 [out, in / 2] and the group even");
  TORCH_CHECK(lut.is_contiguous() && lut.scalar_type() == at::kFloat && lut.numel() == 16,
              "quant_linear_4bit: lut must be float32 [16]");
  const float* table = lut.data_ptr<float>();
  bool identity = true;
  for (int k = 0; k < 16; ++k) identity = identity && table[k] == static_cast<float>(k);
  const Packed w{codes.data_ptr<uint8_t>(), codes.size(1), x.size(1), out, group, table,
                 scales.data_ptr<float>(), zeros.has_value() ? zeros->data_ptr<float>() : nullptr, false,
                 identity};
  return run(x, w, bias, portable);
}

at::Tensor quant_linear_8bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t group,
                             const std::optional<at::Tensor>& bias, bool portable) {
  const int64_t out = codes.size(0);
  check_common(x, codes, scales, zeros, group, out, bias);
  TORCH_CHECK((codes.scalar_type() == at::kByte || codes.scalar_type() == at::kChar) &&
              codes.size(1) == x.size(1), "quant_linear_8bit: codes must be int8 or uint8 [out, in]");
  const Packed w{static_cast<const uint8_t*>(codes.data_ptr()), codes.size(1), x.size(1), out, group, nullptr,
                 scales.data_ptr<float>(), zeros.has_value() ? zeros->data_ptr<float>() : nullptr,
                 codes.scalar_type() == at::kChar, false};
  return run(x, w, bias, portable);
}

std::string quant_isa() { return cpu_has_avx2() ? "avx2" : "portable"; }

}  // namespace loraplex
