"""The INT8 ONNX graph: batch norm folded into the convolutions, weights stored as int8 per
channel, and QuantizeLinear/DequantizeLinear placed from the Paddle program's scales where the
target runs them as INT8 kernels.

- onnxruntime (x86 CPU): u8 activations, s8 per-channel weights, int32 biases. A conv becomes
  QLinearConv only when its input and weight come from DequantizeLinear and its output (or the
  Relu after it) feeds exactly one QuantizeLinear, so every consumer of a quantized tensor reads
  it through one DQ (a Shape reads the uint8 tensor), and conv outputs that feed no quantized
  layer get a range measured on calibration images, as do the residual sums run as
  QLinearAdd. Tensors after a Relu use zero point 0 (the Relu folds into the
  requantization); signed ones zero point 128, the same grid as the symmetric QAT scale
  (the placement: uint8.py).
- tensorrt (explicit quantization): s8 symmetric activations and weights, zero points 0, Q/DQ
  on the inputs of weighted layers and on residual-add inputs only, float bias, equal scales on
  the inputs of a concat.
The scale of a tensor read by several quantized layers is the largest of theirs."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from segslim.onnx.graph import Graph
from segslim.onnx.uint8 import place_uint8

LAYER_TYPES = ('Conv', 'MatMul')


@dataclass
class WeightQuant:
    q: np.ndarray        # int8 values as the Paddle program stores them
    step: np.ndarray     # per-channel dequantization step (scale / qmax)
    axis: int


@dataclass
class ProgramScales:
    inputs: Dict[str, float] = field(default_factory=dict)   # weight name -> input step
    weights: Dict[str, WeightQuant] = field(default_factory=dict)


def fold_batch_norms(g: Graph, weights: Dict[str, WeightQuant]) -> None:
    """Folds Conv -> BatchNormalization and Conv -> Add(per-channel constant) into the conv's
    weight and bias. For an INT8 weight the int8 values only change sign: with the BN factor
    a, W * a = (sign(a) * q) * (|a| * step) exactly."""
    from onnx import helper
    readers = g.readers()  # folding renames a conv output to its follower's: readers stay
    for conv in [n for n in g.nodes if n.op_type == 'Conv']:
        if len(conv.input) < 2 or conv.input[1] not in g.inits:
            continue
        while True:
            w_name = conv.input[1]
            w = g.inits[w_name].astype(np.float32)
            cout = w.shape[0]
            bias = g.inits[conv.input[2]].astype(np.float32) if len(conv.input) > 2 \
                and conv.input[2] else np.zeros(cout, np.float32)
            bn = g.sole_consumer(conv.output[0], 'BatchNormalization', readers)
            add = g.sole_consumer(conv.output[0], 'Add', readers)
            if bn is not None and all(i in g.inits for i in bn.input[1:5]):
                gamma, beta, mean, var = (g.inits[i].astype(np.float64) for i in bn.input[1:5])
                eps = next((helper.get_attribute_value(a) for a in bn.attribute
                            if a.name == 'epsilon'), 1e-5)
                factor = gamma / np.sqrt(var + eps)
                new_bias = (bias - mean) * factor + beta
                follower = bn
            elif add is not None:
                other = [i for i in add.input if i != conv.output[0]]
                const = g.inits.get(other[0]) if len(other) == 1 else None
                if const is None or const.size != cout or \
                        (const.ndim >= 3 and const.shape[-2:] != (1, 1)):
                    break
                factor = np.ones(cout)
                new_bias = bias + const.astype(np.float64).reshape(cout)
                follower = add
            else:
                break
            shape = (cout,) + (1,) * (w.ndim - 1)
            quant = weights.get(w_name)
            new_w = g.add_init(w_name, (w * factor.reshape(shape)).astype(np.float32))
            if quant is not None:
                sign = np.where(factor < 0, -1, 1)
                weights[new_w] = WeightQuant(
                    (quant.q.astype(np.int16) * sign.reshape(shape)).astype(np.int8),
                    (quant.step * np.abs(factor)).astype(np.float32), quant.axis)
            conv.input[1] = new_w
            b_name = g.add_init(w_name.rsplit('.w_', 1)[0] + '.b', new_bias.astype(np.float32))
            if len(conv.input) > 2:
                conv.input[2] = b_name
            else:
                conv.input.append(b_name)
            conv.output[0] = follower.output[0]
            g.nodes.remove(follower)


def _weight_dq(g: Graph, layer: Any, quant: WeightQuant, axis: int) -> None:
    """DQ(int8 weight, per-channel step, zero point 0) -> the layer: the weight form every
    runtime takes as INT8 (OpenVINO runs a conv with a uint8 weight in float)."""
    from onnx import helper
    w_name = layer.input[1]
    q = g.add_init(w_name + '.int8', quant.q.astype(np.int8))
    z = g.add_init(w_name + '.zero_point', np.zeros(quant.step.size, np.int8))
    s = g.add_init(w_name + '.scale', quant.step.astype(np.float32).ravel())
    out = g.fresh(w_name + '.dq')
    g.nodes.append(helper.make_node('DequantizeLinear', [q, s, z], [out], name=out, axis=axis))
    layer.input[1] = out


def _bias_dq(g: Graph, conv: Any, step_in: float, quant: WeightQuant) -> None:
    from onnx import helper
    if len(conv.input) < 3 or conv.input[2] not in g.inits:
        return
    step = (step_in * quant.step.astype(np.float64)).ravel()
    step = np.where(step > 0, step, 1e-12)
    bias = g.inits[conv.input[2]].astype(np.float64).ravel()
    q = np.clip(np.round(bias / step), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    qn = g.add_init(conv.input[2] + '.int32', q)
    sn = g.add_init(conv.input[2] + '.scale', step.astype(np.float32))
    zn = g.add_init(conv.input[2] + '.zero_point', np.zeros(step.size, np.int32))
    out = g.fresh(conv.input[2] + '.dq')
    g.nodes.append(helper.make_node('DequantizeLinear', [qn, sn, zn], [out], name=out, axis=0))
    conv.input[2] = out


def _layers(g: Graph, scales: ProgramScales) -> List[Tuple[Any, WeightQuant, float]]:
    """(node, weight quantization, input step) of every layer with INT8 weights and a scale
    on its input, in graph order."""
    found = []
    for node in g.nodes:
        if node.op_type not in LAYER_TYPES or len(node.input) < 2:
            continue
        quant = scales.weights.get(node.input[1])
        step = scales.inputs.get(g.origin.get(node.input[1], node.input[1]))
        if quant is not None and step is not None and node.input[0] not in g.inits:
            found.append((node, quant, step))
    return found


def quantize_graph(model: Any, scales: ProgramScales, target: str,
                   calibration: Optional[Sequence[np.ndarray]] = None
                   ) -> Tuple[Any, Dict[str, int]]:
    """The float ONNX model with the INT8 placement for `target`; returns it and counts
    {convs, int8_convs, matmuls, int8_matmuls, calibrated, uncalibrated}."""
    g = Graph(model)
    weights = dict(scales.weights)
    fold_batch_norms(g, weights)
    scales = ProgramScales(scales.inputs, weights)
    layers = _layers(g, scales)
    trt = target == 'tensorrt'
    steps: Dict[str, float] = {}
    for node, _, step in layers:
        steps[node.input[0]] = max(steps.get(node.input[0], 0.0), step)
    if trt:
        _equal_concat_steps(g, steps)
    layer_ids = {id(n) for n, _, _ in layers}
    sources = {id(n): n.input[0] for n, _, _ in layers}
    producers = g.producers()  # placement adds Q/DQ after tensors, never a new writer of one
    stats = {'calibrated': 0, 'uncalibrated': 0, 'uint8_regions': 0}
    if trt:
        for tensor, step in steps.items():
            users = [u for u in g.consumers(tensor) if id(u) in layer_ids or u.op_type == 'Add']
            g.insert_qdq(tensor, step, 0, np.int8, users)
    else:
        place_uint8(g, producers, layers, steps, calibration, stats)
    for node, quant, _ in layers:
        _weight_dq(g, node, quant, 0 if node.op_type == 'Conv' else quant.axis)
        if node.op_type == 'Conv' and not trt:
            _bias_dq(g, node, steps[sources[id(node)]], quant)
    stats.update(convs=sum(n.op_type == 'Conv' for n in g.nodes),
                 int8_convs=sum(n.op_type == 'Conv' for n, _, _ in layers),
                 matmuls=sum(n.op_type in ('MatMul', 'Gemm') for n in g.nodes),
                 int8_matmuls=sum(n.op_type == 'MatMul' for n, _, _ in layers))
    return g.finish(), stats


def _equal_concat_steps(g: Graph, steps: Dict[str, float]) -> None:
    """TensorRT merges a concat's quantized inputs only when their scales are equal."""
    for node in g.nodes:
        if node.op_type == 'Concat':
            inputs = [i for i in node.input if i in steps]
            if len(inputs) > 1:
                top = max(steps[i] for i in inputs)
                for i in inputs:
                    steps[i] = top
