"""segslim: quantization-aware training and INT8 deployment for PaddleSeg models."""
__version__ = '0.1.0'
