"""QAT's output-scale observers on CPU without their copy of every activation.

PaddleSlim's QAT puts a MovingAverageAbsMaxScale after every quantized layer. It only
records the moving average of the output's absolute maximum (the layer's out_threshold in
the exported model), yet paddle's op returns a copy of the output and adds a backward node
that copies the gradient back: per layer about 120 us of a 230 us forward and backward at
2x64x32x32 on CPU. `observers_without_copies` computes the same statistics in numpy and
passes the output through untouched."""
import contextlib
from typing import Iterator

import numpy as np

from segslim._paddle import assign_cpu, cpu_view, paddle


def observe(layer: 'paddle.nn.Layer', x: paddle.Tensor) -> paddle.Tensor:
    """MovingAverageAbsMaxScale.forward on CPU in dygraph: in training the observer's state,
    accum and scale become paddle's moving average with x's absolute maximum (the same
    float32 arithmetic: state = rate * state + 1, accum = rate * accum + max|x|, scale =
    accum / state); x itself is returned in training and evaluation alike."""
    if layer.training:
        values = cpu_view(x)
        current = np.float32(max(values.max(), -values.min())) if values.size else \
            np.float32(0.0)
        rate = np.float32(layer._moving_rate)
        state = layer._state.numpy() * rate + np.float32(1.0)
        accum = layer._accum.numpy() * rate + current
        assign_cpu(layer._state, state)
        assign_cpu(layer._accum, accum)
        assign_cpu(layer._scale, (accum / state).astype(np.float32))
    return x


@contextlib.contextmanager
def observers_without_copies() -> Iterator[None]:
    """Within it, every MovingAverageAbsMaxScale on CPU in dygraph (without a cross-process
    reduce of its scale) runs `observe` instead of paddle's op."""
    from paddle.nn.quant.quant_layers import MovingAverageAbsMaxScale
    original = MovingAverageAbsMaxScale.forward

    def forward(self: 'paddle.nn.Layer', input: paddle.Tensor) -> paddle.Tensor:
        if (paddle.in_dynamic_mode() and self._reduce_type is None and
                input.place.is_cpu_place() and input.dtype == paddle.float32):
            return observe(self, input)
        return original(self, input)

    MovingAverageAbsMaxScale.forward = forward
    try:
        yield
    finally:
        MovingAverageAbsMaxScale.forward = original
