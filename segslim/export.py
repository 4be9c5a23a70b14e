"""Inference-model export: output heads, the staged model folder and deploy.yaml (the ONNX
file beside the Paddle program: segslim.onnx.export)."""
import logging
import os
import warnings
from typing import Any, List, Optional, Sequence

from segslim._paddle import paddle
from segslim.config import Yaml
from segslim.decoders import frozen_decoder
from segslim.errors import UserError
from segslim.logger import logger
from segslim.modeldir import Deploy, deploy_transforms, staged_model_folder, write_deploy
from segslim.program import fold_conv_bias_reshape

OUTPUT_OPS = ('argmax', 'softmax', 'none')


class InferenceModel(paddle.nn.Layer):
    """The segmentation net with its deploy head on the first logit, as PaddleSeg 2.8's
    WrappedModel: argmax -> int32 N,H,W labels; softmax -> float32 N,C,H,W; none -> logits.
    PaddleSeg's clients (deploy/python/infer.py, its C++ demo, FastDeploy) rely on N,H,W."""

    def __init__(self, model: paddle.nn.Layer, output_op: str = 'argmax'):
        super().__init__()
        self.model = model
        self.output_op = output_op

    # jit.save matches the input spec by parameter name: keep it `x`.
    def forward(self, x):
        logit = self.model(x)[0]
        if self.output_op == 'argmax':
            return paddle.argmax(logit, axis=1, dtype='int32')
        if self.output_op == 'softmax':
            return paddle.nn.functional.softmax(logit, axis=1)
        return logit


def output_op_of(output_op: Optional[str], with_softmax: bool, without_argmax: bool) -> str:
    """Resolves --output_op and the --without_argmax/--with_softmax aliases as PaddleSeg 2.8's
    qat_export does: the aliases override --output_op, --with_softmax last."""
    if with_softmax:
        return 'softmax'
    if without_argmax:
        return 'none'
    return output_op or 'argmax'


def export_inference_model(model: paddle.nn.Layer, cfg: Yaml, save_dir: str,
                           output_op: str = 'argmax',
                           input_shape: Optional[Sequence[int]] = None,
                           quanter: Any = None,
                           int8_ops: Optional[Sequence[str]] = None) -> int:
    """Saves model.pdmodel, model.pdiparams and deploy.yaml into save_dir; returns the number
    of conv biases folded into their convs.

    With `quanter` (a PaddleSlim QAT object) the program holds quantize_linear /
    dequantize_linear ops and INT8 weights, and deploy.yaml names the op types the oneDNN
    engine should run in INT8 (`int8_ops`, from quant_config). Files are staged in a
    temporary folder and each moved into place, so an existing model in save_dir is
    replaced, not mixed.
    """
    if output_op not in OUTPUT_OPS:
        raise UserError(f'--output_op {output_op} is not one of {OUTPUT_OPS}')
    shape: List[Optional[int]] = list(input_shape) if input_shape else [None, 3, None, None]
    if input_shape and (len(input_shape) != 4 or min(input_shape) <= 0):
        raise UserError('--input_shape takes four positive numbers N C H W, e.g. 1 3 512 512; '
                        'got {}'.format(' '.join(map(str, input_shape))))
    with staged_model_folder(save_dir) as stage:
        model.eval()
        net = InferenceModel(model, output_op)
        net.eval()
        spec = [paddle.static.InputSpec(shape=shape, dtype='float32', name='x')]
        prefix = os.path.join(stage, 'model')
        with frozen_decoder(model):
            if quanter is not None:
                # Paddle's QAT save warns about its own internal calls; keep the log readable.
                io_logger = logging.getLogger('paddle.static.io')
                level = io_logger.level
                io_logger.setLevel(logging.ERROR)
                try:
                    with warnings.catch_warnings():
                        warnings.filterwarnings('ignore', message='full_graph=False')
                        quanter.save_quantized_model(net, prefix, input_spec=spec)
                finally:
                    io_logger.setLevel(level)
            else:
                paddle.jit.save(paddle.jit.to_static(net, input_spec=spec, full_graph=True),
                                prefix)
        folded = fold_conv_bias_reshape(prefix + '.pdmodel')
        section: Deploy = {
            'model': 'model.pdmodel',
            'params': 'model.pdiparams',
            'transforms': deploy_transforms(cfg),
            'input_shape': shape,
            'output_op': output_op,
            'output_dtype': 'int32' if output_op == 'argmax' else 'float32',
            'quantized': quanter is not None,
        }
        if quanter is not None and int8_ops:
            section['int8_ops'] = list(int8_ops)
        write_deploy(stage, section)
    logger.info('Exported %s inference model (%s head, %d conv biases folded) to %s',
                'INT8' if quanter is not None else 'FP32', output_op, folded, save_dir)
    return folded
