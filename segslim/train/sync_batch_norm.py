"""Batch norm whose batch statistics span every process of a data-parallel job on CPU.

Paddle's SyncBatchNorm has GPU kernels only; on CPU (gloo) each process would normalise with
the statistics of its own share of the batch. This layer computes the mean and variance of
the whole step's batch with one all-reduce of per-channel sums in the forward and one of
the gradient sums in the backward, so N processes with B images each train what one process with
N x B images trains (up to the order of float sums). Outside a job (one process) it is
exactly paddle's batch norm.

Every per-channel scale and shift runs in paddle's fused batch-norm kernel (channel_affine)
and every reduction in numpy: paddle's sums over several axes are several times slower on
CPU, and each layer runs these once per step."""
from typing import Any, Optional, Tuple

import numpy as np

from segslim._paddle import assign_cpu, cpu_view, paddle
from segslim.train import channel_affine, distributed

F = paddle.nn.functional


def _all_reduce(values: np.ndarray) -> np.ndarray:
    return distributed.all_reduce_sum(values)


def _tensor(values: np.ndarray) -> paddle.Tensor:
    """A new float32 CPU tensor of `values` (without to_tensor's argument checks)."""
    return paddle.Tensor(np.ascontiguousarray(values, np.float32))


def _assign(tensor: paddle.Tensor, values: np.ndarray) -> None:
    assign_cpu(tensor, values.astype(np.float32))


def _affine(t: paddle.Tensor, scale: np.ndarray, shift: Optional[np.ndarray] = None
            ) -> paddle.Tensor:
    return channel_affine.affine(t, _tensor(scale), None if shift is None else _tensor(shift))


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
    """y = weight * x_hat + bias, x_hat = (x - mean) / sqrt(var + eps), with the statistics
    of every process (global_stats); the backward sums its two reductions over every
    process."""

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor,
                mean: np.ndarray, var: np.ndarray, epsilon: float, count: float
                ) -> paddle.Tensor:
        stats = (_tensor(mean), _tensor(var))
        ctx.save_for_backward(x)
        ctx.stats = (stats, epsilon, weight.numpy().astype(np.float64) / np.sqrt(var + epsilon),
                     count)
        return F.batch_norm(x, *stats, weight, bias, training=False, epsilon=epsilon)

    @staticmethod
    def backward(ctx: Any, dy: paddle.Tensor) -> Tuple[paddle.Tensor, ...]:
        x, = ctx.saved_tensor()
        (mean, var), epsilon, scale, count = ctx.stats
        channels = x.shape[1]
        x_hat = F.batch_norm(x, mean, var, channel_affine.constant(1.0, channels),
                             channel_affine.constant(0.0, channels), training=False,
                             epsilon=epsilon)  # as the forward computed it
        shape = (x.shape[0], channels, -1)
        dy_np, x_hat_np = cpu_view(dy).reshape(shape), cpu_view(x_hat).reshape(shape)
        d_bias = np.einsum('nci->c', dy_np)
        d_weight = np.einsum('nci,nci->c', dy_np, x_hat_np)
        # the parameter gradients are averaged after the backward; the input gradient needs the sums
        # of every process, since each process's mean and variance came from all of them
        total = _all_reduce(np.concatenate([d_bias, d_weight]).astype(np.float64)) / count
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over every process
        dx = (_affine(dy, scale, -scale * total[:channels]) +
              _affine(x_hat, -scale * total[channels:]))
        return dx, _tensor(d_weight), _tensor(d_bias)


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
            _assign(self._mean, self._mean.numpy() * m + mean * (1.0 - m))
            _assign(self._variance, self._variance.numpy() * m + var * (1.0 - m))
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, var, self._epsilon,
                                      count)


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
