"""Paddle Inference deployment: predictor factory (CPU oneDNN / GPU TensorRT) and benchmark."""
