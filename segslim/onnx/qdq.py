"""The INT8 ONNX graph: batch norm folded into the convolutions, weights stored as int8 per
channel, and QuantizeLinear/DequantizeLinear placed from the Paddle program's scales where the
target runs them as INT8 kernels.

- onnxruntime (x86 CPU): u8 activations, s8 per-channel weights, int32 biases. A conv becomes
  QLinearConv only when its input and weight come from DequantizeLinear and its output (or the
  Relu after it) feeds exactly one QuantizeLinear, so every consumer of a quantized tensor reads
  it through one DQ (a Shape reads the uint8 tensor), and conv outputs that feed no quantized
  layer get a range measured on calibration images, as do the residual sums run as
  QLinearAdd. Tensors after a Relu use zero point 0 (the Relu folds into the
  requantization); signed ones zero point 128, the same grid as the symmetric QAT scale.
- tensorrt (explicit quantization): s8 symmetric activations and weights, zero points 0, Q/DQ
  on the inputs of weighted layers and on residual-add inputs only, float bias, equal scales on
  the inputs of a concat.
The scale of a tensor read by several quantized layers is the largest of theirs."""
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from segslim.onnx.graph import Graph, tensor_ranges

if TYPE_CHECKING:
    from onnx import NodeProto

LAYER_TYPES = ('Conv', 'MatMul')
NONNEGATIVE_OPS = ('Relu', 'Sigmoid', 'Softmax')
# Ops whose output is non-negative when every data input is.
SIGN_KEEPING_OPS = ('MaxPool', 'AveragePool', 'GlobalAveragePool', 'Resize', 'Concat', 'Add',
                    'Mul', 'Identity', 'Reshape', 'Flatten', 'Transpose', 'Split', 'Squeeze',
                    'Unsqueeze')
# Ops that only move or select their first input's values: onnxruntime runs them on uint8
# when the tensors before and after them are quantized with one scale and zero point.
MOVING_OPS = ('Reshape', 'Transpose', 'Split', 'Flatten', 'Squeeze', 'Unsqueeze', 'MaxPool')


@dataclass
class WeightQuant:
    q: np.ndarray        # int8 values as the Paddle program stores them
    step: np.ndarray     # per-channel dequantization step (scale / qmax)
    axis: int


@dataclass
class ProgramScales:
    inputs: Dict[str, float] = field(default_factory=dict)   # weight name -> input step
    weights: Dict[str, WeightQuant] = field(default_factory=dict)


def _sole_consumer(g: Graph, name: str, op_type: str,
                   readers: Optional[Dict[str, List[Any]]] = None) -> Optional[Any]:
    users = readers.get(name, []) if readers is not None else g.consumers(name)
    if len(users) == 1 and users[0].op_type == op_type and not g.is_output(name):
        return users[0]
    return None


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
            bn = _sole_consumer(g, conv.output[0], 'BatchNormalization', readers)
            add = _sole_consumer(g, conv.output[0], 'Add', readers)
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


def _nonnegative(g: Graph, producers: Dict[str, 'NodeProto'], name: str, depth: int = 0) -> bool:
    """Whether the tensor cannot be negative, from the ops that make it."""
    if name in g.inits:
        return bool((g.inits[name] >= 0).all())
    node = producers.get(name)
    if node is None or depth > 50:
        return False
    if node.op_type in NONNEGATIVE_OPS:
        return True
    if node.op_type in SIGN_KEEPING_OPS:
        data = node.input[:1] if node.op_type in MOVING_OPS + ('Resize',) else node.input
        return all(_nonnegative(g, producers, i, depth + 1) for i in data if i)
    return False


def _qdq(g: Graph, tensor: str, scale: float, zero_point: int, dtype: Any,
         users: Sequence[Any]) -> str:
    """Inserts Q -> DQ after `tensor` and points `users` at the DQ output."""
    from onnx import helper
    s = g.add_init(tensor + '.scale', np.array(scale, np.float32))
    z = g.add_init(tensor + '.zero_point', np.array(zero_point, dtype))
    quantized, restored = g.fresh(tensor + '.q'), g.fresh(tensor + '.dq')
    # a Shape reads the uint8 tensor: no dequantize is computed for it alone
    g.redirect(tensor, quantized, [u for u in users if u.op_type == 'Shape'])
    g.redirect(tensor, restored, [u for u in users if u.op_type != 'Shape'])
    g.nodes.append(helper.make_node('QuantizeLinear', [tensor, s, z], [quantized],
                                    name=quantized))
    g.nodes.append(helper.make_node('DequantizeLinear', [quantized, s, z], [restored],
                                    name=restored))
    return restored


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


def _layer_output(g: Graph, node: Any) -> str:
    """The tensor a requantization can follow: the layer output, or its Relu's."""
    relu = _sole_consumer(g, node.output[0], 'Relu')
    return relu.output[0] if relu is not None else node.output[0]


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
            _qdq(g, tensor, step, 0, np.int8, users)
    else:
        _place_uint8(g, producers, layers, steps, calibration, stats)
    for node, quant, _ in layers:
        _weight_dq(g, node, quant, 0 if node.op_type == 'Conv' else quant.axis)
        if node.op_type == 'Conv' and not trt:
            _bias_dq(g, node, steps[sources[id(node)]], quant)
    stats.update(convs=sum(n.op_type == 'Conv' for n in g.nodes),
                 int8_convs=sum(n.op_type == 'Conv' for n, _, _ in layers),
                 matmuls=sum(n.op_type in ('MatMul', 'Gemm') for n in g.nodes),
                 int8_matmuls=sum(n.op_type == 'MatMul' for n, _, _ in layers))
    return g.finish(), stats


def _place_uint8(g: Graph, producers: Dict[str, 'NodeProto'],
                 layers: List[Tuple[Any, WeightQuant, float]], steps: Dict[str, float],
                 calibration: Optional[Sequence[np.ndarray]], stats: Dict[str, int]) -> None:
    """onnxruntime's placement: Q/DQ on every quantized layer's input (its step), on the layer
    outputs that feed no quantized layer (a range measured on the calibration images), on the
    residual Adds that can run as QLinearAdd (_uint8_adds), and through the ops that only move
    values (_moves_values) and the concats between them, one scale and zero point per
    connected region, so those run on uint8 (QLinearConcat, NhwcMaxPool, uint8 Transpose,
    Reshape, Split) instead of a dequantize, a float op and a quantize."""
    adds, regions, outputs = _uint8_adds(g, producers, layers, steps)
    in_region = {t for members in regions.values() for t in members}
    stats['uint8_adds'] = len(adds)
    lone = [t for t in sorted(outputs)
            if t not in steps and t not in in_region and not g.is_output(t)]
    unstepped = [root for root, members in regions.items()
                 if not any(t in steps for t in members)]
    measure = lone + unstepped
    measured = tensor_ranges(g, measure, calibration) if measure and calibration else {}
    placed: Dict[str, Tuple[float, int]] = {}
    # a region takes the largest step of the layer inputs in it, else its measured range
    for root, members in regions.items():
        stepped = [steps[t] for t in members if t in steps]
        if stepped:
            zero = 0 if all(_nonnegative(g, producers, t) for t in members) else 128
            placed.update((t, (max(stepped), zero)) for t in members)
        elif root in measured:
            placed.update((t, _asymmetric(*measured[root])) for t in members)
        stats['uint8_regions'] += 1
    for tensor, step in steps.items():
        if tensor not in placed:
            placed[tensor] = (step, 0 if _nonnegative(g, producers, tensor) else 128)
    grids = _concat_grids(g, producers, lone, placed)
    stats['on_concat_grid'] = len(grids)
    for tensor in measure:
        if tensor in in_region:
            continue
        if tensor in grids:
            placed[tensor] = grids[tensor]
        elif tensor in measured:
            placed[tensor] = _asymmetric(*measured[tensor])
            stats['calibrated'] += 1
        else:
            stats['uncalibrated'] += 1
    for tensor, (scale, zero) in placed.items():
        if tensor in steps:  # the layers reading it take the placed (unified) step
            steps[tensor] = scale
        _qdq(g, tensor, scale, zero, np.uint8, g.consumers(tensor))


def _concat_grids(g: Graph, producers: Dict[str, 'NodeProto'], lone: Sequence[str],
                  placed: Dict[str, Tuple[float, int]]) -> Dict[str, Tuple[float, int]]:
    """{tensor: the scale and zero point of the concat that alone reads it}, for the layer
    outputs in `lone` (quantized on a measured range of their own) whose one reader (besides
    Shape) is a concat with a placed output: on its grid, the layer rounds straight into it
    and onnxruntime's QLinearConcat copies that input instead of requantizing it (a table
    lookup per value; the stride-2 ShuffleNet units requantized both halves). The concat's
    output is rounded to that grid anyway, so this drops a rounding and loses none. A
    non-negative output keeps its own grid when the concat's is signed (zero point 128):
    with zero point 0 its Relu folds into the conv's requantization."""
    grids = {}
    for tensor in lone:
        users = [u for u in g.consumers(tensor) if u.op_type != 'Shape']
        if len(users) != 1 or users[0].op_type != 'Concat' or users[0].output[0] not in placed:
            continue
        grid = placed[users[0].output[0]]
        if grid[1] == 0 or not _nonnegative(g, producers, tensor):
            grids[tensor] = grid
    return grids


def _uint8_adds(g: Graph, producers: Dict[str, 'NodeProto'],
                layers: List[Tuple[Any, WeightQuant, float]], steps: Dict[str, float]
                ) -> Tuple[List[Any], Dict[str, List[str]], Set[str]]:
    """The Adds of two tensors that onnxruntime can run as QLinearAdd, the uint8 regions with
    them, and the outputs (after a Relu) of the layers and those Adds: an Add qualifies when
    each input is quantized (a layer's input or output, a region's member or a qualifying
    Add's output) and its output (or its Relu's, which the zero point 0 folds away) is
    quantized anyway (a layer reads it) or read by quantized ops only, so uint8 flows through
    it; residual sums that only float ops read (SegFormer's layer norms) stay float. Found as
    a fixed point: dropping one Add can disqualify the ops around it."""
    layer_ids = {id(n) for n, _, _ in layers}
    layer_outputs = {_layer_output(g, n) for n, _, _ in layers}
    candidates = {_layer_output(g, n): n for n in g.nodes if n.op_type == 'Add' and
                  len(n.input) == 2 and not any(i in g.inits for i in n.input)}
    adds = list(candidates.values())
    readers = g.readers()
    while True:
        ids = layer_ids | {id(a) for a in adds}
        add_outputs = {out: a for out, a in candidates.items() if id(a) in ids}
        regions = _moving_regions(g, producers, ids, layer_outputs | set(add_outputs), steps)
        members = {t for m in regions.values() for t in m}
        quantized = layer_outputs | set(add_outputs) | set(steps) | members
        kept = [a for out, a in add_outputs.items()
                if all(i in quantized for i in a.input) and not g.is_output(out) and (
                    out in steps or all(
                    id(u) in ids or u.op_type == 'Shape' or (u.output and u.output[0] in members)
                    for u in readers.get(out, [])))]
        if len(kept) == len(adds):
            return adds, regions, layer_outputs | set(add_outputs)
        adds = kept


def _asymmetric(low: float, high: float) -> Tuple[float, int]:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 or 1e-8
    return scale, int(np.clip(round(-low / scale), 0, 255))


def _moves_values(node: Any) -> bool:
    """MOVING_OPS, and a linear or nearest Resize: its values stay within its input's range,
    so one scale serves both (onnxruntime runs Resize on uint8)."""
    if node.op_type == 'Resize':
        mode = next((a.s for a in node.attribute if a.name == 'mode'), b'nearest')
        return mode in (b'linear', b'nearest')
    return node.op_type in MOVING_OPS


def _moving_regions(g: Graph, producers: Dict[str, 'NodeProto'], layer_ids: Set[int],
                    outputs: Set[str], steps: Dict[str, float]) -> Dict[str, List[str]]:
    """{root: the float tensors of its region}, for the tensors written by the ops that move
    values (and the outputs of concats of quantized tensors), joined through those ops' first
    inputs, whose region starts at a quantized layer (`layer_ids`) output (`outputs`) or input
    (`steps`) or at such a concat, and ends only in quantized layers, such concats or other
    moving ops: where uint8 can flow without a float op reading it."""
    parent: Dict[str, str] = {}

    def find(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for node in g.nodes:
        if _moves_values(node) and node.input and node.input[0] not in g.inits:
            for out in node.output:
                parent[find(out)] = find(node.input[0])
    concats = {id(n): n for n in g.nodes if n.op_type == 'Concat' and
               any(find(i) in parent or i in outputs or i in steps for i in n.input)}
    for node in concats.values():
        parent.setdefault(node.output[0], node.output[0])
    regions: Dict[str, List[str]] = {}
    for t in parent:
        regions.setdefault(find(t), []).append(t)
    readers = g.readers()
    layer_inputs = set(steps)

    def sources_ok(root: str) -> bool:
        if root in outputs or root in layer_inputs:  # quantized anyway
            return True
        node = producers.get(root)
        return node is not None and id(node) in concats and all(
            i in outputs or i in layer_inputs or find(i) in regions for i in node.input)

    def users_ok(members: List[str]) -> bool:
        return not any(g.is_output(t) for t in members) and all(
            id(u) in layer_ids or id(u) in concats or _moves_values(u) or
            u.op_type == 'Shape' for t in members for u in readers.get(t, []))

    # a root that a layer writes or reads joins its region: requantized once, into the
    # region's grid (a concat's output is its own root and already a member)
    return {root: members + [root] * (root not in members)
            for root, members in regions.items() if users_ok(members) and sources_ok(root)}


def _equal_concat_steps(g: Graph, steps: Dict[str, float]) -> None:
    """TensorRT merges a concat's quantized inputs only when their scales are equal."""
    for node in g.nodes:
        if node.op_type == 'Concat':
            inputs = [i for i in node.input if i in steps]
            if len(inputs) > 1:
                top = max(steps[i] for i in inputs)
                for i in inputs:
                    steps[i] = top
