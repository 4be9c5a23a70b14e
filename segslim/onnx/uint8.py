"""onnxruntime's uint8 placement of the INT8 ONNX graph (qdq.quantize_graph for the
onnxruntime target): u8 activations with one scale and zero point per region that uint8 can
flow through (layer inputs and outputs, residual sums run as QLinearAdd, the ops that only
move values and the concats between them), zero point 0 after a Relu, 128 on signed tensors
(the same grid as the symmetric QAT scale)."""
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from segslim.onnx.graph import Graph, producers_of, readers_of, redirect, tensor_ranges

if TYPE_CHECKING:
    from onnx import NodeProto

# Ops whose output is never negative.
NONNEGATIVE_OPS = ('Relu', 'Sigmoid', 'Softmax')
# Ops whose output is non-negative when every data input is.
SIGN_KEEPING_OPS = ('MaxPool', 'AveragePool', 'GlobalAveragePool', 'Resize', 'Concat', 'Add',
                    'Mul', 'Identity', 'Reshape', 'Flatten', 'Transpose', 'Split', 'Squeeze',
                    'Unsqueeze')
# Ops that only move or select their first input's values: onnxruntime runs them on uint8
# when the tensors before and after them are quantized with one scale and zero point.
MOVING_OPS = ('Reshape', 'Transpose', 'Split', 'Flatten', 'Squeeze', 'Unsqueeze', 'MaxPool')


def place_uint8(g: Graph, producers: Dict[str, 'NodeProto'],
                layers: Sequence[Tuple[Any, Any, float]], steps: Dict[str, float],
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
        g.insert_qdq(tensor, scale, zero, np.uint8, g.consumers(tensor))


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
                layers: Sequence[Tuple[Any, Any, float]], steps: Dict[str, float]
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


def _layer_output(g: Graph, node: Any) -> str:
    """The tensor a requantization can follow: the layer output, or its Relu's."""
    relu = g.sole_consumer(node.output[0], 'Relu')
    return relu.output[0] if relu is not None else node.output[0]


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


def drop_idle_uint8(graph: Any) -> int:
    """Removes, in place, the Q/DQ regions of the onnxruntime graph that no INT8 kernel uses
    any more; returns how many QuantizeLinear ops went. place_uint8 quantizes a layer's output
    so that onnxruntime fuses the layer into QLinearConv / QLinearMatMul, and the ops that
    move the tensor on, up to the DequantizeLinear ops of its float readers. Once the layer
    runs in float (onnxruntime_engine.with_float_kinds), such a region only rounds a float
    tensor at the cost of a quantize and a dequantize per value. A region (a QuantizeLinear,
    the MOVING_OPS after it, the DequantizeLinear ops that end it) is kept when a quantized
    layer (its input and weight dequantized) writes or reads it, or a residual Add that
    onnxruntime runs as QLinearAdd (both inputs dequantized, the output, or its Relu's,
    quantized) next to a kept region does; the Adds are found as a fixed point, so a chain of
    them with no quantized layer at either end goes as a whole. A region that reaches an op
    other than those (a Concat: its other inputs stay uint8) or a graph output is kept.
    Dropping a region drops a rounding: it never loses accuracy against the INT8 graph."""
    producer = producers_of(graph.node)
    readers = readers_of(graph.node)
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}

    def made_by(name: str, op_type: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == op_type

    def quantized_layer(node: Any) -> bool:
        return node.op_type in ('Conv', 'MatMul', 'Gemm') and len(node.input) > 1 and \
            made_by(node.input[0], 'DequantizeLinear') and \
            made_by(node.input[1], 'DequantizeLinear')

    # (QuantizeLinear, its DequantizeLinear ops, the op that writes its input) per region
    regions: List[Tuple[Any, List[Any], Any]] = []
    owner: Dict[int, int] = {}  # id(DequantizeLinear) -> index of its region
    kept = set()
    for q in [n for n in graph.node if n.op_type == 'QuantizeLinear' and n.input[0] not in inits]:
        index, dqs, stack = len(regions), [], [q.output[0]]
        while stack:
            tensor = stack.pop()
            if tensor in outputs:
                kept.add(index)
            for user in readers.get(tensor, []):
                if user.op_type == 'DequantizeLinear':
                    dqs.append(user)
                    owner[id(user)] = index
                    if user.output[0] in outputs:
                        kept.add(index)
                elif user.op_type in MOVING_OPS:
                    stack.extend(user.output)
                elif user.op_type != 'Shape':
                    kept.add(index)
        writer = producer.get(q.input[0])
        while writer is not None and writer.op_type in MOVING_OPS + ('Relu',):
            writer = producer.get(writer.input[0])
        regions.append((q, dqs, writer))
        if (writer is not None and quantized_layer(writer)) or any(
                quantized_layer(u) and u.input[0] == dq.output[0]
                for dq in dqs for u in readers.get(dq.output[0], [])):
            kept.add(index)
    adds: List[Set[int]] = []  # the regions each Add onnxruntime runs as QLinearAdd touches
    for i, (_, _, writer) in enumerate(regions):
        if writer is not None and writer.op_type == 'Add' and \
                all(made_by(name, 'DequantizeLinear') for name in writer.input):
            adds.append({i} | {owner[id(producer[name])] for name in writer.input
                               if id(producer[name]) in owner})
    while True:
        grown = {i for touched in adds if touched & kept for i in touched} - kept
        if not grown:
            break
        kept |= grown
    dropped = 0
    for i, (q, dqs, _) in enumerate(regions):
        if i in kept:
            continue
        # the quantized tensor is the float one again, and then (a dequantize may read the
        # quantize itself) each dequantize's readers read what the dequantize reads
        for node in [q] + dqs:
            old = node.output[0]
            redirect(old, node.input[0], [n for n in graph.node if old in n.input])
        for node in [q] + dqs:
            graph.node.remove(node)
        dropped += 1
    return dropped
