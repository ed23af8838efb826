// The fused CPU kernels of loraplex, one family per source file, bound in bindings.cpp.
// Every kernel has a pure-torch twin named `<kernel>_ref` (server/kernels/registry.py lists
// the pairs; tests/unit/test_kernel_registry.py compares each pair).
//
//   attention.cpp  decode_attention   paged decode attention
//   layer_ops.cpp  add_rms_norm, rope_write_kv, silu_mul
//   lora.cpp       lora_bgmv          fused LoRA shrink + expand, one adapter per token
//   dora.cpp       dora_scale_rows    DoRA's per-output scale on the rows of DoRA tokens
//   sampling.cpp   argmax_rows        greedy rows' argmax
//   decode_stack.cpp decode_stack     every decoder layer of a pure-decode step in one call
//   quant_gemm.cpp quant_linear_4bit, quant_linear_8bit, quant_isa   fused dequantize + GEMM
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace loraplex {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale, int64_t window);
at::Tensor add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                        const at::Tensor& weight, double eps);
void rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                   int64_t num_heads, int64_t num_kv_heads);
at::Tensor silu_mul(const at::Tensor& gate_up);
void lora_bgmv(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
               const std::vector<at::Tensor>& bts, const std::vector<int64_t>& col_starts,
               const at::Tensor& token_slots, const at::Tensor& scales);
void dora_scale_rows(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& slots,
                     const at::Tensor& scales, const std::optional<at::Tensor>& bias);
at::Tensor argmax_rows(const at::Tensor& logits);
at::Tensor quant_linear_4bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                             const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                             int64_t group, const std::optional<at::Tensor>& bias, bool portable);
at::Tensor quant_linear_8bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t group,
                             const std::optional<at::Tensor>& bias, bool portable);
std::string quant_isa();
std::vector<double> stack_timings();      // bench builds only (LORAPLEX_STACK_TIMING)
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
                        const std::optional<at::Tensor>& dora_slots);

}  // namespace loraplex
