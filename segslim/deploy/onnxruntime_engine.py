"""onnxruntime predictors for the model.onnx that export/qat_export/ptq --to_onnx write beside
the Paddle program: the engine interface of segslim.deploy.engine, CPU only. What runs
INT8 is read from a profiled run of the optimized graph (QLinearConv and kin), not assumed."""
import collections
import glob
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    from onnx import TensorProto

from segslim.deploy.cpu import cpu_features
from segslim.deploy.engine import SEVEN_BIT_NOTE, EngineBase, median_per_key, seven_bit
from segslim.deploy.int8_kinds import conv_kind
from segslim.deploy.results import OpSummary, Precision
from segslim.errors import UserError, require
from segslim.logger import logger
from segslim.onnx.graph import producers_of
from segslim.onnx.uint8 import drop_idle_uint8
from segslim.options import EngineOptions

# Node kinds of onnxruntime's optimized CPU graph, counted as op_summary() counts oneDNN's.
CONV_KINDS = ('Conv', 'FusedConv', 'NchwcConv', 'ConvTranspose', 'QLinearConv', 'ConvInteger')
MATMUL_KINDS = ('MatMul', 'Gemm', 'FusedMatMul', 'QLinearMatMul', 'MatMulInteger',
                'MatMulIntegerToFloat', 'DynamicQuantizeMatMul')
INT8_KINDS = ('QLinearConv', 'ConvInteger', 'QLinearMatMul', 'MatMulInteger',
              'MatMulIntegerToFloat', 'DynamicQuantizeMatMul')


def import_onnxruntime() -> Any:
    return require('onnxruntime', '--backend onnxruntime', 'onnx', '--backend paddle')


def seven_bit_qdq(model: Any) -> int:
    """Requantizes the int8 weights of the QDQ model's Conv/MatMul/Gemm nodes to 7 bits in
    place (engine.seven_bit; the weight scale doubles, and an int32 bias DequantizeLinear is
    requantized with it, since onnxruntime fuses a QLinearConv only when the bias step is
    input step x weight step); returns how many. For CPUs without VNNI, where onnxruntime's
    u8 x s8 kernels saturate on 8-bit weights. Initializers another node also reads are left
    as they are."""
    from onnx import TensorProto, numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = producers_of(graph.node)
    reads: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1

    def own(dq: Any, dtype: Any) -> bool:  # a DQ of initializers only it reads
        return dq is not None and dq.op_type == 'DequantizeLinear' and \
            all(n in inits and reads[n] == 1 for n in dq.input[:2]) and \
            inits[dq.input[0]].data_type == dtype

    def scaled(name: str, values: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(values, name))

    done = 0
    for node in graph.node:
        if node.op_type not in ('Conv', 'MatMul', 'Gemm') or len(node.input) < 2:
            continue
        weight: Any = producer.get(node.input[1])
        if not own(weight, TensorProto.INT8):
            continue
        zero = numpy_helper.to_array(inits[weight.input[2]]) if len(weight.input) > 2 else None
        if zero is not None and zero.any():
            continue
        half = seven_bit(numpy_helper.to_array(inits[weight.input[0]]))
        if half is None:
            continue
        bias: Any = producer.get(node.input[2]) if len(node.input) > 2 else None
        if node.op_type == 'Conv' and bias is not None and not own(bias, TensorProto.INT32):
            continue
        scaled(weight.input[0], half)
        scaled(weight.input[1], numpy_helper.to_array(inits[weight.input[1]]) * 2)
        if node.op_type == 'Conv' and bias is not None:
            q = numpy_helper.to_array(inits[bias.input[0]]).astype(np.float64)
            scaled(bias.input[0], np.round(q / 2).astype(np.int32))
            scaled(bias.input[1], numpy_helper.to_array(inits[bias.input[1]]) * 2)
        done += 1
    return done


def _dequantized(dq: Any, inits: Dict[str, 'TensorProto']) -> Any:
    """The float values of a DequantizeLinear of initializers (per-tensor or per-axis),
    or None when its inputs are not all initializers."""
    from onnx import numpy_helper
    if dq is None or dq.op_type != 'DequantizeLinear' or \
            not all(n in inits for n in dq.input if n):
        return None
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) \
        if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    if scale.ndim:
        axis = next((a.i for a in dq.attribute if a.name == 'axis'), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def quantized_kinds(model: Any) -> List[Tuple[Any, str]]:
    """(node, kind) of every Conv / MatMul whose data input is a Q/DQ pair and whose
    weight a DequantizeLinear of initializers gives (int8_kinds)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = producers_of(graph.node)
    out = []
    for node in graph.node:
        if node.op_type not in ('Conv', 'MatMul') or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        weight = producer.get(node.input[1])
        if dq is None or dq.op_type != 'DequantizeLinear' or weight is None or \
                weight.op_type != 'DequantizeLinear' or weight.input[0] not in inits:
            continue
        if node.op_type == 'MatMul':
            out.append((node, 'matmul'))
            continue
        dims = list(inits[weight.input[0]].dims)  # O, I/G, kh, kw
        groups = next((a.i for a in node.attribute if a.name == 'group'), 1)
        out.append((node, conv_kind(groups, dims[1], dims[0] // groups, dims[2:])))
    return out


def with_float_kinds(model: Any, kinds: Any) -> Any:
    """A copy of the QDQ `model` whose Conv / MatMul nodes of `kinds` read their input
    before its Q/DQ pair and float weights and bias: onnxruntime runs them in float. The
    Q/DQ regions no INT8 kernel uses any more (a float layer's quantized output,
    uint8.drop_idle_uint8), nodes and initializers nothing reads any more are removed."""
    import onnx
    from onnx import numpy_helper
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = producers_of(graph.node)
    for node, kind in quantized_kinds(model):
        if kind not in kinds:
            continue
        dq = producer[node.input[0]]
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == 'QuantizeLinear':
            node.input[0] = q.input[0]
        for i in range(1, len(node.input)):
            values = _dequantized(producer.get(node.input[i]), inits)
            if values is not None:
                name = f'{node.name or node.output[0]}_float_{i}'
                graph.initializer.append(numpy_helper.from_array(values, name))
                node.input[i] = name
    if kinds:
        drop_idle_uint8(graph)
    _prune(graph)
    return model


def _prune(graph: Any) -> None:
    """Removes nodes whose outputs nothing reads (repeatedly), then unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        reads = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in reads for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    reads = {name for node in graph.node for name in node.input} | outputs
    for init in [t for t in graph.initializer if t.name not in reads]:
        graph.initializer.remove(init)


def profiled_summary(nodes: Dict[str, str]) -> OpSummary:
    """{node name: op kind} of one profiled run -> the op summary."""
    return OpSummary.count([(kind, kind in INT8_KINDS, name)
                            for name, kind in sorted(nodes.items())], CONV_KINDS, MATMUL_KINDS)


class OnnxRuntimePredictor(EngineBase):
    """One onnxruntime CPU session for the folder's model.onnx (deploy.yaml `onnx`). On CPUs
    without VNNI an INT8 file's weights run in 7 bits (seven_bit_qdq; `seven_bit` says how
    many layers, `fallback` says so)."""
    backend = 'onnxruntime'
    package = 'onnxruntime'

    def __init__(self, model_dir: str, opts: EngineOptions):
        self.ort = import_onnxruntime()
        if opts.device != 'cpu' or opts.use_trt:
            raise UserError('--backend onnxruntime runs on CPU here; add --device cpu and drop '
                            '--use_trt, or use --backend paddle')
        if opts.precision in ('fp16', 'bf16'):
            raise UserError(f'--precision {opts.precision} is not run by onnxruntime on CPU; use '
                            'fp32 (or int8 with a quantized export)')
        super().__init__(model_dir, opts)
        name = self.deploy.get('onnx')
        path = os.path.join(self.deploy['dir'], name) if name else None
        if not path or not os.path.isfile(path):
            raise UserError(f'{model_dir} has no ONNX model; export it with --to_onnx, or use '
                            '--backend paddle')
        self.onnx_path = path
        self.model: Any = path  # what the sessions load: the file, or its rewritten bytes
        self.seven_bit = 0
        if self.quantized and not self.for_tensorrt and not cpu_features()['vnni'] and \
                self.peer is None:
            try:
                import onnx
            except ImportError:
                logger.warning('onnx is not installed, so %s runs its 8-bit weights, which '
                               'saturate on this CPU: pip install -e .[onnx]', path)
            else:
                model = onnx.load(path)
                self.seven_bit = seven_bit_qdq(model)
                if self.seven_bit:
                    self.model = model.SerializeToString()
                    self.fallback = SEVEN_BIT_NOTE
        if self.quantized and not self.for_tensorrt:
            self._choose_kinds()
        try:
            self.session = self.ort.InferenceSession(self.model, self._options(),
                                                     providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own generic errors
            raise UserError(f'onnxruntime cannot load {path} '
                            f'({str(e).strip().splitlines()[-1][:160]}); re-export with '
                            '--to_onnx') from e
        self.input_name = self.session.get_inputs()[0].name
        self.ops = self._profile(np.zeros(self.probe_shape(), np.float32))
        self.precision = Precision.INT8 if self.quantized else Precision.FP32
        if self.quantized and not self.ops.int8_ops:
            self.ran_no_int8()
        if self.for_tensorrt:
            self.fallback = ('the ONNX file is placed for TensorRT; onnxruntime runs its Q/DQ '
                             'in float')

    def _choose_kinds(self) -> None:
        """Leaves in float the kinds of layer INT8 does not speed up here (int8_kinds),
        timed at the probe shape."""
        try:
            import onnx
        except ImportError:
            return
        model = self.model if not isinstance(self.model, (str, bytes)) else (
            onnx.load(self.model) if isinstance(self.model, str) else
            onnx.ModelProto.FromString(self.model))
        def build(kinds: Any, images: np.ndarray) -> Any:
            session = self.ort.InferenceSession(
                with_float_kinds(model, kinds).SerializeToString(), self._options(),
                providers=['CPUExecutionProvider'])
            name = session.get_inputs()[0].name
            return lambda: session.run(None, {name: images})
        chosen = self.choose_kinds({kind for _, kind in quantized_kinds(model)}, build)
        if chosen.float_kinds:
            self.model = with_float_kinds(model, chosen.float_kinds).SerializeToString()

    @property
    def for_tensorrt(self) -> bool:
        """The file was placed for TensorRT (export --onnx_target tensorrt)."""
        return self.deploy.get('onnx_target') == 'tensorrt'

    def _options(self, profile_prefix: str = '') -> Any:
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = int(self.opts.cpu_threads)
        so.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: a benchmark and the choice of INT8
        # kinds run sessions in turns, and the spinning threads of the one that ran last
        # took the cores from the next (on 2 cores the same model timed 23 ms or 32 ms by
        # turn; alone, spinning saves a few percent at most).
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')
        so.log_severity_level = 3
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.for_tensorrt:
            # Placed for TensorRT: onnxruntime's x86 kernels for its s8 activations add
            # products in pairs into int16 and saturate, so the graph runs as float Q/DQ
            # (the reference numerics of the file), not as onnxruntime INT8 kernels.
            so.add_session_config_entry('session.disable_quant_qdq', '1')
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        return so

    def _profiled(self, images: np.ndarray, runs: int,
                  between: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
        """onnxruntime's profile events (one per node and run, 'dur' in microseconds) of
        `runs` runs of `images` in a second session of the model as it is run (`between`
        called before each)."""
        with tempfile.TemporaryDirectory(prefix='segslim-ort-') as tmp:
            session = self.ort.InferenceSession(self.model,
                                                self._options(os.path.join(tmp, 'prof')),
                                                providers=['CPUExecutionProvider'])
            feed = {self.input_name: np.ascontiguousarray(images, dtype=np.float32)}
            for _ in range(runs):
                if between is not None:
                    between()
                session.run(None, feed)
            session.end_profiling()
            events = []
            for path in glob.glob(os.path.join(tmp, 'prof*.json')):
                with open(path) as f:
                    events += [e for e in json.load(f) if e.get('cat') == 'Node' and
                               'op_name' in (e.get('args') or {}) and
                               e['name'].endswith('_kernel_time')]
        return events

    def _profile(self, images: np.ndarray) -> OpSummary:
        """Op summary of the optimized graph, from one profiled run in a second session."""
        return profiled_summary({e['name'].rsplit('_kernel_time', 1)[0]: e['args']['op_name']
                                 for e in self._profiled(images, 1)})

    def node_times(self, images: np.ndarray, runs: int,
                   between: Optional[Callable[[], None]] = None
                   ) -> Dict[Tuple[str, str], float]:
        """ms per run of `images` in each (op type, '') of the optimized graph, the median
        over `runs` (median_per_key), from onnxruntime's own profile of each node (a session
        with profiling on, after one untimed run; the rows are timed without it); `between`
        is called before each run."""
        per_run: List[Dict[Tuple[str, str], float]] = [
            collections.defaultdict(float) for _ in range(runs)]
        seen: Dict[str, int] = collections.Counter()  # the n-th time a node ran is run n
        for e in sorted(self._profiled(images, runs + 1, between), key=lambda e: e['ts']):
            run = seen[e['name']] - 1  # each node's first run warms its kernel: left out
            seen[e['name']] += 1
            if 0 <= run < runs:
                per_run[run][(e['args']['op_name'], '')] += e['dur'] / 1000
        return median_per_key(per_run)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Runs a N,C,H,W float32 batch; returns the first output."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(
            images, dtype=np.float32)})[0]
