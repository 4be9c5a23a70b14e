"""segslim: quantization-aware training and INT8 deployment for PaddleSeg models."""
import os as _os

from segslim.zlib_hook import preload as _preload_zlib

# paddle's import sets OMP_NUM_THREADS=1 where it is unset: what the user set (or nothing) is
# kept before that, for this process and the ones it starts (see _paddle.default_cpu_threads)
_os.environ.setdefault('SEGSLIM_USER_OMP_NUM_THREADS', _os.environ.get('OMP_NUM_THREADS', ''))

_preload_zlib()  # before any module of the package imports paddle (see zlib_hook)

__version__ = '0.2.0'
