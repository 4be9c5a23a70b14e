"""The one import of paddle: every module that needs paddle imports it through here, so
paddle's logging and warnings are set once (the zlib fix runs earlier, in segslim/__init__)."""
import contextlib
import os
import warnings
from typing import Iterator, Optional

os.environ.setdefault('GLOG_minloglevel', '2')
warnings.filterwarnings('ignore', message='Setuptools is replacing distutils')
warnings.filterwarnings('ignore', category=DeprecationWarning)
# Paddle 3 says so at every BatchNorm forward in training
warnings.filterwarnings('ignore', message='When training, we now always track global mean')

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from segslim.compat import patch_paddle  # noqa: E402
from segslim.machine import usable_cores  # noqa: E402

patch_paddle(paddle.__version__)

SUPPORTED_PADDLE = ('2.6', '3.2')
_CPU = paddle.CPUPlace()


@contextlib.contextmanager
def static_mode() -> Iterator[None]:
    """Paddle's static graph mode for the block, dygraph again afterwards if it was on."""
    was_dygraph = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        yield
    finally:
        if was_dygraph:
            paddle.disable_static()


def check_versions() -> None:
    """Warns when the installed paddle is outside the tested lines."""
    if not paddle.__version__.startswith(SUPPORTED_PADDLE) and paddle.__version__ != '0.0.0':
        warnings.warn(f'segslim is tested with paddlepaddle 2.6.x and 3.2.x; found '
                      f'{paddle.__version__} (3.3 crashes in oneDNN on CPU inference, see '
                      'docs/usage.md)', stacklevel=2)


def device_available(device: str) -> bool:
    """Whether this paddle build can run on `device` (cpu, gpu, xpu, or a custom device
    plugin such as npu/mlu)."""
    if device == 'cpu':
        return True
    if device == 'gpu':
        return paddle.is_compiled_with_cuda()
    if device == 'xpu':
        return paddle.is_compiled_with_xpu()
    try:
        return device in paddle.device.get_all_custom_device_type()
    except Exception:  # builds without custom-device support
        return False


def set_device(device: str) -> str:
    """Selects the device; on a CPU-only build 'gpu' falls back to CPU with a warning, and a
    device the build lacks otherwise (xpu, npu, mlu) is a one-line error."""
    from segslim.errors import UserError
    from segslim.logger import logger
    if device is None:
        device = 'gpu' if paddle.is_compiled_with_cuda() else 'cpu'
    if device == 'gpu' and not paddle.is_compiled_with_cuda():
        logger.warning('--device gpu asked for, but this paddlepaddle build has no CUDA: '
                       'running on CPU (install paddlepaddle-gpu for GPU runs)')
        device = 'cpu'
    if not device_available(device):
        raise UserError(f'--device {device}: this paddlepaddle build has no {device.upper()} '
                        'support; install the paddle build for that device or pass --device cpu')
    paddle.set_device(device)
    return device


def default_cpu_threads() -> int:
    """The cores this process may use (its CPU affinity), shared among the processes of a
    `paddle.distributed.launch` run on this machine; OMP_NUM_THREADS, where the user set it,
    wins (paddle's import sets it to 1 when unset: segslim/__init__ keeps the user's value)."""
    given = os.environ.get('SEGSLIM_USER_OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', ''))
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = usable_cores()
    local = os.environ.get('PADDLE_LOCAL_SIZE') or os.environ.get('PADDLE_TRAINERS_NUM') or '1'
    return max(1, cores // max(1, int(local) if local.isdigit() else 1))


def set_cpu_threads(threads: Optional[int] = None) -> int:
    """Sets the threads of Paddle's CPU kernels (its OpenMP pool and the BLAS behind conv and
    matmul; Paddle starts with one) for dygraph work in this process; returns the count."""
    from paddle.base import core
    n = int(threads) if threads else default_cpu_threads()
    core.set_num_threads(n)
    return n


class _Capsule:
    """What numpy.from_dlpack takes: paddle's DLPack capsule of a CPU tensor."""

    def __init__(self, tensor: 'paddle.Tensor') -> None:
        self.tensor = tensor

    def __dlpack__(self, stream: object = None) -> object:
        from paddle.utils.dlpack import to_dlpack
        return to_dlpack(self.tensor)

    def __dlpack_device__(self) -> tuple:
        return (1, 0)  # kDLCPU


def cpu_view(tensor: 'paddle.Tensor') -> np.ndarray:
    """A read-only numpy view of a dense CPU tensor's memory, without the copy of
    .numpy() (a copy where numpy has no DLPack import)."""
    if hasattr(np, 'from_dlpack'):
        return np.from_dlpack(_Capsule(tensor))
    return tensor.numpy()


def assign_cpu(tensor: 'paddle.Tensor', values: np.ndarray) -> None:
    """Replaces a CPU tensor's (parameter's, gradient's) values with `values` of its shape
    and dtype, in place and outside autograd, in one copy (no op, no argument checks)."""
    tensor.get_tensor().set(np.require(values, requirements='C'), _CPU)  # a 0-d array stays 0-d


__all__ = ['paddle', 'assign_cpu', 'check_versions', 'cpu_view', 'default_cpu_threads',
           'device_available', 'set_cpu_threads', 'set_device']
