"""loraplex.server: engine, model runner, quantized layers, LoRA slots and the gRPC service."""
