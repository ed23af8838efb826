// decode_stack: every decoder layer of a pure-decode step (one new token per sequence) in one
// call, so the step pays the Python interpreter once instead of ~20 calls a layer. Each layer
// is the sequence model/llama.py DecoderLayer runs, with the same kernels in the same order
// (the results are bit-equal to that path):
//   add_rms_norm -> qkv GEMM -> rope_write_kv -> decode_attention -> o GEMM -> add_rms_norm
//   -> gate_up GEMM -> silu_mul -> down GEMM,
// then the final add_rms_norm. A projection's base is one or more parts (a ConcatLinear's
// outputs are concatenated), each F.linear on the plain weight (kind 0), the oneDNN prepacked
// weight (kind 1, layers/cpu_gemm.py packed_linear, rows padded to the same bucket) or the
// fused 4-bit / 8-bit dequantize-GEMM (kinds 2, 3; quant_gemm.cpp). On a LoRA step each GEMM
// is followed by lora_bgmv, as ProjLinear's hook does with the native LoRA route, and on a step
// with rows on DoRA adapters by dora_scale_rows (dora.cpp), as the hook's apply_dora does.
// Twin: model/decode_stack.py decode_stack_ref.
#include <ATen/core/dispatch/Dispatcher.h>

#include <chrono>
#include <string_view>

#include "common.h"
#include "kernels.h"

namespace loraplex {

#ifdef LORAPLEX_STACK_TIMING
// Bench builds only (native.load(timing=True), bench/step_ops_bench.py): seconds spent in each
// op class inside decode_stack since the last stack_timings() call.
namespace {
enum TimedOp { kTimeGemm, kTimeNorm, kTimeRope, kTimeAttention, kTimeSilu, kTimedOps };
double g_op_seconds[kTimedOps] = {};
struct OpTimer {
  TimedOp op;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  ~OpTimer() {
    g_op_seconds[op] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};
}  // namespace
#define LORAPLEX_TIME(op) OpTimer timer_##op{op}

std::vector<double> stack_timings() {
  std::vector<double> out(g_op_seconds, g_op_seconds + kTimedOps);
  std::fill(g_op_seconds, g_op_seconds + kTimedOps, 0.0);
  return out;
}
#else
#define LORAPLEX_TIME(op)
#endif

namespace {

// GEMM kinds of a projection part, and how many tensors each takes (see decode_stack below).
constexpr int64_t kGemmAten = 0, kGemmOnednn = 1, kGemmQuant4 = 2, kGemmQuant8 = 3;
constexpr size_t kPartTensors[] = {2, 2, 5, 4};

// Rows a prepacked GEMM runs with (layers/cpu_gemm.py row_bucket): exact up to 8, then
// multiples of 8 up to 64, then of 64.
int64_t row_bucket(int64_t rows) {
  if (rows <= 8) return rows;
  if (rows <= 64) return (rows + 7) / 8 * 8;
  return (rows + 63) / 64 * 64;
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        std::string_view, c10::List<std::optional<at::Scalar>>,
                        std::optional<std::string_view>)>();
  const auto call = [&](const at::Tensor& input) {
    return op.call(input, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), std::string_view(""));
  };
  const int64_t rows = x.size(0), padded = row_bucket(rows);
  if (padded == rows) return call(x);
  return call(at::constant_pad_nd(x, {0, 0, 0, padded - rows})).narrow(0, 0, rows);
}

// The step's LoRA routing: per projection its adapter stacks (lora_bgmv's a, bts, col_starts;
// a None where the projection has no hook), the token slots and per-slot scales; then DoRA's
// (empty lists and None when no row of the step is on a DoRA adapter): per projection the
// per-slot factors [S, out] and the base bias [out] (or None), and the DoRA rows with their slots.
struct StackLora {
  const std::vector<std::optional<at::Tensor>>& a;
  const std::vector<std::vector<at::Tensor>>& bts;
  const std::vector<std::vector<int64_t>>& col_starts;
  const std::optional<at::Tensor>& token_slots;
  const std::optional<at::Tensor>& scales;
  const std::vector<std::optional<at::Tensor>>& dora_scales;
  const std::vector<std::optional<at::Tensor>>& dora_biases;
  const std::optional<at::Tensor>& dora_rows;
  const std::optional<at::Tensor>& dora_slots;

  bool active() const { return !a.empty(); }
  bool dora(int64_t index) const { return !dora_scales.empty() && dora_scales[index].has_value(); }
};

// One part of a projection's base (a ConcatLinear has several, each its own kernel).
at::Tensor run_part(const at::Tensor& x, int64_t kind, const std::vector<std::optional<at::Tensor>>& t,
                    int64_t group) {
  switch (kind) {
    case kGemmAten: return at::linear(x, *t[0], t[1]);
    case kGemmOnednn: return onednn_linear(x, *t[0], t[1]);
    case kGemmQuant4: return quant_linear_4bit(x, *t[0], *t[1], *t[2], t[3], group, t[4], false);
    default: return quant_linear_8bit(x, *t[0], *t[1], t[2], group, t[3], false);
  }
}

// One projection: its base (parts' outputs concatenated), then (on a LoRA step) y += the
// tokens' deltas in place, then (on a DoRA step) the DoRA rows' per-output scale in place.
struct Gemm {
  const std::vector<std::vector<std::optional<at::Tensor>>>& tensors;   // per part
  const std::vector<int64_t>& kinds;
  const std::vector<int64_t>& groups;
  const StackLora& lora;
  int64_t index;                                                     // projection number

  at::Tensor operator()(const at::Tensor& x) const {
    LORAPLEX_TIME(kTimeGemm);
    at::Tensor y;
    if (kinds.size() == 1) {
      y = run_part(x, kinds[0], tensors[0], groups[0]);
    } else {
      std::vector<at::Tensor> outs;
      for (size_t p = 0; p < kinds.size(); ++p) outs.push_back(run_part(x, kinds[p], tensors[p], groups[p]));
      y = at::cat(outs, -1);
    }
    if (lora.active() && lora.a[index].has_value()) {
      lora_bgmv(x, y, *lora.a[index], lora.bts[index], lora.col_starts[index], *lora.token_slots,
                *lora.scales);
    }
    if (lora.dora(index)) {
      dora_scale_rows(y, *lora.dora_rows, *lora.dora_slots, *lora.dora_scales[index], lora.dora_biases[index]);
    }
    return y;
  }
};

void check_gemms(const std::vector<std::vector<std::vector<std::optional<at::Tensor>>>>& tensors,
                 const std::vector<std::vector<int64_t>>& kinds, const std::vector<std::vector<int64_t>>& groups) {
  TORCH_CHECK(kinds.size() == tensors.size() && groups.size() == tensors.size(),
              "decode_stack: gemm tensors, kinds and groups differ in length");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!kinds[i].empty() && kinds[i].size() == tensors[i].size() && groups[i].size() == kinds[i].size(),
                "decode_stack: projection ", i, " needs one kind, group and tensor list per part");
    for (size_t p = 0; p < kinds[i].size(); ++p) {
      const int64_t kind = kinds[i][p];
      TORCH_CHECK(kind >= kGemmAten && kind <= kGemmQuant8, "decode_stack: GEMM kind ", kind,
                  " (0 = F.linear, 1 = oneDNN prepacked, 2 = 4-bit, 3 = 8-bit fused dequantize-GEMM)");
      const auto& t = tensors[i][p];
      TORCH_CHECK(t.size() == kPartTensors[kind] && t[0].has_value() &&
                      (kind != kGemmQuant4 || (t[1].has_value() && t[2].has_value())) &&
                      (kind != kGemmQuant8 || t[1].has_value()),
                  "decode_stack: projection ", i, " part ", p, ": kind ", kind, " takes ",
                  kPartTensors[kind], " tensors (see decode_stack.py)");
    }
  }
}

}  // namespace

// hidden [D, hidden] (the step's embeddings, one row per sequence); norms: per layer its input
// and post-attention norm weights, then the final norm (2 L + 1); gemm_tensors, gemm_kinds,
// gemm_groups: per projection (qkv, o, gate_up, down of each layer: 4 L) per part its tensors
// (kind 0/1: weight, bias; 2: codes, lut, scales, zeros, bias; 3: codes, scales, zeros, bias;
// bias and zeros may be None), kind and quantization group; cos, sin [D, hd]; k_caches,
// v_caches: per layer; slots [D]; block_tables [D, max_blocks]; seq_lens [D] (keys incl. this step's); LoRA: empty
// lists for none, else per projection (4 L) lora_bgmv's a (or None), bts and col_starts, and
// the step's token_slots [D] and scales; DoRA: empty lists for none, else per projection its
// factors [S, out] (or None) and base bias [out] (or None), and the step's DoRA rows [Dd] and
// their slots [Dd]. Writes this step's K/V and returns the final-normed hidden states [D, hidden].
at::Tensor decode_stack(const at::Tensor& hidden, const std::vector<at::Tensor>& norms,
                        const std::vector<std::vector<std::vector<std::optional<at::Tensor>>>>& gemm_tensors,
                        const std::vector<std::vector<int64_t>>& gemm_kinds,
                        const std::vector<std::vector<int64_t>>& gemm_groups, const at::Tensor& cos,
                        const at::Tensor& sin, const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, const at::Tensor& slots,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                        int64_t window, double eps, int64_t num_heads, int64_t num_kv_heads,
                        const std::vector<std::optional<at::Tensor>>& lora_a,
                        const std::vector<std::vector<at::Tensor>>& lora_bts,
                        const std::vector<std::vector<int64_t>>& lora_col_starts,
                        const std::optional<at::Tensor>& token_slots,
                        const std::optional<at::Tensor>& lora_scales,
                        const std::vector<std::optional<at::Tensor>>& dora_scales,
                        const std::vector<std::optional<at::Tensor>>& dora_biases,
                        const std::optional<at::Tensor>& dora_rows,
                        const std::optional<at::Tensor>& dora_slots) {
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  const StackLora lora{lora_a,      lora_bts,    lora_col_starts, token_slots, lora_scales,
                       dora_scales, dora_biases, dora_rows,       dora_slots};
  TORCH_CHECK(!lora.active() || (lora_a.size() == gemm_tensors.size() && lora_bts.size() == gemm_tensors.size() &&
                                 lora_col_starts.size() == gemm_tensors.size() && token_slots.has_value() &&
                                 lora_scales.has_value()),
              "decode_stack: LoRA needs per projection a, bts and col_starts, plus token slots and scales");
  TORCH_CHECK(dora_scales.empty() || (dora_scales.size() == gemm_tensors.size() &&
                                      dora_biases.size() == gemm_tensors.size() && dora_rows.has_value() &&
                                      dora_slots.has_value()),
              "decode_stack: DoRA needs per projection scales and bias, plus the DoRA rows and their slots");
  TORCH_CHECK(v_caches.size() == k_caches.size() && norms.size() == static_cast<size_t>(2 * num_layers + 1) &&
              gemm_tensors.size() == static_cast<size_t>(4 * num_layers),
              "decode_stack: per layer one K and V cache, two norms (plus the final one) and four GEMMs");
  check_gemms(gemm_tensors, gemm_kinds, gemm_groups);
  check_float_rows(hidden, "decode_stack hidden");
  const int64_t rows = hidden.size(0), head_dim = k_caches.empty() ? 0 : k_caches[0].size(3);
  const int64_t q_size = num_heads * head_dim;
  at::Tensor x = hidden, residual;
  for (int64_t l = 0; l < num_layers; ++l) {
    const auto gemm = [&](int64_t i) {
      const int64_t j = 4 * l + i;
      return Gemm{gemm_tensors[j], gemm_kinds[j], gemm_groups[j], lora, j};
    };
    at::Tensor normed;
    {
      LORAPLEX_TIME(kTimeNorm);
      if (l == 0) {
        normed = add_rms_norm(x, std::nullopt, norms[0], eps);
        residual = x;                                                // updated in place from here on
      } else {
        normed = add_rms_norm(x, residual, norms[2 * l], eps);
      }
    }
    const at::Tensor qkv = gemm(0)(normed);                          // [D, (H + 2 KV) hd]
    {
      LORAPLEX_TIME(kTimeRope);
      rope_write_kv(qkv, cos, sin, k_caches[l], v_caches[l], slots, num_heads, num_kv_heads);
    }
    const at::Tensor q = qkv.narrow(1, 0, q_size).view({rows, num_heads, head_dim});
    at::Tensor attn;                                                 // [D, H, hd]
    {
      LORAPLEX_TIME(kTimeAttention);
      attn = decode_attention(q, k_caches[l], v_caches[l], block_tables, seq_lens, scale, window);
    }
    const at::Tensor attn_out = gemm(1)(attn.view({rows, q_size}));
    {
      LORAPLEX_TIME(kTimeNorm);
      normed = add_rms_norm(attn_out, residual, norms[2 * l + 1], eps);
    }
    const at::Tensor gate_up = gemm(2)(normed);
    at::Tensor act;
    {
      LORAPLEX_TIME(kTimeSilu);
      act = silu_mul(gate_up);
    }
    x = gemm(3)(act);                                                // [D, hidden]
  }
  return add_rms_norm(x, num_layers > 0 ? std::optional<at::Tensor>(residual) : std::nullopt,
                      norms[2 * num_layers], eps);
}

}  // namespace loraplex
