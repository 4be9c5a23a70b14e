"""segslim: quantization-aware training and INT8 deployment for PaddleSeg models."""
import os as _os
import warnings as _warnings

from segslim.compat import installed_paddle_version as _installed_paddle_version
from segslim.compat import set_program_format as _set_program_format
from segslim.zlib_hook import preload as _preload_zlib

# paddle's import sets OMP_NUM_THREADS=1 where it is unset: what the user set (or nothing) is
# kept before that, for this process and the ones it starts (see _paddle.default_cpu_threads)
_os.environ.setdefault('SEGSLIM_USER_OMP_NUM_THREADS', _os.environ.get('OMP_NUM_THREADS', ''))

# Paddle 3's import warns about its C++-extension builder on stderr, and PaddleSlim's that
# setuptools' pkg_resources is deprecated
_warnings.filterwarnings('ignore', message='No ccache found')
_warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
_preload_zlib()  # before any module of the package imports paddle (see zlib_hook)
# Paddle 3: programs in the ProgramDesc format the INT8 tool chain reads (see compat)
_set_program_format(_os.environ, _installed_paddle_version())

__version__ = '0.2.0'
