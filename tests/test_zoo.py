"""Every shipped config builds, quantizes with its own policy, exports INT8 with the argmax
head and runs in Paddle Inference (oneDNN INT8), with at least the INT8 share it promises."""
import glob
import os

import numpy as np
import pytest

from conftest import ROOT

CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*', '*.yml'))
                 if os.sep + '_base_' + os.sep not in p)
# What PaddleSeg's QAT tables and test chains quantize, plus BiSeNetV2 and UNet.
ZOO_MODELS = {
    'ANN', 'DANet', 'DeepLabV3P', 'DNLNet', 'EMANet', 'GCNet', 'PSPNet',
    'PPLiteSeg/STDC1', 'PPLiteSeg/STDC2', 'PPHumanSegLite', 'FCN/HRNet_W18',
    'FCN/HRNet_W18_Small_V1', 'OCRNet/HRNet_W18', 'OCRNet/HRNet_W48',
    'SegFormer/MixVisionTransformer_B0', 'DeepLabV3P/ResNet50_vd', 'BiSeNetV2', 'UNet'}
SIZE = 128


def model_names(cfg):
    model = cfg['model']
    backbone = (model.get('backbone') or {}).get('type')
    return {model['type']} | ({'{}/{}'.format(model['type'], backbone)} if backbone else set())


def test_zoo_holds_every_model():
    from segslim.config import load_config
    assert len(CONFIGS) >= 20
    found = set()
    for path in CONFIGS:
        found |= model_names(load_config(path))
    assert ZOO_MODELS <= found, sorted(ZOO_MODELS - found)


def test_every_config_names_its_int8_promise():
    from segslim.config import load_config
    for path in CONFIGS:
        qcfg = load_config(path).get('quant_config') or {}
        assert 'int8_share' in qcfg, path


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_quantizes_exports_and_runs_int8(path, tmp_path):
    from segslim.config import load_config
    from segslim.deploy.predictor import EngineOptions, Predictor
    from segslim.model_bench import export_pair
    from segslim.quant import quant_config_of
    cfg = load_config(path)
    qcfg = quant_config_of(cfg)
    dirs = export_pair(path, str(tmp_path), SIZE, calib=1, layers=None, fp32=False)
    import yaml
    deploy = yaml.safe_load(open(os.path.join(dirs['int8'], 'deploy.yaml')))['Deploy']
    assert deploy['int8_ops'] == qcfg['int8_ops']  # the engine op set travels with the model
    pred = Predictor(dirs['int8'], EngineOptions(input_shape=(1, 3, SIZE, SIZE)))
    assert pred.precision == 'int8' and pred.fallback is None
    out = pred.run(np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE))
                   .astype(np.float32))
    assert out.shape == (1, SIZE, SIZE) and out.dtype == np.int32
    engine = pred.engine
    promise = qcfg['int8_share']
    assert engine['conv_ops'] > 0
    assert engine['int8_conv_ops'] / engine['conv_ops'] >= promise.get('conv', 0.0), engine
    if engine['matmul_ops']:
        assert engine['int8_matmul_ops'] / engine['matmul_ops'] >= promise.get('matmul', 0.0)
