"""The QAT wrapper: skip policies, config checks, strict weight loading."""

import numpy as np
import pytest
from conftest import INSTANT

from segslim import builder
from segslim._paddle import paddle
from segslim.config import load_config
from segslim.errors import UserError
from segslim.quant.qat import build_quant_model, mark_skipped, quant_config_of, quantize_model
from segslim.train.checkpoint import load_weights


class WithBackbone(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.backbone = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.Conv2D(4, 4, 3))
        self.head = paddle.nn.Conv2D(4, 2, 1)
        self.cls = paddle.nn.Linear(2, 2)

    def forward(self, x):
        return [self.head(self.backbone(x))]


def qcfg(**kw):
    return quant_config_of({'quant_config': kw})


def test_backbone_policy_quantizes_only_backbone():
    quantized, skipped = mark_skipped(WithBackbone(), qcfg())
    assert quantized == ['backbone.0', 'backbone.1'] and skipped == ['head', 'cls']


def test_all_policy_and_skip_patterns():
    quantized, skipped = mark_skipped(WithBackbone(), qcfg(layers='all'))
    assert len(quantized) == 4 and not skipped
    quantized, skipped = mark_skipped(WithBackbone(), qcfg(layers='all', skip=['head', 'cl*']))
    assert quantized == ['backbone.0', 'backbone.1'] and skipped == ['head', 'cls']
    quantized, _ = mark_skipped(WithBackbone(), qcfg(layers='all',
                                                     quantizable_layer_type=['Linear']))
    assert quantized == ['cls']


def test_bisenet_without_backbone_quantizes_every_conv():
    cfg = load_config(INSTANT)
    model = builder.build_model(cfg)
    convs = [n for n, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Conv2D)]
    quantized, skipped = mark_skipped(model, quant_config_of(cfg))
    assert len(quantized) == len(convs) == 64 and not skipped


def test_skipped_layers_get_no_fake_quant():
    model = WithBackbone()
    quantize_model(model, qcfg(skip=[]))
    keys = list(model.state_dict())
    assert any(k.startswith('backbone.0._fake_quant') or 'backbone.0' in k and '_fake_quant' in k
               for k in keys)
    assert not any(k.startswith('head') and '_fake_quant' in k for k in keys)


@pytest.mark.parametrize('bad,match', [({'weight_bits': 1}, 'weight_bits'),
                                       ({'layers': 'head'}, 'layers'),
                                       ({'activation_quantize_type': 'x'}, 'activation'),
                                       ({'nope': 1}, 'quant_config.nope')])
def test_quant_config_errors_name_the_key(bad, match):
    with pytest.raises(UserError, match=match):
        quant_config_of({'quant_config': bad})


def test_nothing_left_to_quantize_is_an_error():
    with pytest.raises(UserError, match='no layer is left'):
        quantize_model(WithBackbone(), qcfg(skip=['*']))


def test_strict_loading_lists_mismatches(tmp_path):
    cfg = load_config(INSTANT)
    model = builder.build_model(cfg)
    path = str(tmp_path / 'model.pdparams')
    paddle.save(model.state_dict(), path)
    other = builder.build_model(load_config(INSTANT, opts=['model.num_classes=3']))
    with pytest.raises(UserError, match=r'mismatched \(.*\[2.*->\[3') as err:
        load_weights(other, path)
    assert 'num_classes' in str(err.value)
    report = load_weights(other, path, allow_partial=True)
    assert report['mismatched'] and not report['missing']
    state = model.state_dict()
    state.pop(next(iter(state)))
    state['extra.weight'] = paddle.zeros([1])
    paddle.save(state, path)
    with pytest.raises(UserError, match=r'1 missing .*1 unexpected \(extra.weight'):
        load_weights(builder.build_model(cfg), path)


def test_build_quant_model_loads_fp32_then_qat(tmp_path):
    cfg = load_config(INSTANT)
    fp32 = builder.build_model(cfg)
    path = str(tmp_path / 'fp32.pdparams')
    paddle.save(fp32.state_dict(), path)
    qmodel, _ = build_quant_model(cfg, fp32_weights=path)
    w = fp32.state_dict()['head.conv_1x1.weight'].numpy()
    q = qmodel.state_dict()['head.conv_1x1._layer.weight'].numpy()
    assert (w == q).all()
    qpath = str(tmp_path / 'qat.pdparams')
    paddle.save(qmodel.state_dict(), qpath)
    again, _ = build_quant_model(cfg, qat_weights=qpath)
    assert (again.state_dict()['head.conv_1x1._layer.weight'].numpy() == w).all()
    with pytest.raises(UserError, match='FP32 weights'):
        build_quant_model(cfg, qat_weights=path)


def test_calibration_scales_follow_small_activations():
    # a model whose activations stay far below 1 (as at random init): each moving average
    # starts at the first batch, not at the observers' initial abs max of 1
    import numpy as np

    from segslim.quant.qat import calibrate
    paddle.seed(0)
    model = builder.build_model(load_config(INSTANT))
    quantize_model(model, quant_config_of({'quant_config': {'layers': 'all'}}), summary=False)
    images = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) * 1e-3
              for i in range(2)]
    calibrate(model, images)
    scales = [float(layer._scale.numpy()[0]) for layer in model.sublayers()
              if hasattr(layer, '_accum') and hasattr(layer, '_scale')]
    # from the observers' initial state the median scale is about 0.30 after two batches
    assert scales and np.median(scales) < 0.1, np.median(scales)


def test_output_observers_without_copies_keep_paddles_scales():
    """On CPU the output-scale observer records paddle's moving average bit for bit (scale,
    state, accum over many steps and magnitudes), returns the layer's output itself, and
    leaves evaluation's scale alone; outside the context paddle's op runs again."""
    from paddle.nn.quant.quant_layers import MovingAverageAbsMaxScale

    from segslim.quant.observers import observers_without_copies
    rng = np.random.default_rng(0)
    ref, ours = (MovingAverageAbsMaxScale(moving_rate=0.9) for _ in range(2))
    for step in range(200):
        x = paddle.to_tensor((rng.standard_normal((2, 3, 4, 5)) *
                              rng.uniform(1e-3, 1e3)).astype(np.float32))
        if step == 150:
            ref.eval()
            ours.eval()
        ref(x)
        with observers_without_copies():
            assert ours(x) is x
        for name in ('_scale', '_state', '_accum'):
            assert getattr(ours, name).numpy().tobytes() == \
                getattr(ref, name).numpy().tobytes(), (step, name)
    assert ours(x) is not x  # paddle's op again, its copy
