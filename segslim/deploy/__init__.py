"""Deployment: the engine interface and its three backends (Paddle Inference, OpenVINO,
onnxruntime), prediction on image files, the FP32-vs-INT8 benchmark and its report."""
