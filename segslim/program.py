"""Saved Paddle inference programs: reading them, the op types they hold, and the two
rewrites the project applies (conv-bias fold for oneDNN, observer strip for engines that
apply every quantize/dequantize pair). Every list of Paddle op types lives here."""
from typing import Any, Collection, Dict, List, Optional, Set, Tuple

from segslim.errors import UserError
from segslim.fileio import write_bytes

# Program op types of PaddleSlim's quantizable layer types.
LAYER_OPS: Dict[str, Tuple[str, ...]] = {
    'Conv2D': ('conv2d', 'depthwise_conv2d'),
    'Linear': ('mul', 'matmul', 'matmul_v2'),
    'Conv2DTranspose': ('conv2d_transpose',),
}
# Ops whose inputs a QAT/PTQ model really fake-quantizes; other quantize/dequantize pairs
# only carry scales.
QUANTIZED_OP_TYPES = tuple(op for ops in LAYER_OPS.values() for op in ops)
# Their inputs that hold the weight (a matmul's second operand): dequantized when the layer
# is quantized, the plain parameter when a skip list left it FP32.
WEIGHT_INPUTS = ('Filter', 'Y', 'W')
# The ops that mark a program as quantized.
QUANT_OP_TYPES = ('quantize_linear', 'dequantize_linear', 'fake_quantize_dequantize_abs_max',
                  'fake_channel_wise_quantize_dequantize_abs_max',
                  'fake_quantize_dequantize_moving_average_abs_max')
# Quantizable work in an optimized oneDNN program, as counted in every op summary.
CONV_TYPES = ('conv2d', 'depthwise_conv2d', 'fused_conv2d', 'conv2d_transpose')
MATMUL_TYPES = ('matmul', 'matmul_v2', 'fused_matmul', 'fc', 'mul')
# Op types the oneDNN engine may be told to run in INT8 (quant_config.int8_ops).
ONEDNN_INT8_OPS = CONV_TYPES + ('fc', 'matmul', 'matmul_v2', 'fused_matmul', 'pool2d',
                                'concat')
# A conv's (groups, in channels, out channels, kernel h, kernel w, stride h, stride w):
# conv_shape of a program's op, or read from oneDNN's verbose log.
ConvShape = Tuple[int, int, int, int, int, int, int]
# The default INT8 set: Paddle's own default crashes on concat once the program is fused,
# and pooling in INT8 ran no faster but agreed less with the QAT model.
DEFAULT_INT8_OPS = ('conv2d', 'depthwise_conv2d', 'fused_conv2d')


def read_program(model_file: str) -> Any:
    """The ProgramDesc of a saved inference program, or a one-line error naming the file."""
    from paddle.base import core
    try:
        with open(model_file, 'rb') as f:
            return core.ProgramDesc(f.read())
    except Exception as e:  # paddle raises generic errors for a bad file
        raise UserError(f'{model_file} is not a Paddle inference program ({type(e).__name__}); '
                        're-export the '
                        'model') from e


def block_ops(desc: Any) -> List[Any]:
    """The ops of block 0 (keep `desc` alive while using them: they point into it)."""
    block = desc.block(0)
    return [block.op(i) for i in range(block.op_size())]


def program_op_types(model_file: str) -> List[str]:
    """Op types of block 0 of a saved program."""
    desc = read_program(model_file)
    return [op.type() for op in block_ops(desc)]


def program_input_names(model_file: str) -> List[str]:
    """Names the program's feed ops fill, in order."""
    desc = read_program(model_file)
    feeds = [(op.attr('col'), op.output('Out')[0]) for op in block_ops(desc)
             if op.type() == 'feed']
    return [name for _, name in sorted(feeds)]


def consumers_map(ops: List[Any]) -> Dict[str, List[int]]:
    """{variable name: indices of the ops that read it}."""
    consumers: Dict[str, List[int]] = {}
    for i, op in enumerate(ops):
        for name in op.input_names():
            for var in op.input(name):
                consumers.setdefault(var, []).append(i)
    return consumers


def producers_map(ops: List[Any]) -> Dict[str, int]:
    """{variable name: index of the op that writes it last}."""
    producer: Dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.output_names():
            for var in op.output(name):
                producer[var] = i
    return producer


def quant_pair(ops: List[Any], producer: Dict[str, int], name: str
               ) -> Optional[Tuple[int, int, str]]:
    """(quantize index, dequantize index, the tensor they quantize) when `name` is the output
    of a quantize_linear -> dequantize_linear pair, else None (e.g. weights stored quantized:
    a dequantize op alone)."""
    dq = producer.get(name)
    if dq is None or ops[dq].type() != 'dequantize_linear':
        return None
    q = producer.get(ops[dq].input('X')[0])
    if q is None or ops[q].type() != 'quantize_linear':
        return None
    return q, dq, ops[q].input('X')[0]


def _remove_ops(desc: Any, indices: List[int], drop_vars: bool = False) -> None:
    block = desc.block(0)
    for i in sorted(indices, reverse=True):
        op = block.op(i)
        dead = [v for n in op.output_names() for v in op.output(n)] if drop_vars else []
        block._remove_op(i, i + 1)
        for name in dead:
            block._remove_var(name.encode())


def _save_without(desc: Any, remove: List[int], model_file: str) -> int:
    """Writes the program without the ops at `remove` (and their outputs) when there are any;
    returns how many."""
    if remove:
        _remove_ops(desc, remove, drop_vars=True)
        desc.flush()
        write_bytes(model_file, desc.serialize_to_string())
    return len(remove)


def fold_conv_bias_reshape(model_file: str) -> int:
    """Rewrites `reshape2(bias[C]) -> elementwise_add(x, ., axis=-1)` into
    `elementwise_add(x, bias, axis=1)` in a saved program; returns how many were rewritten.

    Paddle 2.6 exports every conv bias through that reshape; oneDNN's conv/bias/BN/activation
    fuse passes do not match it, which leaves BN unfolded and INT8 convs with FP32 outputs.
    The weights file is untouched: the same persistable variables stay in the program.
    """
    desc = read_program(model_file)
    block = desc.block(0)
    ops = block_ops(desc)
    consumers = consumers_map(ops)
    remove = []
    for i, op in enumerate(ops):
        if op.type() != 'reshape2':
            continue
        src, out = op.input('X')[0], op.output('Out')[0]
        src_var = block.find_var(src.encode())
        users = consumers.get(out, [])
        if src_var is None or not src_var.persistable() or len(src_var.shape()) != 1:
            continue
        if list(op.attr('shape')) != [1, src_var.shape()[0], 1, 1] or len(users) != 1:
            continue
        add = ops[users[0]]
        if add.type() != 'elementwise_add' or add.input('Y') != [out] or \
                add.attr('axis') not in (-1, 1):
            continue
        add.set_input('Y', [src])
        add._set_attr('axis', 1)
        remove.append(i)
    return _save_without(desc, remove, model_file)



def drop_inference_dropout(model_file: str) -> int:
    """Removes the dropout ops of a saved inference program that are identities there
    (upscale_in_train, is_test): their consumers read the dropout's input. PaddleSlim's
    reconstruction copies ops into a training program and refuses a dropout without its Mask
    output. Returns how many were removed."""
    desc = read_program(model_file)
    ops = block_ops(desc)
    remove = []
    for i, op in enumerate(ops):
        if op.type() != 'dropout' or not op.attr('is_test') or \
                op.attr('dropout_implementation') != 'upscale_in_train':
            continue
        src, out = op.input('X')[0], op.output('Out')[0]
        for user in consumers_map(ops).get(out, []):
            other = ops[user]
            for slot in other.input_names():
                other.set_input(slot, [src if v == out else v for v in other.input(slot)])
        remove.append(i)
    return _save_without(desc, remove, model_file)

def strip_observer_quantization(model_file: str, out_file: str) -> int:
    """Writes to `out_file` the program of `model_file` without the quantize/dequantize pairs
    that feed no quantized convolution or matrix product; returns how many pairs were
    removed.

    QAT and PTQ exports also carry pairs on layer outputs (PaddleSlim's output-scale
    observers: on conv outputs before batch norm, on adds, activations, pools), and PTQ
    keeps them on the inputs of the layers a skip list leaves in FP32 (their weights are not
    quantized). Paddle Inference reads them as scales only, and the model never rounds those
    tensors; an engine that applies every pair (OpenVINO, onnxruntime) would round them to 8
    bits. The variables stay declared, so the unchanged params file still loads with the
    program.
    """
    desc = read_program(model_file)
    ops = block_ops(desc)
    consumers = consumers_map(ops)
    producer = producers_map(ops)

    def quantized(op: Any) -> bool:
        """A conv/matmul that runs INT8: its weight (or second operand) is dequantized."""
        if op.type() not in QUANTIZED_OP_TYPES:
            return False
        operands = [a for n in WEIGHT_INPUTS if n in op.input_names() for a in op.input(n)]
        return any(a in producer and ops[producer[a]].type() == 'dequantize_linear'
                   for a in operands)
    remove = []
    for i, op in enumerate(ops):
        if op.type() != 'dequantize_linear':
            continue
        out = op.output('Y')[0]
        pair = quant_pair(ops, producer, out)
        if pair is None or consumers.get(op.input('X')[0], []) != [i]:
            continue  # weights (stored quantized) or a shared tensor: keep
        q, _, original = pair
        users = consumers.get(out, [])
        if any(quantized(ops[u]) for u in users):
            continue
        for u in users:
            for name in ops[u].input_names():
                args = ops[u].input(name)
                if out in args:
                    ops[u].set_input(name, [original if a == out else a for a in args])
        remove += [q, i]
    _remove_ops(desc, remove)
    desc.flush()
    write_bytes(out_file, desc.serialize_to_string())
    return len(remove) // 2


def conv_shape(block: Any, op: Any, producer: Dict[str, int], ops: List[Any]
               ) -> ConvShape:
    """(groups, in channels, out channels, kernel h, kernel w, stride h, stride w) of a conv
    op, read through the dequantize op of a quantized filter."""
    name = op.input('Filter')[0]
    if name in producer and ops[producer[name]].type() == 'dequantize_linear':
        name = ops[producer[name]].input('X')[0]
    oc, icg, kh, kw = block.find_var(name.encode()).shape()
    groups = max(int(op.attr('groups')), 1)
    sh, sw = op.attr('strides')
    if op.type() == 'conv2d_transpose':  # its filter is in channels x out channels per group
        return (groups, oc, icg * groups, kh, kw, sh, sw)
    return (groups, icg * groups, oc, kh, kw, sh, sw)


# The inputs of each quantizable op type that its INT8 kernel reads quantized (a matmul's Y
# is a weight, dequantized alone, or an activation with its own quantize/dequantize pair).
ACTIVATION_INPUTS = {'conv2d': ('Input',), 'depthwise_conv2d': ('Input',),
                     'conv2d_transpose': ('Input',), 'matmul': ('X', 'Y'),
                     'matmul_v2': ('X', 'Y'), 'mul': ('X', 'Y')}


def _layer_output(op: Any) -> str:
    return op.output('Output' if 'Output' in op.output_names() else 'Out')[0]


def input_quantized_layers(model_file: str
                           ) -> Dict[str, Optional[ConvShape]]:
    """{output name: conv_shape (None for a matrix product)} of the convs and matrix products
    whose input is quantized (a quantize/dequantize pair): the layers oneDNN runs in INT8."""
    desc = read_program(model_file)
    ops = block_ops(desc)
    producer = producers_map(ops)
    layers: Dict[str, Optional[ConvShape]] = {}
    for op in ops:
        names = ACTIVATION_INPUTS.get(op.type(), ())
        if not any(quant_pair(ops, producer, a) for n in names if n in op.input_names()
                   for a in op.input(n)):
            continue
        layers[_layer_output(op)] = conv_shape(desc.block(0), op, producer, ops) \
            if 'Filter' in op.input_names() else None
    return layers


def run_layers_in_float(model_file: str, out_file: str, outputs: Collection[str]) -> List[str]:
    """Writes to `out_file` the program of `model_file` with the input quantization taken
    off the convs and matrix products that write `outputs`, so the oneDNN engine runs them in
    float (weights stored INT8 are dequantized as before); returns the output names of the
    layers changed. A quantize/dequantize pair no other op reads any more is removed."""
    desc = read_program(model_file)
    ops = block_ops(desc)
    producer = producers_map(ops)
    changed: List[str] = []
    pairs: Set[Tuple[int, int]] = set()
    for op in ops:
        names = [n for n in ACTIVATION_INPUTS.get(op.type(), ()) if n in op.input_names()]
        if not names or _layer_output(op) not in outputs:
            continue
        took = False
        for name in names:
            args = op.input(name)
            found = [quant_pair(ops, producer, a) for a in args]
            op.set_input(name, [p[2] if p else a for a, p in zip(args, found)])
            pairs.update((p[0], p[1]) for p in found if p)
            took = took or any(found)
        if took:
            changed.append(_layer_output(op))
    # a pair nothing reads any more goes; PaddleSlim writes the pairs of two Linears that
    # quantize one tensor (SegFormer's query and key-value) to the same names, so every
    # pair of those names is looked at, not only the one the producers map points to
    consumers = consumers_map(ops)
    quantized = {ops[q].output('Y')[0] for q, _ in pairs}
    dead = {i for i, op in enumerate(ops) if op.type() == 'dequantize_linear'
            and op.input('X')[0] in quantized and not consumers.get(op.output('Y')[0])}
    dead |= {i for i, op in enumerate(ops) if op.type() == 'quantize_linear'
             and op.output('Y')[0] in quantized
             and set(consumers.get(op.output('Y')[0], ())) <= dead}
    _remove_ops(desc, sorted(dead))
    desc.flush()
    write_bytes(out_file, desc.serialize_to_string())
    return changed


def run_convs_in_fp32(model_file: str, out_file: str,
                      shapes: Collection[ConvShape]) -> List[str]:
    """run_layers_in_float for the INT8 convs of these shapes (conv_shape)."""
    return run_layers_in_float(model_file, out_file, [
        out for out, shape in input_quantized_layers(model_file).items() if shape in shapes])
