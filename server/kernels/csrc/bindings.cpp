// Python bindings of the fused CPU kernels (the only file that includes torch/extension.h).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace loraplex;
  m.def("argmax_rows", &argmax_rows, "argmax over the last dim of [rows, vocab], float32");
  m.def("decode_attention", &decode_attention, "paged decode attention, float32");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm, float32");
  m.def("rope_write_kv", &rope_write_kv, "rotary embedding in place + K/V cache write, float32");
  m.def("silu_mul", &silu_mul, "silu(gate) * up, float32");
  m.def("lora_bgmv", &lora_bgmv, "fused LoRA shrink + expand, one adapter per token, float32");
  m.def("quant_linear_4bit", &quant_linear_4bit, "fused 4-bit dequantize + GEMM (nibble codes, LUT)");
  m.def("quant_linear_8bit", &quant_linear_8bit, "fused 8-bit dequantize + GEMM (int8 / uint8 codes)");
  m.def("decode_stack", &decode_stack, "every decoder layer of a pure-decode step, float32");
#ifdef LORAPLEX_STACK_TIMING
  m.def("stack_timings", &stack_timings, "bench builds: seconds per op class inside decode_stack since the last call");
#endif
  m.def("quant_isa", &quant_isa, "the instruction set the quantized GEMMs use here (avx2 / portable)");
}
