"""What this CPU allows INT8 (and bf16) to gain, per engine: a compute-bound probe of 3x3
convolutions at 256 channels, exported FP32 and INT8 by the project's own export and run
through each engine's own predictor (the same passes, weight rewrites and fallbacks a real
model gets), timed interleaved. Its INT8/FP32 ratio is the most any model can gain on that
engine here; a model row's gain over its own FP32 is reported as a share of it."""
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from segslim.logger import logger
from segslim.options import EngineOptions

# the probe: a 3->CHANNELS stem, then CONVS CHANNELSxCHANNELS 3x3 convolutions with ReLU, at
# SIDE x SIDE (compute-bound: ~0.9 GMAC per conv)
CHANNELS, SIDE, CONVS = 256, 56, 4


@dataclass(frozen=True)
class Ceiling:
    """One engine's probe: seconds per run in FP32, INT8 (None: the engine ran no conv
    INT8) and bf16 (None: not run), and what ran (convs INT8 over convs)."""
    backend: str
    fp32_s: float
    int8_s: Optional[float]
    bf16_s: Optional[float]
    ran: str

    @property
    def int8_x(self) -> Optional[float]:
        return self.fp32_s / self.int8_s if self.int8_s else None

    @property
    def bf16_x(self) -> Optional[float]:
        return self.fp32_s / self.bf16_s if self.bf16_s else None

    def to_json(self) -> Dict[str, object]:
        return {'int8_x': self.int8_x, 'bf16_x': self.bf16_x, 'fp32_s': self.fp32_s,
                'int8_s': self.int8_s, 'bf16_s': self.bf16_s, 'ran': self.ran}


def int8_vs_best_unquantized(ceilings: Dict[str, Ceiling]) -> Optional[float]:
    """The probe's fastest unquantized time (FP32 or bf16, any engine) over its fastest INT8
    time (any engine): the most a model's best INT8 row can gain over its best unquantized
    row on this CPU."""
    int8 = [c.int8_s for c in ceilings.values() if c.int8_s]
    if not int8:
        return None
    unquantized = [t for c in ceilings.values() for t in (c.fp32_s, c.bf16_s) if t]
    return min(unquantized) / min(int8)


def _probe_model() -> Any:
    from segslim._paddle import paddle
    nn = paddle.nn

    class ConvProbe(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            layers: List[Any] = [nn.Conv2D(3, CHANNELS, 3, padding=1), nn.ReLU()]
            for _ in range(CONVS):
                layers += [nn.Conv2D(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU()]
            self.body = nn.Sequential(*layers)

        def forward(self, x: Any) -> List[Any]:
            return [self.body(x)]
    return ConvProbe()


def export_probe(work_dir: str, onnx: bool) -> Dict[str, str]:
    """FP32 and INT8 model folders of the probe (with model.onnx when `onnx`)."""
    from segslim._paddle import paddle
    from segslim.export import export_inference_model
    from segslim.quant import DEFAULT_QUANT_CONFIG, calibrate, quantize_model
    shape = (1, 3, SIDE, SIDE)
    cfg = {'val_dataset': {'transforms': [{'type': 'Normalize'}]}}
    dirs = {'fp32': os.path.join(work_dir, 'fp32'), 'int8': os.path.join(work_dir, 'int8')}
    rng = np.random.default_rng(0)
    with paddle.utils.unique_name.guard():
        paddle.seed(0)
        model = _probe_model()
        model.eval()
        export_inference_model(model, cfg, dirs['fp32'], output_op='none', input_shape=shape)
        qcfg = dict(DEFAULT_QUANT_CONFIG)
        quanter = quantize_model(model, qcfg, summary=False)
        calibrate(model, [rng.standard_normal(shape).astype(np.float32) for _ in range(2)])
        export_inference_model(model, cfg, dirs['int8'], output_op='none', input_shape=shape,
                               quanter=quanter, int8_ops=qcfg['int8_ops'])
    if onnx:
        from segslim.onnx_export import export_onnx
        images = [rng.integers(0, 255, (SIDE, SIDE, 3)).astype(np.uint8) for _ in range(2)]
        export_onnx(dirs['fp32'])
        export_onnx(dirs['int8'], 'onnxruntime', images)
    return dirs


def measure_ceilings(backends: Sequence[str], opts: EngineOptions, bf16: bool,
                     repeats: int = 10) -> Dict[str, Ceiling]:
    """The probe on every backend at opts.cpu_threads: FP32 vs INT8 (and bf16 where `bf16`
    and the engine has a bf16 path), interleaved medians."""
    from segslim.deploy.benchmark import time_interleaved
    from segslim.deploy.engines import BACKENDS, create_predictor
    out: Dict[str, Ceiling] = {}
    with tempfile.TemporaryDirectory(prefix='segslim-ceiling-') as work:
        dirs = export_probe(work, 'onnxruntime' in backends)
        batch = np.random.default_rng(1).standard_normal((1, 3, SIDE, SIDE)).astype(np.float32)
        for backend in backends:
            base = dataclasses.replace(opts, backend=backend, input_shape=batch.shape)
            preds = [create_predictor(dirs['fp32'], dataclasses.replace(base, precision='fp32')),
                     create_predictor(dirs['int8'], dataclasses.replace(base, precision='int8'))]
            with_bf16 = bf16 and BACKENDS[backend].bf16
            if with_bf16:
                preds.append(create_predictor(dirs['fp32'],
                                              dataclasses.replace(base, precision='bf16')))
            times = [float(np.median(t)) for t in time_interleaved(preds, batch, 2, repeats)]
            int8 = preds[1]
            ran = f'{int8.ops.int8_conv_ops}/{int8.ops.conv_ops} convs INT8'
            out[backend] = Ceiling(backend, times[0], times[1] if int8.int8_ran else None,
                                   times[2] if with_bf16 else None, ran)
            logger.info('CPU ceiling on %s (%d 3x3 convs, %d channels, %dx%d, %d threads): '
                        'INT8 %s, bf16 %s of FP32 (%s)', BACKENDS[backend].label, CONVS,
                        CHANNELS, SIDE, SIDE, opts.cpu_threads, _x(out[backend].int8_x),
                        _x(out[backend].bf16_x), ran)
    return out


def _x(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}x'
