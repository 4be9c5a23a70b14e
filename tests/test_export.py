"""Exported programs: heads, the conv-bias rewrite, INT8 ops, Paddle Inference outputs."""
import os

import numpy as np
import pytest
from conftest import INSTANT

from segslim import builder
from segslim._paddle import paddle
from segslim.config import load_config
from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
from segslim.export import export_inference_model
from segslim.options import EngineOptions
from segslim.program import fold_conv_bias_reshape, program_op_types


@pytest.fixture(scope='module')
def tiny_model():
    paddle.seed(0)
    cfg = load_config(INSTANT)
    return cfg, builder.build_model(cfg)


# PaddleSeg's contract: argmax int32 N,H,W (no channel axis), softmax / logits N,C,H,W.
@pytest.mark.parametrize('head,dtype,shape', [('argmax', np.int32, (2, 64, 96)),
                                              ('softmax', np.float32, (2, 2, 64, 96)),
                                              ('none', np.float32, (2, 2, 64, 96))])
def test_each_head_runs_in_paddle_inference(tiny_model, tmp_path, head, dtype, shape):
    cfg, model = tiny_model
    export_inference_model(model, cfg, str(tmp_path), output_op=head)
    pred = Predictor(str(tmp_path), EngineOptions(device='cpu', cpu_threads=1))
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    out = pred.run(x)
    assert out.dtype == dtype and out.shape == shape
    if head == 'softmax':
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-4)
    assert pred.labels(x).shape == (2, 64, 96)


def test_exported_program_has_no_bias_reshape(tiny_model, tmp_path):
    cfg, model = tiny_model
    folded = export_inference_model(model, cfg, str(tmp_path / 'a'), output_op='none')
    ops = program_op_types(str(tmp_path / 'a' / 'model.pdmodel'))
    assert folded > 40
    assert 'reshape2' not in ops and ops.count('elementwise_add') >= folded
    assert fold_conv_bias_reshape(str(tmp_path / 'a' / 'model.pdmodel')) == 0  # idempotent


def test_bias_rewrite_keeps_outputs(tiny_model, tmp_path, monkeypatch):
    cfg, model = tiny_model
    export_inference_model(model, cfg, str(tmp_path / 'folded'), output_op='none')
    import segslim.export as export_mod
    monkeypatch.setattr(export_mod, 'fold_conv_bias_reshape', lambda path: 0)
    export_inference_model(model, cfg, str(tmp_path / 'plain'), output_op='none')
    assert 'reshape2' in program_op_types(str(tmp_path / 'plain' / 'model.pdmodel'))
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    # native kernels, and oneDNN: the fused conv + bias + BN + activation path the rewrite
    # exists for (the unrewritten program is not fused there)
    for mkldnn in (False, True):
        outs = [Predictor(str(tmp_path / d), EngineOptions(enable_mkldnn=mkldnn)).run(x)
                for d in ('folded', 'plain')]
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        assert np.abs(outs[0]).max() > 1e-3  # real outputs, not zeros


def test_qat_export_program_and_int8_engine(exported):
    ops = program_op_types(os.path.join(exported['int8'], 'model.pdmodel'))
    assert 'quantize_linear' in ops and 'dequantize_linear' in ops and 'reshape2' not in ops
    pred = Predictor(exported['int8'], EngineOptions(device='cpu', precision='int8',
                                                     int8_layers='all'))
    # every conv INT8, but those this CPU has only a reference INT8 kernel for (the engine
    # runs them FP32 and says so)
    assert pred.quantized and (pred.fallback is None) == (not pred.fp32_convs)
    assert pred.ops.conv_ops > 0 and \
        pred.ops.int8_conv_ops + len(pred.fp32_convs) == pred.ops.conv_ops


def test_fp32_model_refuses_int8(exported):
    from segslim.errors import UserError
    with pytest.raises(UserError, match='no quantization scales'):
        Predictor(exported['fp32'], EngineOptions(precision='int8'))
