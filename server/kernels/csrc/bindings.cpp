// Python bindings of the fused CPU kernels (the only file that includes torch/extension.h).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace loraplex;
  // Every kernel releases the GIL while it runs, as torch's own ops do: the arguments are
  // converted before and the result after, and the kernels touch no Python object. Held, a
  // decode step (one decode_stack call: the whole model) would stop every other Python thread
  // of the server for its duration: the gRPC/HTTP event loop, the adapter loaders, the
  // structured-output mask thread.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("argmax_rows", &argmax_rows, "argmax over the last dim of [rows, vocab], float32", nogil);
  m.def("decode_attention", &decode_attention, "paged decode attention, float32", nogil);
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm, float32", nogil);
  m.def("rope_write_kv", &rope_write_kv, "rotary embedding in place + K/V cache write, float32", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up, float32", nogil);
  m.def("lora_bgmv", &lora_bgmv, "fused LoRA shrink + expand, one adapter per token, float32", nogil);
  m.def("dora_scale_rows", &dora_scale_rows, "DoRA's per-output scale on the DoRA tokens' rows, in place, float32",
        nogil);
  m.def("quant_linear_4bit", &quant_linear_4bit, "fused 4-bit dequantize + GEMM (nibble codes, LUT)", nogil);
  m.def("quant_linear_8bit", &quant_linear_8bit, "fused 8-bit dequantize + GEMM (int8 / uint8 codes)", nogil);
  m.def("decode_stack", &decode_stack, "every decoder layer of a pure-decode step, float32", nogil);
#ifdef LORAPLEX_STACK_TIMING
  m.def("stack_timings", &stack_timings, "bench builds: seconds per op class inside decode_stack since the last call");
#endif
  m.def("quant_isa", &quant_isa, "the instruction set the quantized GEMMs use here (avx2 / portable)");
}
