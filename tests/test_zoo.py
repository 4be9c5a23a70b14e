"""Every shipped config builds and quantizes with its own policy; one config of each model
family also exports INT8 with the argmax head and runs in Paddle Inference (oneDNN INT8),
with at least the INT8 share it promises (the family's other configs share its head and
backbone kind and promise the same; three of the ResNet50_vd heads run on ResNet18_vd)."""
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
# The config of each family that runs end to end: the lightest of the family's variants.
# A family is a model type, apart from the HRNet models (FCN, OCRNet), which are one.
FAMILY_RUNS = {
    'ANN': 'ann/ann_resnet50_os8_cityscapes_1024x512_80k.yml',
    'BiSeNetV2': 'bisenet/bisenet_cityscapes_1024x1024_160k.yml',
    'DANet': 'danet/danet_resnet50_os8_cityscapes_1024x512_80k.yml',
    'DeepLabV3P': 'quick_start/deeplabv3p_resnet18_optic_disc_512x512_1k.yml',
    'DNLNet': 'dnlnet/dnlnet_resnet50_os8_cityscapes_1024x512_80k.yml',
    'EMANet': 'emanet/emanet_resnet50_os8_cityscapes_1024x512_80k.yml',
    'GCNet': 'gcnet/gcnet_resnet50_os8_cityscapes_1024x512_80k.yml',
    # FCN and OCRNet on HRNet: the configs measured their policy on FCN-HRNet_W18_Small_V1
    'HRNet': 'fcn/fcn_hrnetw18_small_v1_humanseg_192x192_mini_supervisely.yml',
    'PPHumanSegLite': 'pp_humanseg_lite/pp_humanseg_lite_mini_supervisely.yml',
    'PPLiteSeg': 'pp_liteseg/pp_liteseg_stdc1_cityscapes_1024x512_scale0.5_160k.yml',
    'PSPNet': 'pspnet/pspnet_resnet50_os8_cityscapes_1024x512_80k.yml',
    'SegFormer': 'segformer/segformer_b0_cityscapes_1024x1024_160k.yml',
    'UNet': 'unet/unet_cityscapes_1024x512_160k.yml',
}


def model_names(cfg):
    model = cfg['model']
    backbone = (model.get('backbone') or {}).get('type')
    return {model['type']} | ({'{}/{}'.format(model['type'], backbone)} if backbone else set())


def family_of(cfg):
    backbone = (cfg['model'].get('backbone') or {}).get('type', '')
    return 'HRNet' if backbone.startswith('HRNet') else cfg['model']['type']


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


def test_every_family_runs_end_to_end_and_shares_its_promise():
    from segslim.config import load_config
    from segslim.quant.qat import quant_config_of
    families = {}
    for path in CONFIGS:
        cfg = load_config(path)
        families.setdefault(family_of(cfg), []).append(
            (os.path.relpath(path, os.path.join(ROOT, 'configs')), quant_config_of(cfg)))
    assert set(families) == set(FAMILY_RUNS), sorted(set(families) ^ set(FAMILY_RUNS))
    for family, members in families.items():
        run = dict(members)[FAMILY_RUNS[family]]
        for path, qcfg in members:
            assert qcfg['int8_ops'] == run['int8_ops'], path
            assert qcfg['int8_share'] == run['int8_share'], path


RUNS = [os.path.join(ROOT, 'configs', p) for p in FAMILY_RUNS.values()]
# The ResNet50_vd OS8 heads share their backbone: ANN's, DNLNet's and EMANet's runs export
# it (the last two fix their heads' input channels to it), and the other heads run end to end
# on its 18-layer sibling (the same ResNet_vd code, half the convs).
LIGHTER_BACKBONE = {'DANet', 'GCNet', 'PSPNet'}


def run_config(path, cfg, tmp_path):
    """The config a family's end-to-end run exports: `path` (loaded as `cfg`), on
    ResNet18_vd for the families of LIGHTER_BACKBONE."""
    if family_of(cfg) not in LIGHTER_BACKBONE:
        return path
    import yaml
    lighter = tmp_path / 'lighter_backbone.yml'
    lighter.write_text(yaml.safe_dump({'_base_': path,
                                       'model': {'backbone': {'type': 'ResNet18_vd'}}}))
    return str(lighter)


@pytest.mark.parametrize('path', [p for p in CONFIGS if p not in RUNS],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_config_builds_and_quantizes(path):
    """The configs that do not run end to end: the model builds and its own policy
    quantizes at least one layer."""
    from segslim import builder
    from segslim.config import load_config
    from segslim.quant.qat import quant_config_of, quant_plan
    cfg = load_config(path)
    plan = quant_plan(builder.build_model(cfg), quant_config_of(cfg))
    assert any(rule == 'quantized' for _, _, rule in plan), path


@pytest.mark.parametrize('path', RUNS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_quantizes_exports_and_runs_int8(path, tmp_path):
    from segslim.bench.models import export_pair
    from segslim.config import load_config
    from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
    from segslim.options import EngineOptions
    from segslim.quant.qat import quant_config_of
    cfg = load_config(path)
    qcfg = quant_config_of(cfg)
    dirs = export_pair(run_config(path, cfg, tmp_path), str(tmp_path), SIZE, calib=1, layers=None,
                       fp32=False)
    import yaml
    deploy = yaml.safe_load(open(os.path.join(dirs['int8'], 'deploy.yaml')))['Deploy']
    assert deploy['int8_ops'] == qcfg['int8_ops']  # the engine op set travels with the model
    # every layer the model quantizes (the promise), whatever INT8 pays for on this CPU
    pred = Predictor(dirs['int8'], EngineOptions(input_shape=(1, 3, SIZE, SIZE),
                                                 int8_layers='all'))
    assert pred.precision == 'int8' and (pred.fallback is None) == (not pred.fp32_convs)
    out = pred.run(np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE))
                   .astype(np.float32))
    assert out.shape == (1, SIZE, SIZE) and out.dtype == np.int32
    ops = pred.ops
    promise = qcfg['int8_share']
    assert ops.conv_ops > 0
    # convs the engine runs FP32 for want of a fast INT8 kernel on this CPU are quantized
    quantized = ops.int8_conv_ops + len(pred.fp32_convs)
    assert quantized / ops.conv_ops >= promise.get('conv', 0.0), ops
    if ops.matmul_ops:
        assert ops.int8_matmul_ops / ops.matmul_ops >= promise.get('matmul', 0.0)
