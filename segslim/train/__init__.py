"""Training, evaluation, metrics and checkpoint io shared by the FP32 and QAT scripts."""
