"""segslim: quantization-aware training and INT8 deployment for PaddleSeg models."""
from segslim.zlib_hook import preload as _preload_zlib

_preload_zlib()  # before any module of the package imports paddle (see zlib_hook)

__version__ = '0.2.0'
