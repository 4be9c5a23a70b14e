"""SegFormer's decoder summed per stage: PaddleSeg's function and gradients, fewer ops.

PaddleSeg's SegFormer comes through segslim.decoders: importing paddleseg first would import
paddle before segslim sets its program format (segslim/compat.py), and Paddle 3 would save
model.json."""
import numpy as np
import pytest

from segslim import builder
from segslim._paddle import paddle
from segslim.config import load_config
from segslim.decoders import SegFormer, SummedSegFormer  # after segslim set the program format
from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
from segslim.export import export_inference_model
from segslim.options import EngineOptions
from segslim.program import block_ops, program_op_types, read_program

SEGFORMER = 'configs/segformer/segformer_b0_cityscapes_1024x1024_160k.yml'


@pytest.fixture(scope='module')
def segformer():
    """SegFormer-B0 with a batch norm and Linear biases that are not the identity and zero."""
    cfg = load_config(SEGFORMER, required=('model',))
    paddle.seed(0)
    model = builder.build_model(cfg)
    rng = np.random.default_rng(0)
    norm = model.linear_fuse._batch_norm
    norm._mean.set_value(rng.normal(0, 0.1, norm._mean.shape).astype('float32'))
    norm._variance.set_value(rng.uniform(0.5, 1.5, norm._variance.shape).astype('float32'))
    for mlp in (model.linear_c1, model.linear_c2, model.linear_c3, model.linear_c4):
        mlp.proj.bias.set_value(rng.normal(0, 0.1, mlp.proj.bias.shape).astype('float32'))
    return cfg, model


def _both(model, x):
    """(PaddleSeg's SegFormer.forward, the summed one) on x; each with dropout seeded alike."""
    paddle.seed(1)
    plain = SegFormer.forward(model, x)[0]
    paddle.seed(1)
    return plain, model(x)[0]


def test_the_build_sums_segformer_decoder_and_leaves_other_models(segformer):
    cfg, model = segformer
    assert type(model) is SummedSegFormer
    # PaddleSeg's parameters: checkpoints load and save as they do
    assert {'linear_c4.proj.weight', 'linear_fuse._conv.weight'} <= set(model.state_dict())
    other = builder.build_model(load_config('configs/quick_start/bisenet_optic_disc_512x512_1k.yml',
                                            required=('model',)))
    assert type(other).__name__ == 'BiSeNetV2'


def test_summed_decoder_gives_segformer_outputs_and_gradients(segformer):
    _, model = segformer
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 3, 64, 96)),
                         dtype='float32')
    model.eval()
    plain, summed = _both(model, x)
    assert plain.shape == summed.shape == [2, 19, 64, 96]
    scale = float(plain.abs().max())
    assert float((plain - summed).abs().max()) < 1e-4 * scale
    model.train()  # batch statistics and dropout: the gradients reach the same parameters
    grads = []
    for out in _both(model, x):
        model.clear_gradients()
        (out * out).mean().backward()
        grads.append({n: p.grad.numpy().copy() for n, p in model.named_parameters()
                      if n.startswith(('linear_c1.', 'linear_c4.', 'linear_fuse._conv'))})
    model.clear_gradients()
    model.eval()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5
    # the Linear biases' gradients are rounding noise: batch norm takes out a constant
    top = max(np.abs(g).max() for g in grads[0].values())
    for name, grad in grads[0].items():
        np.testing.assert_allclose(grads[1][name], grad, rtol=2e-3, atol=2e-4 * top,
                                   err_msg=name)


def test_exported_segformer_has_no_decoder_concat(segformer, tmp_path):
    cfg, model = segformer
    export_inference_model(model, cfg, str(tmp_path), output_op='none',
                           input_shape=[1, 3, 64, 64])
    # PaddleSeg's logits from the export's constant convs, in Paddle Inference
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    model.eval()
    plain = SegFormer.forward(model, paddle.to_tensor(x))[0].numpy()
    out = Predictor(str(tmp_path), EngineOptions(device='cpu', cpu_threads=1)).run(x)
    assert out.shape == plain.shape == (1, 19, 64, 64)
    assert np.abs(out - plain).max() < 1e-4 * np.abs(plain).max()
    ops = program_op_types(str(tmp_path / 'model.pdmodel'))
    # the backbone concatenates nothing; the decoder's concat and fuse conv are gone, and
    # its four Linears (matmul_v2 on the transposed stages) are 1x1 convs
    assert 'concat' not in ops
    # 4 patch embeddings, 6 attention reductions (stages 1-3, two blocks each), the
    # prediction conv and the decoder's 4 stage convs (PaddleSeg's program: 12 with the fuse)
    assert ops.count('conv2d') == 4 + 6 + 1 + 4
    # 7 in each of the 8 blocks (query, key-value, scores, weighted sum, output, Mix-FFN's
    # two) and none in the decoder: its weights are constants of the export, where
    # PaddleSeg's program has the 4 Linears on the stages
    assert ops.count('matmul_v2') == 7 * 8
    # the export's constant convs are gone again: checkpoints keep PaddleSeg's keys
    assert not any(k.startswith('_frozen') for k in model.state_dict())


def test_qat_rounds_each_stage_on_its_observed_range_and_exports_int8_convs(tmp_path):
    from segslim.decoders import _inner
    from segslim.quant.qat import calibrate, quant_config_of, quantize_model
    cfg = load_config(SEGFORMER, required=('model',))
    paddle.seed(0)
    model = builder.build_model(cfg)
    quanter = quantize_model(model, quant_config_of(cfg), summary=False)
    observer = _inner(model.linear_c1.proj)._fake_quant_input
    before = float(observer._scale.numpy().reshape(-1)[0])
    calibrate(model, [np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype('float32')])
    # the Linear is not called by the summed decoder; its input observer still sees the stage
    assert float(observer._scale.numpy().reshape(-1)[0]) != before
    export_inference_model(model, cfg, str(tmp_path), quanter=quanter,
                           input_shape=[1, 3, 64, 64])
    desc = read_program(str(tmp_path / 'model.pdmodel'))
    ops = block_ops(desc)
    made_by = {name: op.type() for op in ops for name in op.output_arg_names()}
    convs = [op for op in ops if op.type() == 'conv2d']
    # every conv2d reads a dequantized input and weight: the decoder's stage convs are INT8 too
    assert len(convs) == 15
    assert all(made_by[op.input('Input')[0]] == 'dequantize_linear' and
               made_by[op.input('Filter')[0]] == 'dequantize_linear' for op in convs)
    assert not any(k.startswith('_frozen') for k in model.state_dict())


def test_a_stage_whose_fuse_conv_qat_skipped_stays_float(tmp_path):
    from segslim.quant.qat import quant_config_of, quantize_model
    cfg = load_config(SEGFORMER, required=('model',))
    paddle.seed(0)
    model = builder.build_model(cfg)
    fuse = model.linear_fuse._conv
    quanter = quantize_model(model, quant_config_of(cfg), summary=False)
    model.linear_fuse._conv = fuse  # as a quant_config that skips the fuse conv leaves it
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(4).standard_normal((1, 3, 64, 64)),
                         dtype='float32')
    assert model(x)[0].shape == [1, 19, 64, 64]
    export_inference_model(model, cfg, str(tmp_path), quanter=quanter,
                           input_shape=[1, 3, 64, 64])
    desc = read_program(str(tmp_path / 'model.pdmodel'))
    ops = block_ops(desc)
    made_by = {name: op.type() for op in ops for name in op.output_arg_names()}
    float_convs = [op for op in ops if op.type() == 'conv2d' and
                   made_by.get(op.input('Filter')[0]) != 'dequantize_linear']
    assert len(float_convs) == 4  # the decoder's stage convs
