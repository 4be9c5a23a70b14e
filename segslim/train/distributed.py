"""One data-parallel job under `python -m paddle.distributed.launch`: which process this is,
and the few collective steps the loop needs. Paddle's launcher starts the processes and its
communicator (gloo on CPU, NCCL on GPU) moves the data; the sums of a local job (small ones
and each step's gradients) go through shared memory (shared_sum). Nothing here manages
processes.

Outside the launcher (one process) every function is a no-op."""
from typing import Callable, List, Optional, Tuple

import numpy as np

from segslim._paddle import assign_cpu, cpu_view, paddle
from segslim.train.shared_sum import SLOT, local_float32_sum, local_sum

_STATE = {'ready': False}


def world() -> Tuple[int, int]:
    """(rank, number of processes) as the launcher set them; (0, 1) outside it."""
    import paddle.distributed as dist
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Only the first process logs, writes VisualDL and saves checkpoints."""
    return world()[0] == 0


def init() -> int:
    """Joins the launcher's process group (once); returns the number of processes."""
    rank, size = world()
    if size > 1 and not _STATE['ready']:
        paddle.distributed.init_parallel_env()
        _STATE['ready'] = True
    return size


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """The element-wise sum of `values` over every process."""
    rank, size = world()
    if size == 1:
        return values
    shared = local_sum(rank, size)
    if shared is not None and values.size <= SLOT:
        return shared(values)
    tensor = paddle.to_tensor(np.ascontiguousarray(values))
    paddle.distributed.all_reduce(tensor)
    return tensor.numpy().astype(values.dtype)


def data_parallel(model: paddle.nn.Layer, shared_gradients: bool = True
                  ) -> Tuple[paddle.nn.Layer, Callable[[], None], List[paddle.Tensor]]:
    """(the layer a step runs, what to call after each backward, running_stats()) for this
    job: the model, a no-op and [] outside one; in a local job on x86 (with
    `shared_gradients`) the model and gradients_through_shared_memory's averaging; else
    paddle.DataParallel around the model, which averages the gradients itself."""
    if world()[1] == 1:
        return model, _no_op, []
    average = gradients_through_shared_memory(model) if shared_gradients else None
    net = model if average is not None else paddle.DataParallel(model)
    return net, average or _no_op, running_stats(model)


def _no_op() -> None:
    pass


def gradients_through_shared_memory(model: paddle.nn.Layer) -> Optional[Callable[[], None]]:
    """In a local job on x86 (every process agreeing): makes the trainable parameters the
    same on every process (their mean, so identical ones stay as they are) and returns the
    function that, called after each backward, makes every gradient its mean over the
    processes (summed in rank order: the same bits everywhere). None elsewhere:
    paddle.DataParallel then averages the gradients."""
    rank, size = world()
    params = [p for p in model.parameters() if not p.stop_gradient]
    count = sum(int(np.prod(p.shape)) for p in params)
    float32 = params and all(p.dtype == paddle.float32 and p.place.is_cpu_place()
                             for p in params)
    shared = local_float32_sum(rank, size, count) if float32 and size > 1 else None
    if all_reduce_sum(np.array([shared is not None], np.float64))[0] != size:
        return None
    assert shared is not None
    scale = np.float32(1.0 / size)

    def average(tensors: List[paddle.Tensor]) -> None:
        views = [cpu_view(t) for t in tensors]
        mean = shared.sum_parts([v.reshape(-1) for v in views])
        mean *= scale
        _assign_flat(tensors, views, mean)

    average(params)

    def average_gradients() -> None:
        average([p.grad for p in params if p.grad is not None])

    return average_gradients


def _assign_flat(tensors: List[paddle.Tensor], views: List[np.ndarray],
                 flat: np.ndarray) -> None:
    """Gives each CPU tensor its slice of `flat` (their values concatenated in order), in
    the shape and dtype of its view."""
    offset = 0
    for t, v in zip(tensors, views):
        assign_cpu(t, flat[offset:offset + v.size].reshape(v.shape).astype(v.dtype, copy=False))
        offset += v.size


def running_stats(model: paddle.nn.Layer) -> List[paddle.Tensor]:
    """The non-trainable float state: batch-norm statistics and QAT moving-average
    activation scales, which each process updates from its own samples. Paddle keeps them
    as parameters created not trainable; a training forward clears that flag (with
    stop_gradient), so call this before the first step and keep the list."""
    return [t for t in model.state_dict().values()
            if t is not None and not getattr(t, 'trainable', False) and
            t.dtype in (paddle.float32, paddle.float64)]


def average_stats(stats: List[paddle.Tensor]) -> None:
    """Makes every process hold the mean over processes of `stats` (running_stats()), in
    one all-reduce of them all flattened, so batch-norm statistics and activation scales
    stay identical on every rank and in the saved checkpoint (gradients: data_parallel).
    On CPU the values go through numpy (a QAT model has hundreds of these
    small tensors: per-tensor paddle ops cost tens of milliseconds a step)."""
    size = world()[1]
    if size == 1 or not stats:
        return
    if stats[0].place.is_cpu_place():
        views = [cpu_view(t) for t in stats]
        _assign_flat(stats, views, all_reduce_sum(np.concatenate(
            [v.reshape(-1).astype(np.float64) for v in views])) / size)
        return
    flat = paddle.concat([t.astype('float64').reshape([-1]) for t in stats])
    paddle.distributed.all_reduce(flat)
    flat = flat / size
    offset = 0
    for t in stats:
        n = int(np.prod(t.shape)) if t.shape else 1
        t.set_value(flat[offset:offset + n].reshape(t.shape).astype(t.dtype))
        offset += n


def differing_state(model: paddle.nn.Layer) -> List[str]:
    """Names of the weights and buffers that are not the same on every process (a checksum
    of each, compared across processes); empty when all processes hold the same model."""
    state = model.state_dict()
    if world()[1] == 1:
        return []
    sums = np.array([np.abs(v.numpy().astype(np.float64)).sum() + 1e-3 *
                     v.numpy().astype(np.float64).sum() for v in state.values()])
    hi = all_reduce_max(sums)
    lo = -all_reduce_max(-sums)
    return [name for name, a, b in zip(state, lo, hi) if a != b]


def all_reduce_max(values: np.ndarray) -> np.ndarray:
    tensor = paddle.to_tensor(np.ascontiguousarray(values))
    paddle.distributed.all_reduce(tensor, op=paddle.distributed.ReduceOp.MAX)
    return tensor.numpy()
