"""OpenVINO predictors for exported models: the engine interface of
segslim.deploy.engine (run, to_labels, labels, precision, engine op summary), CPU only.

OpenVINO reads the Paddle inference program directly; a QAT export's quantize/dequantize
pairs become FakeQuantize ops, and what runs INT8 is read back from the compiled model's
runtime graph, never assumed. It also reads the OpenVINO IR folders that ptq.py --quantizer
nncf writes (model.xml/model.bin), FakeQuantize ops as NNCF placed them."""
import collections
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from segslim.deploy.cpu import cpu_features
from segslim.deploy.engine import SEVEN_BIT_NOTE, EngineBase, median_per_key
from segslim.deploy.openvino_graph import (
    drop_observer_quantization,
    hoist_quantization,
    hoistable_splits,
    quantized_kinds,
    seven_bit_weights,
    share_quantized_inputs,
    shareable_pools,
    with_float_kinds,
)
from segslim.deploy.openvino_head import planar_channel_topk
from segslim.deploy.results import OpSummary, Precision
from segslim.errors import UserError, require
from segslim.options import EngineOptions
from segslim.program import strip_observer_quantization

# OpenVINO CPU runtime layer types counted as quantizable work (oneDNN's conv/matmul kinds).
CONV_LAYERS = ('Convolution', 'GroupConvolution', 'Deconvolution')
MATMUL_LAYERS = ('FullyConnected', 'MatMul')
INT8_PRECISIONS = ('i8', 'u8')
# Compiled models kept per input shape (OpenVINO compiles static shapes fastest).
SHAPE_CACHE = 4


def import_openvino() -> Any:
    return require('openvino', '--backend openvino', 'openvino', '--backend paddle')


def runtime_summary(runtime_model: Any) -> OpSummary:
    """What a compiled model executes in INT8, from its runtime graph (layerType,
    runtimePrecision, the data input's type), counted as op_summary() counts the oneDNN
    program. A layer runs INT8 when its runtime precision is INT8 and it reads INT8 data: a
    FullyConnected whose weights stay INT8 but whose input is float (the plugin's weight
    decompression, a brgemm f32 kernel) runs in float."""
    ops = []
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        int8 = info['runtimePrecision'].astype(str).lower() in INT8_PRECISIONS and (
            op.get_input_size() == 0 or
            op.input(0).get_element_type().get_type_name() in INT8_PRECISIONS)
        ops.append((info['layerType'].astype(str), int8,
                    info['originalLayersNames'].astype(str).split(',')[0] or
                    op.get_friendly_name()))
    return OpSummary.count(ops, CONV_LAYERS, MATMUL_LAYERS)


def check_openvino_options(opts: EngineOptions, bf16_capable: bool) -> None:
    """Refuses what the OpenVINO CPU backend would run as something else."""
    if opts.device != 'cpu' or opts.use_trt:
        raise UserError('--backend openvino runs on CPU only; add --device cpu and drop '
                        '--use_trt, or use --backend paddle')
    if opts.precision == 'fp16':
        raise UserError('--precision fp16 is not a CPU precision; use fp32, bf16 or int8')
    if opts.precision == 'bf16' and not bf16_capable:
        raise UserError('--precision bf16: this CPU has no bf16 support in OpenVINO; use fp32')


class OpenVINOPredictor(EngineBase):
    """One OpenVINO CPU predictor for an exported model folder.

    FP32 models run with INFERENCE_PRECISION_HINT f32 (OpenVINO would otherwise run them in
    bf16 on bf16-capable CPUs) or bf16 when asked; a quantized model runs its FakeQuantize'd
    ops in INT8 and the rest in f32, or in bf16 (`rest`) with --precision bf16 or, on a bf16
    CPU, when its deploy.yaml says `rest: bf16` (auto-quant's choice was measured so). `engine` is
    the runtime op summary of the last compiled shape. On CPUs without VNNI the INT8 weights
    run in 7 bits (seven_bit_weights; `seven_bit` says how many ops, `fallback` says so).
    """
    backend = 'openvino'
    package = 'openvino'

    def __init__(self, model_dir: str, opts: EngineOptions):
        self.ov = import_openvino()
        self.core = self.ov.Core()
        caps = self.core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
        check_openvino_options(opts, 'BF16' in caps)
        super().__init__(model_dir, opts)
        keep_all = os.environ.get('SEGSLIM_OV_KEEP_ALL_FQ') is not None
        with tempfile.TemporaryDirectory(prefix='segslim-ov-') as tmp:
            program = self.deploy['model']
            self.stripped = 0
            # An IR model's FakeQuantize placement is its quantizer's (NNCF's) choice: kept;
            # so is a peer quantizer's.
            keep_all = keep_all or self.format == 'openvino' or self.peer is not None
            if self.quantized and not keep_all:
                program = os.path.join(tmp, 'model.pdmodel')
                self.stripped = strip_observer_quantization(self.deploy['model'], program)
            try:
                self.model = self.core.read_model(program, self.deploy['params'])
            except Exception as e:  # the converter reports failures as generic errors
                text = str(e).strip()
                raise UserError('OpenVINO cannot read {} ({}); use --backend paddle'.format(
                    self.deploy['model'], text.splitlines()[-1][:160] if text else
                    type(e).__name__)) from e
        self.rewrite = self.quantized and not keep_all
        self.dropped = drop_observer_quantization(self.model) if self.rewrite else []
        self.shared = self.hoisted = 0
        self.planar_topk = planar_channel_topk(self.model, cpu_features()['simd_floats'])
        self.seven_bit = 0
        if self.quantized and not cpu_features()['vnni'] and self.peer is None:
            self.seven_bit = seven_bit_weights(self.model)
            if self.seven_bit:
                self.fallback = SEVEN_BIT_NOTE
        self.precision = Precision.INT8 if self.quantized else (
            Precision.BF16 if opts.precision == 'bf16' else Precision.FP32)
        if self.quantized and (opts.precision == 'bf16' or (
                self.deploy.get('rest') == 'bf16' and cpu_features()['bf16'])):
            self.rest = 'bf16'  # INT8 where quantized, every other op in bf16
        self.properties = {
            'INFERENCE_PRECISION_HINT': 'bf16' if opts.precision == 'bf16' or self.rest
            else 'f32',
            'INFERENCE_NUM_THREADS': int(opts.cpu_threads),
            'PERFORMANCE_HINT': 'LATENCY', 'NUM_STREAMS': 1}
        if self.quantized:
            self._choose_kinds()
        self._compiled: collections.OrderedDict[Tuple[int, ...], Any] = \
            collections.OrderedDict()
        self.run(np.zeros(self.probe_shape(), np.float32))
        if self.quantized and not self.ops.int8_ops:
            self.ran_no_int8()

    def _choose_kinds(self) -> None:
        """Leaves in float the kinds of layer INT8 does not speed up here (int8_kinds),
        timed at the probe shape, and keeps that variant as the model; `pool` is there when
        pools would read a conv's INT8 input (share_quantized_inputs), `shuffle` when a
        channel shuffle would run on INT8 (hoist_quantization with `splits`)."""
        def build(kinds: Any, images: np.ndarray) -> Any:
            model = self._variant(kinds)
            model.reshape({model.inputs[0].get_any_name(): list(images.shape)})
            request = self.core.compile_model(model, 'CPU', self.properties) \
                .create_infer_request()
            return lambda: request.infer({0: images})
        present = {kind for _, kind in quantized_kinds(self.model)}
        if self.rewrite and shareable_pools(self.model):
            present.add('pool')
        if self.rewrite and hoistable_splits(self.model):
            present.add('shuffle')
        chosen = self.choose_kinds(present, build)
        self.model = self._variant(chosen.float_kinds)

    def _variant(self, kinds: Any) -> Any:
        """A copy of the model with the layers of `kinds` in float; in our own quantized
        models each quantized tensor is then shared with the other ops that read it and its
        quantization moved up to the op that produces it (share_quantized_inputs,
        hoist_quantization), so that op writes INT8 (pools only unless `pool` is in `kinds`,
        and through the channel shuffles unless `shuffle` is). `shared` and `hoisted` count
        them."""
        model = with_float_kinds(self.model, kinds)
        if self.rewrite:
            self.shared = share_quantized_inputs(model, pools='pool' not in kinds)
            self.hoisted = hoist_quantization(model, splits='shuffle' not in kinds)
        return model

    def _request(self, shape: Tuple[int, ...]) -> Any:
        """An infer request of the model compiled for this static input shape."""
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        model = self.model.clone()
        model.reshape({model.inputs[0].get_any_name(): list(shape)})
        try:
            compiled = self.core.compile_model(model, 'CPU', self.properties)
        except Exception as e:
            raise UserError('OpenVINO cannot compile {} for input {} ({}); use --backend '
                            'paddle'.format(self.model_dir, 'x'.join(map(str, shape)),
                                            str(e).strip().splitlines()[-1][:160])) from e
        self.ops = runtime_summary(compiled.get_runtime_model())
        self._compiled[shape] = compiled.create_infer_request()
        if len(self._compiled) > SHAPE_CACHE:
            self._compiled.popitem(last=False)
        return self._compiled[shape]

    def node_times(self, images: np.ndarray, runs: int,
                   between: Optional[Callable[[], None]] = None
                   ) -> Dict[Tuple[str, str], float]:
        """ms per run of `images` in each (layer type, implementation) of the compiled model,
        the median over `runs` (median_per_key), from the plugin's own per-node counters: the
        model compiled again with PERF_COUNT on (the counters cost time of their own, so the
        rows are timed without them); `between` is called before each profiled run."""
        model = self.model.clone()
        model.reshape({model.inputs[0].get_any_name(): list(images.shape)})
        request = self.core.compile_model(model, 'CPU', dict(self.properties, PERF_COUNT=True)) \
            .create_infer_request()
        data = {0: np.ascontiguousarray(images, dtype=np.float32)}
        request.infer(data)
        per_run = []
        for _ in range(runs):
            if between is not None:
                between()
            request.infer(data)
            totals: Dict[Tuple[str, str], float] = collections.defaultdict(float)
            for node in request.get_profiling_info():
                totals[(node.node_type, node.exec_type)] += node.real_time.total_seconds() * 1000
            per_run.append(totals)
        return median_per_key(per_run)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Runs a N,C,H,W float32 batch; returns the first output."""
        request = self._request(tuple(int(v) for v in images.shape))
        request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return request.get_output_tensor(0).data.copy()
