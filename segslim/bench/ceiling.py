"""What this CPU allows INT8 (and bf16) to gain, per engine: a compute-bound probe of 3x3
convolutions at 256 channels, exported FP32 and INT8 by the project's own export and run
through each engine's own predictor (the same passes, weight rewrites and fallbacks a real
model gets), timed in the same turns as the model rows it is set against (a shared VM's
speed moves over minutes, and INT8 and FP32 are not slowed alike). Its INT8/FP32 ratio is
the most any model can gain on that engine here; a model row's gain over its own FP32 is
reported as a share of it."""
import contextlib
import dataclasses
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from segslim.deploy.bench_report import BenchReport, Ceiling
from segslim.deploy.benchmark import Companion
from segslim.deploy.engines import BACKENDS, create_predictor
from segslim.logger import logger
from segslim.options import EngineOptions

# the probe: a 3->CHANNELS stem, then CONVS CHANNELSxCHANNELS 3x3 convolutions with ReLU, at
# SIDE x SIDE (compute-bound: ~0.9 GMAC per conv)
CHANNELS, SIDE, CONVS = 256, 56, 4


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
    from segslim.quant.qat import DEFAULT_QUANT_CONFIG, calibrate, quantize_model
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
        from segslim.onnx.export import export_onnx
        images = [rng.integers(0, 255, (SIDE, SIDE, 3)).astype(np.uint8) for _ in range(2)]
        export_onnx(dirs['fp32'])
        export_onnx(dirs['int8'], 'onnxruntime', images)
    return dirs


class CeilingProbe:
    """The probe's FP32 and INT8 predictors (and bf16 where `bf16` and the engine has a bf16
    path) on every backend at opts.cpu_threads, made once from exports in `work_dir`. Timed
    as `companions` of a benchmark they share its turns, so the ceiling a model's rows are
    set against was measured in the same minutes."""

    def __init__(self, work_dir: str, backends: Sequence[str], opts: EngineOptions,
                 bf16: bool) -> None:
        self.threads = opts.cpu_threads
        dirs = export_probe(work_dir, 'onnxruntime' in backends)
        batch = np.random.default_rng(1).standard_normal((1, 3, SIDE, SIDE)).astype(np.float32)
        self.engines: Dict[str, Dict[str, Companion]] = {}
        for backend in backends:
            base = dataclasses.replace(opts, backend=backend, input_shape=batch.shape)
            preds = {'fp32': create_predictor(dirs['fp32'],
                                              dataclasses.replace(base, precision='fp32')),
                     # every conv INT8: what this CPU's INT8 kernels allow
                     'int8': create_predictor(dirs['int8'], dataclasses.replace(
                         base, precision='int8', int8_layers='all'))}
            if bf16 and BACKENDS[backend].bf16:
                preds['bf16'] = create_predictor(dirs['fp32'],
                                                 dataclasses.replace(base, precision='bf16'))
            self.engines[backend] = {p: Companion(pred, batch) for p, pred in preds.items()}

    @property
    def companions(self) -> List[Companion]:
        return [c for parts in self.engines.values() for c in parts.values()]

    def ceilings(self) -> Dict[str, Ceiling]:
        """Each engine's Ceiling from the turns its predictors were last timed in."""
        out: Dict[str, Ceiling] = {}
        for backend, parts in self.engines.items():
            int8 = parts['int8'].predictor
            out[backend] = Ceiling.from_turns(
                backend, f'{int8.ops.int8_conv_ops}/{int8.ops.conv_ops} convs INT8',
                parts['fp32'].samples_s, parts['int8'].samples_s if int8.int8_ran else (),
                parts['bf16'].samples_s if 'bf16' in parts else ())
            logger.info('CPU ceiling on %s (%d 3x3 convs, %d channels, %dx%d, %d threads): '
                        'INT8 %s, bf16 %s of FP32 (%s)', BACKENDS[backend].label, CONVS,
                        CHANNELS, SIDE, SIDE, self.threads, _x(out[backend].int8_x),
                        _x(out[backend].bf16_x), out[backend].ran)
        return out


@contextlib.contextmanager
def ceiling_probe(backends: Sequence[str], opts: EngineOptions,
                  bf16: bool) -> Iterator[CeilingProbe]:
    """A CeilingProbe whose exports live in a temporary folder while it is used."""
    with tempfile.TemporaryDirectory(prefix='segslim-ceiling-') as work:
        yield CeilingProbe(work, backends, opts, bf16)


def apply_ceilings(report: BenchReport, ceilings: Dict[str, Ceiling]) -> None:
    """The probe per engine into the report: every INT8 row's gain over its engine's FP32 as
    a share of that engine's INT8 ceiling."""
    report.ceiling = ceilings
    for row in report.rows:
        probe = ceilings.get(row.backend)
        if row.speedup_vs_engine_fp32 and probe is not None and probe.int8_x:
            row.of_ceiling = row.speedup_vs_engine_fp32 / probe.int8_x


def _x(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}x'
