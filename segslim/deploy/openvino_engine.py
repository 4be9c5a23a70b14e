"""OpenVINO predictors for exported models: the engine interface of
segslim.deploy.engine (run, to_labels, labels, precision, engine op summary), CPU only.

OpenVINO reads the Paddle inference program directly; a QAT export's quantize/dequantize
pairs become FakeQuantize ops, and what runs INT8 is read back from the compiled model's
runtime graph, never assumed. It also reads the OpenVINO IR folders that ptq.py --quantizer
nncf writes (model.xml/model.bin), FakeQuantize ops as NNCF placed them."""
import collections
import os
import tempfile
from typing import Any, List, Tuple

import numpy as np

from segslim.deploy.cpu import cpu_features
from segslim.deploy.engine import SEVEN_BIT_NOTE, EngineBase, seven_bit
from segslim.deploy.int8_kinds import conv_kind
from segslim.deploy.results import OpSummary, Precision
from segslim.errors import UserError, require
from segslim.options import EngineOptions
from segslim.program import strip_observer_quantization

# OpenVINO CPU runtime layer types counted as quantizable work (oneDNN's conv/matmul kinds).
CONV_LAYERS = ('Convolution', 'GroupConvolution', 'Deconvolution')
MATMUL_LAYERS = ('FullyConnected', 'MatMul')
INT8_PRECISIONS = ('i8', 'u8')
# Converted-model ops whose inputs a QAT model fake-quantizes (PaddleSlim's Conv2D/Linear).
QUANTIZED_CONSUMERS = ('Convolution', 'GroupConvolution', 'ConvolutionBackpropData', 'MatMul')
# Compiled models kept per input shape (OpenVINO compiles static shapes fastest).
SHAPE_CACHE = 4
# Ops that may take a conv's quantized input too (share_quantized_inputs): the plugin runs
# them on INT8 data, as NNCF and onnxruntime's quantize_static quantize them.
INT8_PASSTHROUGH = ('Concat', 'AvgPool', 'MaxPool', 'AdaptiveAvgPool', 'AdaptiveMaxPool',
                    'ReduceMean', 'ReduceMax', 'Add', 'Interpolate')
# Ops between a weighted op and its dequantize Multiply (per-channel scales get reshaped).
WEIGHT_PATH_OPS = ('Reshape', 'Unsqueeze', 'Squeeze', 'Transpose', 'Convert')


def import_openvino() -> Any:
    return require('openvino', '--backend openvino', 'openvino', '--backend paddle')


def runtime_summary(runtime_model: Any) -> OpSummary:
    """What a compiled model executes in INT8, from its runtime graph (layerType,
    runtimePrecision), counted as op_summary() counts the oneDNN program."""
    ops = []
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        ops.append((info['layerType'].astype(str),
                    info['runtimePrecision'].astype(str).lower() in INT8_PRECISIONS,
                    info['originalLayersNames'].astype(str).split(',')[0] or
                    op.get_friendly_name()))
    return OpSummary.count(ops, CONV_LAYERS, MATMUL_LAYERS)


def drop_observer_quantization(model: Any) -> List[str]:
    """Removes the FakeQuantize ops of a converted model that feed no convolution or matrix
    product; returns their names. The program-level strip_observer_quantization removes the
    observer pairs before conversion; this catches those the converter splits off a shared
    tensor (PTQ programs quantize a tensor once for a conv and its other consumers)."""
    dropped = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != 'FakeQuantize':
            continue
        users = [t.get_node().get_type_name() for t in op.output(0).get_target_inputs()]
        if any(u in QUANTIZED_CONSUMERS for u in users):
            continue
        op.output(0).replace(op.input_value(0))
        dropped.append(op.get_friendly_name())
    if dropped:
        model.validate_nodes_and_infer_types()
    return dropped


def share_quantized_inputs(model: Any) -> int:
    """Where a tensor feeds a conv or matrix product through one FakeQuantize and also feeds
    INT8_PASSTHROUGH ops directly, those take the FakeQuantize's output as well; returns how
    many inputs changed. A QAT program quantizes a layer's input on that layer's edge only,
    so the producer of a tensor that STDC's or BiSeNet's blocks also concatenate or pool
    wrote float for those and quantized it again for the conv; sharing the quantized tensor
    lets the producing conv write u8 (its requantization fused) for all of them."""
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == 'FakeQuantize':
            continue
        for out in op.outputs():
            users = list(out.get_target_inputs())
            fqs = [u.get_node() for u in users if u.get_node().get_type_name() == 'FakeQuantize']
            if len(fqs) != 1 or not _feeds_layer(fqs[0]):
                continue
            for user in users:
                if user.get_node().get_type_name() in INT8_PASSTHROUGH:
                    user.replace_source_output(fqs[0].output(0))
                    done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


def _feeds_layer(fq: Any) -> bool:
    return any(u.get_node().get_type_name() in QUANTIZED_CONSUMERS
               for u in fq.output(0).get_target_inputs())


def layer_kind(op: Any) -> str:
    """The int8_kinds kind of a convolution or matrix product of a converted model ('' for
    other ops)."""
    kind = op.get_type_name()
    if kind == 'MatMul':
        return 'matmul'
    if kind not in ('Convolution', 'GroupConvolution'):
        return ''
    shape = [int(d) for d in op.input_value(1).get_shape()]
    if kind == 'Convolution':  # O, I, kh, kw
        return conv_kind(1, shape[1], shape[0], shape[2:])
    return conv_kind(shape[0], shape[2], shape[1], shape[3:])  # G, O/G, I/G, kh, kw


def quantized_kinds(model: Any) -> List[Tuple[Any, str]]:
    """(op, kind) of every conv / matrix product whose data input a FakeQuantize feeds."""
    out = []
    for op in model.get_ordered_ops():
        kind = layer_kind(op)
        if kind and op.input_value(0).get_node().get_type_name() == 'FakeQuantize':
            out.append((op, kind))
    return out


def with_float_kinds(model: Any, kinds: Any) -> Any:
    """A copy of `model` whose layers of `kinds` take their input unquantized: the plugin
    runs them in float. A FakeQuantize that then feeds no conv or matrix product is removed
    (the ops that shared it get its input back)."""
    model = model.clone()
    if kinds:
        for op, kind in quantized_kinds(model):
            if kind in kinds:
                fq = op.input_value(0).get_node()
                op.input(0).replace_source_output(fq.input_value(0))
                if not _feeds_layer(fq):
                    fq.output(0).replace(fq.input_value(0))
        model.validate_nodes_and_infer_types()
    return model


def planar_channel_topk(model: Any, max_channels: int) -> int:
    """Runs each TopK over the channels of a 4-D tensor (the export's argmax head) with
    fewer than `max_channels` channels on the tensor reshaped to N x C x H*W, and reshapes
    its outputs back: the same values and indices. A 4-D TopK follows its producer's layout,
    and after INT8 layers that is blocked or channels-last, where the plugin's TopK over two
    classes at 512x512 runs several times slower than the reorder to a planar layout that
    the 3-D input gets. With a channel block or more (16 float32 channels with AVX-512, so
    Cityscapes' 19 classes) it is the other way round: that reorder costs 2-3x the TopK it
    saves. Returns how many."""
    import openvino.opset13 as ops
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != 'TopK':
            continue
        rank = op.get_input_partial_shape(0).rank
        if not rank.is_static or rank.get_length() != 4:
            continue
        attrs = op.get_attributes()
        channels = op.get_input_partial_shape(0)[1]
        if attrs['axis'] not in (1, -3) or not channels.is_static or \
                channels.get_length() >= max_channels:
            continue
        targets = [list(op.output(i).get_target_inputs()) for i in range(2)]
        data, k = op.input_value(0), op.input_value(1)
        flat = ops.reshape(data, ops.constant(np.array([0, 0, -1], np.int64)), True)
        topk = ops.topk(flat, k, 1, attrs['mode'], attrs['sort'], attrs['index_element_type'],
                        bool(attrs.get('stable', False)))
        # N, k, H, W of the original output, whatever the input shape is at run time
        shape = ops.shape_of(data, 'i64')
        out_shape = ops.concat([
            ops.gather(shape, ops.constant(np.array([0], np.int64)), 0),
            ops.convert(ops.reshape(k, ops.constant(np.array([1], np.int64)), False), 'i64'),
            ops.gather(shape, ops.constant(np.array([2, 3], np.int64)), 0)], 0)
        for i, consumers in enumerate(targets):
            back = ops.reshape(topk.output(i), out_shape, False)
            for target in consumers:
                target.replace_source_output(back.output(0))
        done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


def _through(node: Any, stop: str) -> Any:
    """The first `stop` op up the data input (input 0) of `node` through WEIGHT_PATH_OPS,
    or None."""
    while node.get_type_name() != stop:
        if node.get_type_name() not in WEIGHT_PATH_OPS or node.get_input_size() == 0:
            return None
        node = node.input_value(0).get_node()
    return node


def seven_bit_weights(model: Any) -> int:
    """Requantizes the INT8 weights of the model's convolutions and matrix products to 7 bits
    (q -> round(q / 2), scale x 2); returns how many. For CPUs without VNNI, where OpenVINO's
    INT8 kernels sum pairs of u8 x s8 products in 16 bits and full-range weights saturate
    them (OpenVINO leaves the fix to the model). Weights already within 7 bits (NNCF's
    overflow fix) and asymmetric ones (a non-zero zero point) are left as they are."""
    import openvino as ov
    import openvino.opset13 as ops
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in QUANTIZED_CONSUMERS:
            continue
        mul = _through(op.input_value(1).get_node(), 'Multiply')
        if mul is None:
            continue
        src = mul.input_value(0).get_node()
        if src.get_type_name() == 'Subtract':
            zero = _through(src.input_value(1).get_node(), 'Constant')
            if zero is None or zero.get_data().any():
                continue
            src = src.input_value(0).get_node()
        const = _through(src, 'Constant') if src.get_type_name() == 'Convert' else None
        if const is None or const.get_element_type() != ov.Type.i8 or \
                len(const.output(0).get_target_inputs()) > 1:
            continue  # not INT8 weights of this op alone
        half = seven_bit(const.get_data())
        if half is None:
            continue
        const.output(0).replace(ops.constant(half).output(0))
        scale = mul.input_value(1)  # folded into one constant when compiled
        mul.input(1).replace_source_output(
            ops.multiply(scale, ops.constant(np.array(2, scale.get_element_type().to_dtype()))
                         ).output(0))
        done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


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
    ops in INT8 and the rest in f32, or in bf16 with --precision bf16 (`rest`). `engine` is
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
        self.dropped = drop_observer_quantization(self.model) if self.quantized and \
            not keep_all else []
        self.shared = share_quantized_inputs(self.model) if self.quantized and \
            not keep_all else 0
        self.planar_topk = planar_channel_topk(self.model, cpu_features()['simd_floats'])
        self.seven_bit = 0
        if self.quantized and not cpu_features()['vnni'] and self.peer is None:
            self.seven_bit = seven_bit_weights(self.model)
            if self.seven_bit:
                self.fallback = SEVEN_BIT_NOTE
        self.precision = Precision.INT8 if self.quantized else (
            Precision.BF16 if opts.precision == 'bf16' else Precision.FP32)
        if self.quantized and opts.precision == 'bf16':
            self.rest = 'bf16'  # INT8 where quantized, every other op in bf16
        self.properties = {
            'INFERENCE_PRECISION_HINT': 'bf16' if opts.precision == 'bf16' else 'f32',
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
        timed at the probe shape."""
        def build(kinds: Any, images: np.ndarray) -> Any:
            model = with_float_kinds(self.model, kinds)
            model.reshape({model.inputs[0].get_any_name(): list(images.shape)})
            request = self.core.compile_model(model, 'CPU', self.properties) \
                .create_infer_request()
            return lambda: request.infer({0: images})
        chosen = self.choose_kinds({kind for _, kind in quantized_kinds(self.model)}, build)
        if chosen.float_kinds:
            self.model = with_float_kinds(self.model, chosen.float_kinds)

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

    def run(self, images: np.ndarray) -> np.ndarray:
        """Runs a N,C,H,W float32 batch; returns the first output."""
        request = self._request(tuple(int(v) for v in images.shape))
        request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return request.get_output_tensor(0).data.copy()
