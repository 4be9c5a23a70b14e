"""Rewrites of a converted OpenVINO model before it is compiled: which FakeQuantize ops
stay (observers dropped), where the quantization sits (shared with the ops that read the
same tensor, moved above layout ops), which kinds of layer run in float, and 7-bit weights
for CPUs without VNNI (the argmax head's layout: openvino_head)."""
from typing import Any, List, Optional, Tuple

import numpy as np

from segslim.deploy.engine import seven_bit
from segslim.deploy.int8_kinds import conv_kind

# Converted-model ops whose inputs a QAT model fake-quantizes (PaddleSlim's Conv2D/Linear).
QUANTIZED_CONSUMERS = ('Convolution', 'GroupConvolution', 'ConvolutionBackpropData', 'MatMul')
# Ops that may take a conv's quantized input too (share_quantized_inputs): the plugin runs
# them on INT8 data, as NNCF and onnxruntime's quantize_static quantize them.
INT8_PASSTHROUGH = ('Concat', 'AvgPool', 'MaxPool', 'AdaptiveAvgPool', 'AdaptiveMaxPool',
                    'ReduceMean', 'ReduceMax', 'Add', 'Interpolate')
# Those of them that are the int8_kinds kind `pool`: whether they read the INT8 tensor is
# timed like a kind of layer (the plugin's INT8 max pool over 36 channels on AVX2 ran 9x
# slower than its f32 one: HumanSeg-Lite's stem).
POOLS = ('AvgPool', 'MaxPool', 'AdaptiveAvgPool', 'AdaptiveMaxPool', 'ReduceMean', 'ReduceMax')
# Ops that per-tensor rounding commutes with exactly (hoist_quantization).
QUANTIZATION_COMMUTES = ('Concat', 'Reshape', 'Transpose', 'Squeeze', 'Unsqueeze')
# Ops that split a tensor into parts (hoist_quantization with `splits`).
SPLITS = ('Split', 'VariadicSplit')
# Ops between a weighted op and its dequantize Multiply (per-channel scales get reshaped).
WEIGHT_PATH_OPS = ('Reshape', 'Unsqueeze', 'Squeeze', 'Transpose', 'Convert')


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


def share_quantized_inputs(model: Any, pools: bool = True) -> int:
    """Where a tensor feeds a conv or matrix product through one FakeQuantize and also feeds
    INT8_PASSTHROUGH ops directly (the POOLS only if `pools`), those take the FakeQuantize's
    output as well; returns how many inputs changed. A QAT program quantizes a layer's input
    on that layer's edge only, so the producer of a tensor that STDC's or BiSeNet's blocks
    also concatenate or pool wrote float for those and quantized it again for the conv;
    sharing the quantized tensor lets the producing conv write u8 (its requantization fused)
    for all of them."""
    done = 0
    for user, fq in _shareable(model):
        if pools or user.get_node().get_type_name() not in POOLS:
            user.replace_source_output(fq.output(0))
            done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


def shareable_pools(model: Any) -> int:
    """How many POOLS inputs share_quantized_inputs would give a quantized tensor."""
    return sum(user.get_node().get_type_name() in POOLS for user, _ in _shareable(model))


def _shareable(model: Any) -> List[Tuple[Any, Any]]:
    """(input, FakeQuantize) of each INT8_PASSTHROUGH op's input that reads a tensor which
    one FakeQuantize, feeding a layer, also reads."""
    found: List[Tuple[Any, Any]] = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == 'FakeQuantize':
            continue
        for out in op.outputs():
            users = list(out.get_target_inputs())
            fqs = [u.get_node() for u in users if u.get_node().get_type_name() == 'FakeQuantize']
            if len(fqs) != 1 or not _feeds_layer(fqs[0]):
                continue
            found.extend((user, fqs[0]) for user in users
                         if user.get_node().get_type_name() in INT8_PASSTHROUGH)
    return found


def _feeds_layer(fq: Any) -> bool:
    return any(u.get_node().get_type_name() in QUANTIZED_CONSUMERS
               for u in fq.output(0).get_target_inputs())


def hoist_quantization(model: Any, splits: bool = False) -> int:
    """Moves each per-tensor FakeQuantize above the QUANTIZATION_COMMUTES op it reads when
    that op feeds nothing else (one FakeQuantize per input of a Concat; a ShapeOf reads only
    the shape), repeatedly; returns how many moved. Rounding commutes with these ops exactly,
    so the answers stay the same, and the quantization reaches the conv or matrix product
    that produced the tensor, which then writes INT8: SegFormer's head transposed and
    concatenated its 128x128x256 float tokens before quantizing them for the fusing conv.
    With `splits`, also above a SPLITS op whose other outputs only concats read: the channel
    shuffle of a ShuffleNet unit (concat, reshape, transpose, reshape, split), whose conv
    quantizes one half, then runs on INT8 end to end; the half passed through to the next
    unit's concat is rounded too, which the FP32 model does not do (quantize_static and
    onnxruntime's uint8 regions round it as well)."""
    fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize']
    moved = 0
    if splits:  # first, before a concat's quantization reaches the other half of a split
        for fq in fqs:
            if _passes_through(fq.input_value(0)) and _move_up(fq) is not None:
                moved += 1
        fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize']
    while fqs:
        fq = fqs.pop()
        node = fq.input_value(0).get_node()
        above = _move_up(fq) if node.get_type_name() in QUANTIZATION_COMMUTES and \
            node.get_output_size() == 1 else None
        if above is not None:
            fqs.extend(above)
            moved += 1
    if moved:
        model.validate_nodes_and_infer_types()
    return moved


def _move_up(fq: Any) -> Optional[List[Any]]:
    """Moves a per-tensor FakeQuantize from the output of the op it reads (which nothing
    else but ShapeOf reads) onto that op's data inputs (every input of a Concat, else the
    first); returns the new FakeQuantize ops, None when it stays."""
    import openvino.opset13 as ops
    source = fq.input_value(0)
    node = source.get_node()
    ranges = _scalar_ranges(fq)
    readers = [t for t in source.get_target_inputs() if t.get_node().get_type_name() != 'ShapeOf']
    if ranges is None or len(readers) != 1:
        return None
    levels = fq.get_attributes()['levels']
    above = []
    for i in range(node.get_input_size()) if node.get_type_name() == 'Concat' else [0]:
        above.append(ops.fake_quantize(node.input_value(i), *ranges, levels))
        node.input(i).replace_source_output(above[-1].output(0))
    fq.output(0).replace(source)
    return above


def hoistable_splits(model: Any) -> int:
    """How many FakeQuantize ops hoist_quantization with `splits` would move above a split
    (the int8_kinds kind `shuffle`)."""
    return sum(_passes_through(op.input_value(0)) and _scalar_ranges(op) is not None
               for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize')


def _passes_through(source: Any) -> bool:
    """Whether `source` is an output of a SPLITS op whose other outputs only concats read."""
    node = source.get_node()
    if node.get_type_name() not in SPLITS:
        return False
    return all(t.get_node().get_type_name() == 'Concat'
               for out in node.outputs() if out != source for t in out.get_target_inputs())


def _scalar_ranges(fq: Any) -> Optional[List[Any]]:
    """The four range inputs of a FakeQuantize as scalar constants, or None unless each is
    a one-value Constant (per-tensor)."""
    import openvino.opset13 as ops
    ranges = []
    for i in range(1, 5):
        node = fq.input_value(i).get_node()
        if node.get_type_name() != 'Constant' or node.get_data().size != 1:
            return None
        ranges.append(ops.constant(node.get_data().reshape(())))
    return ranges


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
    (the ops that shared it get its input back). A matrix product's dequantized INT8 weight
    becomes one float constant: the plugin keeps INT8 weights of a float matrix product
    compressed (with its f32 kernel decompressing the weights, SegFormer-B0's float-matmul
    variant ran 1.3-1.5 % slower, whole model, than with float weights)."""
    import openvino.opset13 as ops
    model = model.clone()
    if kinds:
        for op, kind in quantized_kinds(model):
            if kind in kinds:
                fq = op.input_value(0).get_node()
                op.input(0).replace_source_output(fq.input_value(0))
                if not _feeds_layer(fq):
                    fq.output(0).replace(fq.input_value(0))
                weight = op.input_value(1)
                weight = _constant_value(weight) if kind == 'matmul' and \
                    weight.get_node().get_type_name() != 'Constant' else None
                if weight is not None:
                    op.input(1).replace_source_output(ops.constant(weight).output(0))
        model.validate_nodes_and_infer_types()
    return model


def _constant_value(output: Any, depth: int = 8) -> Optional[np.ndarray]:
    """The value of an op output computed from constants only (each op's own evaluate)
    within `depth` ops (a weight's dequantization takes a few), else None: an activation's
    path is not walked up the model."""
    import openvino as ov
    node = output.get_node()
    if node.get_type_name() == 'Constant':
        return node.get_data()
    if depth == 0:
        return None
    inputs = [_constant_value(node.input_value(i), depth - 1)
              for i in range(node.get_input_size())]
    if not inputs or any(v is None for v in inputs):
        return None
    outs = [ov.Tensor(node.get_output_element_type(i), node.get_output_shape(i))
            for i in range(node.get_output_size())]
    if not node.evaluate(outs, [ov.Tensor(np.ascontiguousarray(v)) for v in inputs]):
        return None
    return outs[output.get_index()].data.copy()


def _through(node: Any, stop: str) -> Any:
    """The first `stop` op up the data input (input 0) of `node` through WEIGHT_PATH_OPS,
    or None."""
    while node.get_type_name() != stop:
        if node.get_type_name() not in WEIGHT_PATH_OPS or node.get_input_size() == 0:
            return None
        node = node.input_value(0).get_node()
    return node


def multiplies_activations(model: Any) -> bool:
    """Whether a MatMul of the model multiplies two computed tensors (neither input a
    constant through WEIGHT_PATH_OPS): attention's scores and weighted sum, which mark a
    transformer (SegFormer); a Linear layer's MatMul reads a constant."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == 'MatMul' and not any(
                _constant(op.input_value(i).get_node()) for i in range(2)):
            return True
    return False


def _constant(node: Any) -> bool:
    while node.get_type_name() in WEIGHT_PATH_OPS and node.get_input_size():
        node = node.input_value(0).get_node()
    return bool(node.get_type_name() == 'Constant')


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
