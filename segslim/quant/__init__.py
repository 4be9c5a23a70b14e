"""Quantization: the QAT wrapper, post-training quantization (PaddleSlim and NNCF), learned
rounding and per-layer sensitivity."""
