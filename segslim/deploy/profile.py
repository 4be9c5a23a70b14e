"""Where an engine's time goes, summed per kind of layer ('convolution int8', 'resampling',
'reorder', ...), and what that allows INT8 to gain.

Paddle Inference: oneDNN's own verbose log and the remainder, which runs in Paddle's native
CPU kernels (bilinear resize, arg_max, ...). The engine runs in a child process that times
it with logging off, then turns oneDNN's verbose mode on (dnnl_set_verbose) for the same
number of runs; oneDNN times each primitive itself, so the log's cost stays out of the
numbers. OpenVINO: the plugin's per-node counters (PERF_COUNT), on a second compilation of
the model as it is timed; onnxruntime: its own profile of each node, in a second session of
the model as it is timed; for both the remainder is the runtime's own time between nodes."""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from segslim.deploy.onednn import flush_all, onednn, parse_verbose
from segslim.deploy.onnxruntime_engine import CONV_KINDS, INT8_KINDS, MATMUL_KINDS
from segslim.deploy.results import BenchRow

# Kinds of layer INT8 speeds up: the ceiling probe's convolutions and matrix products.
COMPUTE_KINDS = ('convolution', 'deconvolution', 'matmul', 'inner_product')
# OpenVINO CPU layer types by the kind oneDNN's verbose log would give them.
OPENVINO_KINDS = {
    'Convolution': 'convolution', 'GroupConvolution': 'convolution',
    'Deconvolution': 'deconvolution', 'FullyConnected': 'matmul',
    'FullyConnectedQuantizedLegacy': 'matmul', 'FullyConnectedQuantized': 'matmul',
    'MatMul': 'matmul', 'Interpolate': 'resampling', 'Reorder': 'reorder',
    'Subgraph': 'eltwise', 'Eltwise': 'eltwise', 'Add': 'eltwise', 'Multiply': 'eltwise',
    'MVN': 'normalization', 'Softmax': 'softmax', 'MaxPool': 'pooling', 'AvgPool': 'pooling',
    'AdaptiveAvgPool': 'pooling', 'AdaptiveMaxPool': 'pooling', 'ReduceMean': 'reduction',
    'ReduceMax': 'reduction', 'ReduceSum': 'reduction', 'TopK': 'argmax',
    'FakeQuantize': 'quantize',
    'Concatenation': 'concat', 'Concat': 'concat', 'Split': 'layout', 'Transpose': 'layout',
    'Reshape': 'layout', 'Gather': 'layout', 'StridedSlice': 'layout',
    'ShuffleChannels': 'layout', 'DepthToSpace': 'layout', 'SpaceToDepth': 'layout'}
# onnxruntime CPU op types (after its graph optimizations) by oneDNN's kinds, besides the
# engine's conv and matmul types (onnxruntime_engine.CONV_KINDS, MATMUL_KINDS, INT8_KINDS).
ONNXRUNTIME_KINDS = {
    'Resize': 'resampling', 'Upsample': 'resampling',
    'ReorderInput': 'reorder', 'ReorderOutput': 'reorder',
    'QuantizeLinear': 'quantize', 'DequantizeLinear': 'quantize',
    'DynamicQuantizeLinear': 'quantize',
    'Softmax': 'softmax', 'QLinearSoftmax': 'softmax',
    'LayerNormalization': 'layer_normalization', 'SimplifiedLayerNormalization':
    'layer_normalization', 'SkipLayerNormalization': 'layer_normalization',
    'BatchNormalization': 'batch_normalization', 'InstanceNormalization': 'normalization',
    'MaxPool': 'pooling', 'NhwcMaxPool': 'pooling', 'AveragePool': 'pooling',
    'GlobalAveragePool': 'pooling', 'GlobalMaxPool': 'pooling',
    'QLinearAveragePool': 'pooling', 'QLinearGlobalAveragePool': 'pooling',
    'ArgMax': 'argmax', 'TopK': 'argmax', 'Concat': 'concat', 'QLinearConcat': 'concat',
    'Transpose': 'layout', 'Reshape': 'layout', 'Split': 'layout', 'Slice': 'layout',
    'Gather': 'layout', 'Squeeze': 'layout', 'Unsqueeze': 'layout', 'Flatten': 'layout',
    'Expand': 'layout', 'DepthToSpace': 'layout', 'SpaceToDepth': 'layout',
    'ReduceMean': 'reduction', 'ReduceMax': 'reduction', 'ReduceSum': 'reduction'}
# What the gain table groups the kinds into (compute kinds by the data they read).
TIME_GROUPS = ('INT8 convs, matmuls', 'float convs, matmuls', 'resize',
               'elementwise, softmax, norms', 'concat, split, transpose, reorder', 'other')
KIND_GROUPS = {'resampling': 'resize', 'eltwise': 'elementwise, softmax, norms',
               'binary': 'elementwise, softmax, norms', 'softmax': 'elementwise, softmax, norms',
               'normalization': 'elementwise, softmax, norms',
               'layer_normalization': 'elementwise, softmax, norms',
               'batch_normalization': 'elementwise, softmax, norms',
               'quantize': 'elementwise, softmax, norms', 'sum': 'elementwise, softmax, norms',
               'reorder': 'concat, split, transpose, reorder',
               'concat': 'concat, split, transpose, reorder',
               'layout': 'concat, split, transpose, reorder',
               'shuffle': 'concat, split, transpose, reorder'}
REMAINDER = {'paddle': 'Paddle native kernels (resize, arg_max, ...) and overhead',
             'openvino': 'runtime between its nodes',
             'onnxruntime': 'runtime between its nodes'}

START = 'SEGSLIM-PROFILE-START'
END = 'SEGSLIM-PROFILE-END'


def profile_engine(model_dir: str, precision: str, threads: int, shape: Sequence[int],
                   runs: int = 10) -> Dict[str, Any]:
    """{'wall_ms', 'by_kind': {kind: ms}, 'native_ms'} per run of the model's engine (wall:
    the median of `runs`; oneDNN's primitive times: their mean over `runs` more)."""
    env = {k: v for k, v in os.environ.items() if k not in ('ONEDNN_VERBOSE', 'DNNL_VERBOSE')}
    code = ('import sys, json; from segslim.deploy.profile import _child; '
            '_child(*json.loads(sys.argv[1]))')
    args = json.dumps([os.path.abspath(model_dir), precision, threads, list(shape), runs])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, '-c', code, args], capture_output=True, text=True,
                          env=env, cwd=root)
    lines = proc.stdout.splitlines()
    if END not in lines:
        raise RuntimeError('profiling {} failed: {}'.format(
            model_dir, (proc.stderr.strip().splitlines() or ['no output'])[-1]))
    window = lines[lines.index(START) + 1:lines.index(END)]
    wall_ms = float(lines[lines.index(END) + 1])
    by_kind = {k: v / runs for k, v in parse_verbose(window).items()}
    native = max(wall_ms - sum(by_kind.values()), 0.0)
    # on small models oneDNN's timing of its own primitives can add up to more than the
    # quiet wall time: shares are then taken of that sum
    return {'wall_ms': wall_ms, 'by_kind': by_kind, 'native_ms': native,
            'total_ms': max(wall_ms, sum(by_kind.values()) + native), 'engine': 'paddle'}


def openvino_kind(layer_type: str, implementation: str) -> str:
    """The kind of an OpenVINO CPU node, compute kinds split by the data they read as
    parse_verbose splits oneDNN's ('convolution int8', 'matmul bf16', ...)."""
    kind = OPENVINO_KINDS.get(layer_type, layer_type.lower())
    if kind in COMPUTE_KINDS:
        dtype = implementation.rsplit('_', 1)[-1].lower()
        kind += ' ' + ('int8' if dtype in ('i8', 'u8') else dtype)
    return kind


def onnxruntime_kind(op_type: str) -> str:
    """The kind of an onnxruntime CPU op as openvino_kind gives an OpenVINO node's (the op
    type says the data a conv or matmul reads: QLinearConv uint8, FusedConv float)."""
    if op_type in CONV_KINDS or op_type in MATMUL_KINDS:
        kind = 'matmul' if op_type in MATMUL_KINDS else \
            'deconvolution' if op_type == 'ConvTranspose' else 'convolution'
        return kind + (' int8' if op_type in INT8_KINDS else ' f32')
    return ONNXRUNTIME_KINDS.get(op_type, 'eltwise' if op_type.startswith('QLinear') else
                                 op_type.lower())


def profile_openvino(model_dir: str, precision: str, threads: int, shape: Sequence[int],
                     runs: int = 10) -> Dict[str, Any]:
    """profile_engine's answer for the OpenVINO predictor of `model_dir` in `precision`
    ('fp32' or 'bf16'; a quantized model runs INT8 with the rest in it)."""
    from segslim.deploy.openvino_engine import OpenVINOPredictor
    from segslim.options import EngineOptions
    pred = OpenVINOPredictor(model_dir, EngineOptions(
        backend='openvino', precision=precision, cpu_threads=threads,
        input_shape=tuple(shape)))
    return _profile_nodes(pred, shape, runs, lambda key: openvino_kind(*key))


def profile_onnxruntime(model_dir: str, threads: int, shape: Sequence[int],
                        runs: int = 10) -> Dict[str, Any]:
    """profile_engine's answer for the onnxruntime predictor of `model_dir` (a quantized
    export runs INT8 in the layers the engine chose)."""
    from segslim.deploy.onnxruntime_engine import OnnxRuntimePredictor
    from segslim.options import EngineOptions
    pred = OnnxRuntimePredictor(model_dir, EngineOptions(
        backend='onnxruntime', cpu_threads=threads, input_shape=tuple(shape)))
    return _profile_nodes(pred, shape, runs, lambda key: onnxruntime_kind(key[0]))


class RunTimer:
    """Calls `run` and keeps its wall time (ms) each time it is called; `median` of them:
    one slow run on a shared machine moves a mean by more than the differences a profile is
    read for."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run = run
        self.ms: List[float] = []

    def __call__(self) -> None:
        tic = time.perf_counter()
        self.run()
        self.ms.append((time.perf_counter() - tic) * 1000)

    @property
    def median(self) -> float:
        return float(np.median(self.ms))


def _profile_nodes(pred: Any, shape: Sequence[int], runs: int,
                   kind_of: Callable[[Tuple[str, str]], str]) -> Dict[str, Any]:
    """The wall time of `pred` per run and its own per-node times (pred.node_times), each
    node's key given its kind by `kind_of`."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        pred.run(x)
    wall = RunTimer(lambda: pred.run(x))  # timed between the profiled runs: the same minutes
    by_kind: Dict[str, float] = {}
    for key, ms in pred.node_times(x, runs, between=wall).items():
        kind = kind_of(key)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    nodes, wall_ms = sum(by_kind.values()), wall.median
    return {'wall_ms': wall_ms, 'by_kind': by_kind, 'native_ms': max(wall_ms - nodes, 0.0),
            'total_ms': max(wall_ms, nodes), 'engine': pred.backend}


def profile_row(row: BenchRow, threads: int, shape: Sequence[int],
                runs: int = 10) -> Optional[Dict[str, Any]]:
    """Where the time of a benchmark row goes (its model, engine and precision), None on an
    engine without a profiler here."""
    precision = 'bf16' if 'bf16' in (row.rest, row.precision.value) else 'fp32'
    if row.backend == 'openvino':
        return profile_openvino(row.model_dir, precision, threads, shape, runs)
    if row.backend == 'paddle':
        return profile_engine(row.model_dir, 'int8' if row.int8 and not row.rest else precision,
                              threads, shape, runs)
    if row.backend == 'onnxruntime':
        return profile_onnxruntime(row.model_dir, threads, shape, runs)
    return None


def compute_ms(profile: Dict[str, Any], dtype: str = '') -> float:
    """ms per run in convolutions and matrix products (only those reading `dtype`, 'int8')."""
    return sum(ms for kind, ms in profile['by_kind'].items()
               if kind.split(' ')[0] in COMPUTE_KINDS and kind.endswith(dtype))


def attainable_gain(unquantized: Dict[str, Any], ceiling: float) -> float:
    """The most INT8 can gain over a model whose fastest unquantized row spends its time as
    `unquantized` says: its convolutions and matrix products `ceiling` times faster (this
    CPU's probe: best INT8 over best unquantized on compute-bound convs), everything else
    as it is."""
    total, compute = unquantized['total_ms'], compute_ms(unquantized)
    return total / (total - compute + compute / ceiling)


def time_shares(profile: Dict[str, Any]) -> Dict[str, float]:
    """The share of a profile's time in each of TIME_GROUPS (the remainder outside the
    engine's layers counted as 'other')."""
    shares = dict.fromkeys(TIME_GROUPS, 0.0)
    for kind, ms in profile['by_kind'].items():
        base = kind.split(' ')[0]
        if base in COMPUTE_KINDS:
            group = TIME_GROUPS[0] if kind.endswith(' int8') else TIME_GROUPS[1]
        else:
            group = KIND_GROUPS.get(base, 'other')
        shares[group] += ms / profile['total_ms']
    shares['other'] += profile['native_ms'] / profile['total_ms']
    return shares


@dataclass
class GainProfile:
    """Where a model's fastest INT8 row and fastest unquantized row spend their time, and
    the gain that allows (attainable_gain; None without the probe's ceiling)."""
    int8: Dict[str, Any]
    unquantized: Dict[str, Any]
    attainable: Optional[float]


def _child(model_dir: str, precision: str, threads: int, shape: Sequence[int],
           runs: int) -> None:
    from segslim.deploy.paddle_engine import PaddlePredictor
    from segslim.options import EngineOptions
    pred = PaddlePredictor(model_dir, EngineOptions(precision=precision, cpu_threads=threads,
                                              input_shape=tuple(shape)))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dnnl = onednn()
    for _ in range(3):
        pred.run(x)
    wall = RunTimer(lambda: pred.run(x))
    for _ in range(runs):
        wall()
    flush_all()
    print(START, flush=True)
    dnnl.dnnl_set_verbose(1)
    for _ in range(runs):
        pred.run(x)
    dnnl.dnnl_set_verbose(0)
    flush_all()
    print(END)
    print(wall.median, flush=True)


def format_profile(name: str, prof: Dict[str, Any]) -> str:
    """A markdown table of ms per run by kind, largest first."""
    lines = [f'| {name} | ms per run | share |', '|---|---|---|']
    items = sorted(prof['by_kind'].items(), key=lambda kv: -kv[1])
    items.append((REMAINDER[prof.get('engine', 'paddle')], prof['native_ms']))
    for kind, ms in items:
        lines.append('| {} | {:.2f} | {:.1%} |'.format(kind, ms, ms / prof['total_ms']))
    lines.append('| total (wall) | {:.2f} | |'.format(prof['wall_ms']))
    return '\n'.join(lines)
