"""ONNX export beside the Paddle program (--to_onnx, --onnx_target).

paddle2onnx converts the float program; for a quantized folder the float program is the
quantized one with every quantize/dequantize pair taken out and the INT8 weights dequantized,
and the scales of those pairs go to segslim.onnx.qdq, which places the QuantizeLinear /
DequantizeLinear nodes where the target runs them as INT8 kernels."""
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from segslim._paddle import paddle, static_mode
from segslim.errors import UserError, require
from segslim.fileio import write_bytes
from segslim.logger import logger, quiet_native_output
from segslim.modeldir import model_inputs, read_deploy, update_deploy
from segslim.onnx.graph import GraphError
from segslim.onnx.qdq import ProgramScales, WeightQuant, quantize_graph
from segslim.options import ONNX_TARGETS
from segslim.program import LAYER_OPS

ONNX_OPSET = 13  # QuantizeLinear/DequantizeLinear with per-channel axes
# Images that measure the ranges the program has no scale for (onnxruntime target).
CALIBRATION_IMAGES = 8
# (activation input, weight input) of the layer ops whose scales the writer places.
LAYER_INPUTS = {op: ('Input', 'Filter') for op in LAYER_OPS['Conv2D']}
LAYER_INPUTS.update({op: ('X', 'Y') for op in LAYER_OPS['Linear']})


def import_onnx() -> Any:
    return require('onnx', '--to_onnx', 'onnx')


# paddle2onnx (up to 2.1.0) has wheels up to Python 3.12 only: no ONNX export from 3.13 on
NO_PADDLE2ONNX_WHEEL = (3, 13)


def require_onnx_export(python: Optional[Tuple[int, int]] = None) -> None:
    """A one-line error now, before any work, when the ONNX export cannot run (`python`:
    the interpreter's version, this one's by default)."""
    python = python or (sys.version_info[0], sys.version_info[1])
    try:
        require('paddle2onnx', '--to_onnx', 'onnx')
    except UserError:
        if python < NO_PADDLE2ONNX_WHEEL:
            raise
        raise UserError('--to_onnx needs paddle2onnx, which has no wheel for Python {}.{} '
                        '(3.12 is the last): export the ONNX model from a Python 3.12 '
                        'environment (make install PYTHON=python3.12); everything else runs '
                        'here'.format(*python)) from None
    import_onnx()


def dequantized_program(model_dir: str, out_dir: str) -> ProgramScales:
    """Writes to out_dir/model.pdmodel|.pdiparams the folder's program with every
    quantize/dequantize pair removed and its INT8 weights dequantized (what paddle2onnx
    converts as a float graph, variable names kept); returns the scales that were removed."""
    scales = ProgramScales()
    with static_mode():
        exe = paddle.static.Executor(paddle.CPUPlace())
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            with quiet_native_output():
                program, feeds, fetches = paddle.static.load_inference_model(
                    os.path.join(model_dir, 'model'), exe)
            block = program.global_block()

            def value(name: str) -> np.ndarray:
                return np.array(scope.find_var(name).get_tensor())

            ops = list(block.ops)
            producer = {name: op for op in ops for name in op.output_arg_names}
            readers: Dict[str, List[Any]] = {}
            for op in ops:
                for name in op.input_arg_names:
                    readers.setdefault(name, []).append(op)

            def rewire(old: str, new: str) -> List[Any]:
                users = readers.pop(old, [])
                for op in users:
                    op._rename_input(old, new)
                readers.setdefault(new, []).extend(users)
                return users

            removed = set()
            for op in ops:
                if op.type != 'dequantize_linear':
                    continue
                src, out = op.input('X')[0], op.output('Y')[0]
                qmax = float(2 ** (op.attr('bit_length') - 1) - 1)
                scale = value(op.input('Scale')[0]).astype(np.float32).ravel()
                if block.var(src).persistable:  # an INT8 weight, per channel on quant_axis
                    q = value(src)
                    axis = op.attr('quant_axis')
                    shape = [1] * q.ndim
                    shape[axis] = -1
                    w = (q.astype(np.float32) * (scale / qmax).reshape(shape)).astype(np.float32)
                    scope.find_var(src).get_tensor().set(w, paddle.CPUPlace())
                    scales.weights[src] = WeightQuant(q.astype(np.int8), scale / qmax, axis)
                    rewire(out, src)
                    removed.add(id(op))
                    continue
                quant = producer.get(src)
                if quant is None or quant.type != 'quantize_linear':
                    continue
                original = quant.input('X')[0]
                for user in rewire(out, original):
                    names = LAYER_INPUTS.get(user.type)
                    if names and user.input(names[0]) == [original]:
                        weight = user.input(names[1])[0]
                        scales.inputs[_weight_key(weight)] = float(scale[0]) / qmax
                removed.update((id(op), id(quant)))
            for i in reversed([i for i, op in enumerate(ops) if id(op) in removed]):
                block._remove_op(i)
            feed_vars = [block.var(name) for name in feeds]
            with quiet_native_output():
                paddle.static.save_inference_model(os.path.join(out_dir, 'model'), feed_vars,
                                                   fetches, exe, program=program)
    return scales


def _weight_key(name: str) -> str:
    """The parameter name behind a weight input (the dequantized alias before rewiring)."""
    return name.split('.quantized')[0]


def paddle_to_onnx(model_dir: str) -> Any:
    """The float ONNX model of the folder's (float) Paddle program."""
    import paddle2onnx
    onnx = import_onnx()
    try:
        with quiet_native_output():  # its banner and per-op notes
            data = paddle2onnx.export(os.path.join(model_dir, 'model.pdmodel'),
                                      os.path.join(model_dir, 'model.pdiparams'), None,
                                      opset_version=ONNX_OPSET, verbose=False)
    except Exception as e:  # the converter raises generic errors
        raise UserError('paddle2onnx cannot convert {} ({}); drop --to_onnx'.format(
            model_dir, str(e).strip().splitlines()[-1][:160] if str(e) else
            type(e).__name__)) from e
    return onnx.load_from_string(data)


def export_onnx(model_dir: str, target: str = 'onnxruntime',
                calibration_images: Sequence[Union[str, np.ndarray]] = ()) -> str:
    """Writes <model_dir>/model.onnx (FP32, or QDQ INT8 for a quantized folder, placed for
    `target`) and names it and its target in deploy.yaml; returns its path.
    `calibration_images` (paths or BGR arrays) give the ranges the Paddle program has no
    scale for: conv outputs that feed no quantized layer (onnxruntime target only)."""
    require_onnx_export()
    if target not in ONNX_TARGETS:
        raise UserError(f'--onnx_target {target} is not one of {", ".join(ONNX_TARGETS)}')
    deploy_path = os.path.join(model_dir, 'deploy.yaml')
    if not os.path.isfile(os.path.join(model_dir, 'model.pdmodel')) or \
            not os.path.isfile(deploy_path):
        raise UserError(f'{model_dir} holds no exported Paddle model (model.pdmodel and '
                        'deploy.yaml); export it first')
    deploy = read_deploy(model_dir)
    quantized = bool(deploy.get('quantized'))
    if quantized:
        with tempfile.TemporaryDirectory(prefix='segslim-onnx-') as tmp:
            scales = dequantized_program(model_dir, tmp)
            model = paddle_to_onnx(tmp)
        try:
            model, stats = quantize_graph(model, scales, target, model_inputs(
                deploy, calibration_images))
        except GraphError as e:
            raise UserError(f'onnxruntime cannot run the ONNX graph paddle2onnx made of '
                            f'{model_dir} ({e}); export at a fixed input shape (--input_shape N '
                            'C H W; --export_shape of auto_quant.py and compare_methods.py): '
                            'adaptive pooling converts only at a known size') from e
        if stats['uncalibrated']:
            logger.warning('ONNX: %d conv outputs have no calibration images for their range, '
                           'so their convs run in float in onnxruntime; give the config a '
                           'train_dataset or val_dataset', stats['uncalibrated'])
    else:
        model, stats = paddle_to_onnx(model_dir), {}
    out = os.path.join(model_dir, 'model.onnx')
    write_bytes(out, model.SerializeToString())
    update_deploy(model_dir, onnx='model.onnx', onnx_target=target)
    if quantized:
        logger.info('Exported QDQ INT8 ONNX model for %s (opset %d, %d/%d convs and %d/%d '
                    'matmuls with INT8 weights) to %s', target, ONNX_OPSET,
                    stats['int8_convs'], stats['convs'], stats['int8_matmuls'],
                    stats['matmuls'], out)
    else:
        logger.info('Exported FP32 ONNX model (opset %d) to %s', ONNX_OPSET, out)
    return out
