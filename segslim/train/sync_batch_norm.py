"""Batch norm whose batch statistics span every process of a data-parallel job on CPU.

Paddle's SyncBatchNorm has GPU kernels only; on CPU (gloo) each process would normalise with
the statistics of its own share of the batch. This layer computes the mean and variance of
the whole step's batch with one all-reduce of per-channel sums in the forward and one of
the gradient sums in the backward, so N processes with B images each train what one process with
N x B images trains (up to the order of float sums). Outside a job (one process) it is
exactly paddle's batch norm."""
from typing import Any, Dict, Optional, Tuple

import numpy as np

from segslim._paddle import paddle
from segslim.train import distributed

F = paddle.nn.functional
_AXES = [0, 2, 3]  # NCHW: statistics per channel over batch, height and width


def _all_reduce(values: np.ndarray) -> np.ndarray:
    return distributed.all_reduce_sum(values)


def _affine(t: paddle.Tensor, scale: np.ndarray, shift: Optional[np.ndarray] = None,
            mean: Optional[np.ndarray] = None, inv_std: Optional[np.ndarray] = None
            ) -> paddle.Tensor:
    """(t - mean) * inv_std * scale + shift per channel, in paddle's fused batch-norm kernel
    (its broadcasting element-wise kernels are 30-50x slower on CPU)."""
    a = scale if inv_std is None else scale * inv_std
    b = (np.zeros_like(a) if shift is None else shift) - (0.0 if mean is None else mean * a)
    pair = paddle.to_tensor(np.stack([a, b]).astype(np.float32))
    return F.batch_norm(t, _constant(0.0, a.size), _constant(1.0, a.size), pair[0], pair[1],
                        training=False, epsilon=0.0)


_CONSTANTS: Dict[Tuple[float, int], paddle.Tensor] = {}


def _constant(value: float, channels: int) -> paddle.Tensor:
    key = (value, channels)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = paddle.full([channels], value, 'float32')
    return _CONSTANTS[key]


def global_stats(x: paddle.Tensor) -> Tuple[np.ndarray, np.ndarray, float]:
    """(mean, biased variance, count) per channel of x over every process, in float64:
    Chan's parallel variance from each process's count, sum and M2 + n * mean^2 (one
    all-reduce), the local statistics from paddle's own batch-norm kernel."""
    n = float(x.shape[0] * x.shape[2] * x.shape[3])
    channels = x.shape[1]
    local_mean, local_var = paddle.zeros([channels]), paddle.ones([channels])
    F.batch_norm(x, local_mean, local_var, training=True, momentum=0.0)  # sets them
    mean64 = local_mean.numpy().astype(np.float64)
    m2 = local_var.numpy().astype(np.float64) * n
    sums = _all_reduce(np.concatenate([mean64 * n, m2 + n * mean64 ** 2, [n]]))
    count = float(sums[-1])
    mean = sums[:channels] / count
    return mean, np.maximum(sums[channels:2 * channels] / count - mean ** 2, 0.0), count


class _GlobalBatchNorm(paddle.autograd.PyLayer):
    """y = weight * (x - mean) / sqrt(var + eps) + bias with the statistics of every
    process (global_stats); the backward sums its two reductions over every process."""

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor,
                mean: np.ndarray, inv_std: np.ndarray, count: float) -> paddle.Tensor:
        w = weight.numpy().astype(np.float64)
        ctx.save_for_backward(x)
        ctx.stats = (w, mean, inv_std, count)
        return _affine(x, w, bias.numpy().astype(np.float64), mean, inv_std)

    @staticmethod
    def backward(ctx: Any, dy: paddle.Tensor) -> Tuple[paddle.Tensor, ...]:
        x, = ctx.saved_tensor()
        w, mean, inv_std, count = ctx.stats
        x_hat = _affine(x, np.ones_like(w), mean=mean, inv_std=inv_std)
        axes = tuple(_AXES)  # numpy reduces over them 2x faster than paddle here
        d_bias = dy.numpy().sum(axis=axes, dtype=np.float64)
        d_weight = (dy * x_hat).numpy().sum(axis=axes, dtype=np.float64)
        # DataParallel averages the parameter gradients; the input gradient needs the sums
        # of every process, since each process's mean and variance came from all of them
        total = _all_reduce(np.concatenate([d_bias, d_weight]))
        channels = w.size
        scale = w * inv_std
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over every process
        dx = (_affine(dy, scale, -scale * total[:channels] / count) -
              _affine(x_hat, scale * total[channels:] / count))
        grads = paddle.to_tensor(np.stack([d_weight, d_bias]).astype(np.float32))
        return dx, grads[0], grads[1]


class CpuSyncBatchNorm(paddle.nn.BatchNorm2D):
    """BatchNorm2D with statistics over the whole data-parallel batch while training;
    evaluation uses the running statistics, as any batch norm."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if (not self.training or self._use_global_stats or distributed.world()[1] == 1 or
                len(x.shape) != 4):
            return super().forward(x)
        with paddle.no_grad():
            mean, var, count = global_stats(x)
            # paddle's update: the biased batch variance, momentum on the old value
            m = self._momentum
            self._mean.set_value((self._mean.numpy() * m + mean * (1.0 - m)).astype(np.float32))
            self._variance.set_value(
                (self._variance.numpy() * m + var * (1.0 - m)).astype(np.float32))
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean,
                                      1.0 / np.sqrt(var + self._epsilon), count)


def convert_cpu_sync_batch_norm(layer: paddle.nn.Layer) -> paddle.nn.Layer:
    """Every NCHW batch norm of `layer` (in place, sharing its weights and statistics)
    becomes a CpuSyncBatchNorm; returns `layer`, or the converted layer when it is one."""
    if _convertible(layer):
        return _converted(layer)
    for name, child in layer.named_children():
        setattr(layer, name, convert_cpu_sync_batch_norm(child))
    return layer


def _convertible(layer: paddle.nn.Layer) -> bool:
    return (isinstance(layer, paddle.nn.layer.norm._BatchNormBase) and
            not isinstance(layer, CpuSyncBatchNorm) and
            getattr(layer, '_data_format', 'NCHW') == 'NCHW' and
            getattr(layer, 'weight', None) is not None and
            getattr(layer, 'bias', None) is not None)


def _converted(layer: paddle.nn.Layer) -> CpuSyncBatchNorm:
    new = CpuSyncBatchNorm.__new__(CpuSyncBatchNorm)
    new.__dict__.update(layer.__dict__)  # same parameters, buffers, momentum and epsilon
    return new
