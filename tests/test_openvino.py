"""The OpenVINO backend: same answers as Paddle Inference, INT8 read from its runtime graph,
the QAT export's observer-only quantization dropped, and a clear line when it is missing."""
import json
import os

import numpy as np
import pytest
from conftest import INSTANT, assert_one_line_error, data_opts, run_cli, table_rows
from PIL import Image

from segslim.deploy.engines import create_predictor
from segslim.errors import UserError
from segslim.options import EngineOptions

ov = pytest.importorskip('openvino')


def test_benchmark_rows_of_both_engines(exported, tmp_path):
    out = tmp_path / 'report.json'
    proc = run_cli('deploy/python/benchmark.py', '--config', INSTANT, '--model_dirs',
                   exported['fp32'], exported['int8'], '--backend', 'paddle', 'openvino',
                   '--threads', 2, '--input_shape', 1, 3, 64, 64, '--warmup', 1, '--no_ceiling',
                   '--repeats', 3, '--no_bf16', '--json', out, '--int8_layers', 'all',
                   '--opts', *data_opts(exported['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r['backend'], r['precision']): r for r in json.load(open(out))['rows']}
    assert set(rows) == {('paddle', 'fp32'), ('paddle', 'int8'), ('openvino', 'fp32'),
                         ('openvino', 'int8')}
    # agreement is measured against the first row: Paddle FP32
    assert rows['openvino', 'fp32']['pixel_agreement'] >= 0.999
    ov_int8, pd_int8 = rows['openvino', 'int8'], rows['paddle', 'int8']
    # OpenVINO also rounds what concats and pools read of a conv's quantized input
    # (share_quantized_inputs), Paddle Inference does not: about 1 pt on this 2-image set
    assert abs(ov_int8['miou'] - pd_int8['miou']) <= 0.015, (ov_int8['miou'], pd_int8['miou'])
    assert 0 < ov_int8['int8_ops'] <= ov_int8['quantizable_ops']
    assert rows['openvino', 'fp32']['int8_ops'] == 0
    assert ['OpenVINO', 'INT8'] in [row[1:3] for row in table_rows(proc.stdout)]


def test_observer_quantization_is_dropped_and_convs_stay_int8(exported):
    from segslim.deploy.openvino_graph import QUANTIZED_CONSUMERS, drop_observer_quantization
    model = ov.Core().read_model(os.path.join(exported['int8'], 'model.pdmodel'))
    fq = [op for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize']
    dropped = drop_observer_quantization(model)
    kept = [op for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize']
    assert dropped and kept and len(kept) + len(dropped) == len(fq)
    for op in kept:
        users = {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()}
        assert users & set(QUANTIZED_CONSUMERS), users
    pred = create_predictor(exported['int8'], EngineOptions(backend='openvino',
                                                            input_shape=(1, 3, 64, 64),
                                                            int8_layers='all'))
    assert pred.precision == 'int8' and pred.ops.int8_conv_ops == \
        pred.ops.conv_ops > 0
    assert pred.stripped > 0 and not pred.dropped  # the program-level strip did it all


def test_openvino_masks_match_paddle_fp32(exported, tmp_path):
    img = os.path.join(exported['data'], 'JPEGImages', 'N0000.jpg')
    masks = {}
    for backend in ('paddle', 'openvino'):
        proc = run_cli('deploy/python/infer.py', '--config', exported['fp32'], '--image_path',
                       img, '--save_dir', tmp_path / backend, '--backend', backend,
                       '--benchmark', 'True')
        assert proc.returncode == 0, proc.stderr[-2000:]
        masks[backend] = np.asarray(Image.open(tmp_path / backend / 'N0000.png'))
    assert 'engine: openvino' in proc.stderr + proc.stdout
    assert (masks['paddle'] == masks['openvino']).mean() >= 0.999


def test_openvino_refuses_what_it_would_run_as_something_else(exported):
    for opts, word in ((EngineOptions(backend='openvino', precision='fp16'), 'fp16'),
                       (EngineOptions(backend='openvino', device='gpu'), 'CPU only'),
                       (EngineOptions(backend='openvino', precision='int8'), 'no quantization')):
        with pytest.raises(UserError, match=word):
            create_predictor(exported['fp32'], opts)


def test_missing_openvino_is_one_line(exported, tmp_path):
    fake = tmp_path / 'site' / 'openvino'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('No module named openvino')\n")
    img = os.path.join(exported['data'], 'JPEGImages', 'N0000.jpg')
    proc = run_cli('deploy/python/infer.py', '--config', exported['int8'], '--image_path', img,
                   '--save_dir', tmp_path / 'out', '--backend', 'openvino',
                   env={'PYTHONPATH': str(tmp_path / 'site')})
    assert_one_line_error(proc, '--backend openvino', 'pip install', code=2)


def _conv_weights(model, folded=False):
    """{conv name: weights} of a converted model: the INT8 constants, or with `folded` the
    float weights the convolutions see (dequantization folded by OpenVINO's pass)."""
    if folded:
        model = model.clone()
        from openvino import passes
        manager = passes.Manager()
        manager.register_pass(passes.ConstantFolding())
        manager.run_passes(model)
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ('Convolution', 'GroupConvolution'):
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() != 'Constant':
            node = node.input_value(0).get_node()
        out[op.get_friendly_name()] = node.get_data().copy()
    return out


def test_int8_weights_run_in_seven_bits_without_vnni(exported, monkeypatch):
    from segslim.deploy import openvino_engine
    from segslim.deploy.engine import SEVEN_BIT_NOTE
    from segslim.deploy.openvino_graph import seven_bit_weights
    model = ov.Core().read_model(os.path.join(exported['int8'], 'model.pdmodel'))
    q8, w8 = _conv_weights(model), _conv_weights(model, folded=True)
    assert all(q.dtype == np.int8 for q in q8.values())
    assert max(np.abs(q.astype(int)).max() for q in q8.values()) > 64
    assert seven_bit_weights(model) == len(q8) > 0
    q7, w7 = _conv_weights(model), _conv_weights(model, folded=True)
    for name, q in q8.items():
        assert np.abs(q7[name].astype(int)).max() <= 64, name
        assert np.abs(2 * q7[name].astype(int) - q).max() <= 1, name
        # the scale doubled: each weight moved by at most one 8-bit step
        step = np.abs(w8[name]).max() / 127
        assert np.abs(w7[name] - w8[name]).max() <= step * 1.001, name
    assert seven_bit_weights(model) == 0  # 7 bits already: left as they are
    shape = (1, 3, 64, 64)
    monkeypatch.setattr(openvino_engine, 'cpu_features', lambda: {'vnni': False, 'simd_floats': 16})
    seven = create_predictor(exported['int8'], EngineOptions(backend='openvino',
                                                             input_shape=shape,
                                                             int8_layers='all'))
    assert seven.seven_bit == len(q8) and seven.fallback == SEVEN_BIT_NOTE
    assert seven.ops.int8_conv_ops == seven.ops.conv_ops
    monkeypatch.setattr(openvino_engine, 'cpu_features', lambda: {'vnni': True, 'simd_floats': 16})
    eight = create_predictor(exported['int8'], EngineOptions(backend='openvino',
                                                             input_shape=shape,
                                                             int8_layers='all'))
    assert eight.seven_bit == 0 and eight.fallback is None


def test_channel_topk_runs_planar_with_the_same_answers(exported):
    import openvino.opset13 as ops

    from segslim.deploy.openvino_head import planar_channel_topk

    def argmax_model(classes=5):
        x = ops.parameter([-1, classes, -1, -1], np.float32)
        top = ops.topk(x, ops.constant(np.array(2, np.int32)), 1, 'max', 'value', 'i32')
        return ov.Model([ops.result(top.output(0)), ops.result(top.output(1))], [x])

    rng = np.random.default_rng(0)
    data = rng.integers(0, 3, (2, 5, 7, 9)).astype(np.float32)  # many ties
    core = ov.Core()
    model = argmax_model()
    assert planar_channel_topk(model, 16) == 1
    # a channel block or more (Cityscapes' 19 classes) stays as it is: the reorder costs more
    assert planar_channel_topk(argmax_model(19), 16) == 0
    assert planar_channel_topk(argmax_model(8), 8) == 0
    assert [op.get_input_partial_shape(0).rank.get_length() for op in model.get_ordered_ops()
            if op.get_type_name() == 'TopK'] == [3]
    want = core.compile_model(argmax_model(), 'CPU')({0: data})
    got = core.compile_model(model, 'CPU')({0: data})
    for i in range(2):
        assert got[i].shape == want[i].shape == (2, 2, 7, 9)
        np.testing.assert_array_equal(got[i], want[i])
    assert (want[1][:, 0] == data.argmax(1)).all()
    # the export's argmax head is rewritten when the engine loads it, its resize included
    pred = create_predictor(exported['int8'], EngineOptions(
        backend='openvino', precision='int8', cpu_threads=2, input_shape=(1, 3, 64, 64)))
    assert pred.planar_topk == 1
    assert _interpolate_ranks(pred.model) and set(_interpolate_ranks(pred.model)[-1:]) == {3}


def _interpolate_ranks(model):
    return [op.get_input_partial_shape(0).rank.get_length() for op in model.get_ordered_ops()
            if op.get_type_name() == 'Interpolate']


def _resize_head(classes=3, mode='linear_onnx', axes=False, pads=0, also_read=False):
    """x (N, classes, h, w) -> resize to 2h x 3w as the Paddle converter writes it (v4, sizes
    and scales over all four axes) or with axes [2, 3] (v11) -> TopK k=1 over the classes."""
    import openvino.opset13 as ops
    from openvino.utils.node_factory import NodeFactory
    x = ops.parameter([-1, classes, -1, -1], np.float32)
    shape = ops.shape_of(x, 'i64')
    hw = ops.multiply(ops.gather(shape, ops.constant(np.array([2, 3], np.int64)), 0),
                      ops.constant(np.array([2, 3], np.int64)))
    if axes:
        up = ops.interpolate(x, hw, mode, 'sizes', [pads] * 4, [0] * 4, 'half_pixel',
                             axes=ops.constant(np.array([2, 3], np.int64)))
    else:
        sizes = ops.concat([ops.gather(shape, ops.constant(np.array([0, 1], np.int64)), 0),
                            hw], 0)
        scales = ops.constant(np.array([1, 1, 2, 3], np.float32))
        inputs = [v.output(0) for v in (x, sizes, scales)]
        up = NodeFactory('opset4').create('Interpolate', inputs, {
            'mode': mode, 'shape_calculation_mode': 'sizes', 'pads_begin': [pads] * 4,
            'pads_end': [0] * 4, 'coordinate_transformation_mode': 'half_pixel',
            'nearest_mode': 'round_prefer_floor', 'antialias': False, 'cube_coeff': -0.75})
    top = ops.topk(up, ops.constant(np.array(1, np.int64)), 1, 'max', 'index', 'i32')
    results = [ops.result(top.output(1))]
    if also_read:
        results.append(ops.result(ops.relu(up)))
    return ov.Model(results, [x])


@pytest.mark.parametrize('mode', ['linear_onnx', 'nearest', 'cubic'])
@pytest.mark.parametrize('axes', [False, True])
def test_resize_before_channel_topk_runs_planar_with_the_same_labels(mode, axes):
    from segslim.deploy.openvino_head import planar_channel_topk
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    data[:, :, :2] = rng.integers(0, 2, (2, 3, 2, 7))  # ties
    core = ov.Core()
    model = _resize_head(mode=mode, axes=axes)
    assert planar_channel_topk(model, 16) == 1
    assert _interpolate_ranks(model) == [3]
    got = core.compile_model(model, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})({0: data})[0]
    want = core.compile_model(_resize_head(mode=mode, axes=axes), 'CPU',
                              {'INFERENCE_PRECISION_HINT': 'f32'})({0: data})[0]
    assert got.shape == want.shape == (2, 1, 10, 21)
    np.testing.assert_array_equal(got, want)


def test_resize_read_elsewhere_or_padded_keeps_its_layout():
    from segslim.deploy.openvino_head import planar_channel_topk
    for model in (_resize_head(also_read=True), _resize_head(pads=1)):
        assert planar_channel_topk(model, 16) == 1  # the TopK still runs planar
        assert _interpolate_ranks(model) == [4]
    model = _resize_head(classes=19)
    assert planar_channel_topk(model, 16) == 0 and _interpolate_ranks(model) == [4]


def _fq(x, low, high):
    import openvino.opset13 as ops
    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    return ops.fake_quantize(x, lo, hi, lo, hi, 256)


def test_int8_weights_on_float_data_are_not_counted_int8():
    """A matrix product with INT8 weights and a float input runs in float (the plugin
    decompresses the weights for an f32 kernel, runtime precision i8): not an INT8 op; with
    its input quantized too it is one."""
    import openvino.opset13 as ops

    from segslim.deploy.openvino_engine import runtime_summary
    rng = np.random.default_rng(0)

    def model(quantized):
        x = ops.parameter([1, 64, 32], np.float32)
        w = ops.constant(rng.integers(-127, 128, (32, 32)).astype(np.int8))
        w = ops.multiply(ops.convert(w, 'f32'), ops.constant(np.full((32, 1), 0.01, np.float32)))
        data = _fq(x, -4, 4) if quantized else x
        return ov.Model([ops.matmul(data, w, False, True).output(0)], [x])
    for quantized in (False, True):
        compiled = ov.Core().compile_model(model(quantized), 'CPU',
                                           {'INFERENCE_PRECISION_HINT': 'f32'})
        summary = runtime_summary(compiled.get_runtime_model())
        assert (summary.matmul_ops, summary.int8_matmul_ops) == (1, int(quantized)), summary
    # the matmul kind in float: its dequantized weight becomes one float constant (SegFormer's
    # INT8 weights on float input ran the plugin's decompressing kernel), same answers
    from segslim.deploy.openvino_graph import with_float_kinds
    quantized = model(True)
    q = next(op.get_data() for op in quantized.get_ordered_ops()
             if op.get_type_name() == 'Constant' and op.get_data().dtype == np.int8)
    floated = with_float_kinds(quantized, {'matmul'})
    matmul = next(op for op in floated.get_ordered_ops() if op.get_type_name() == 'MatMul')
    weight = matmul.input_value(1).get_node()
    assert weight.get_type_name() == 'Constant' and weight.get_data().dtype == np.float32
    x = rng.standard_normal((1, 64, 32)).astype(np.float32)
    got = ov.Core().compile_model(floated, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})({0: x})[0]
    np.testing.assert_allclose(got, x @ (q.astype(np.float32) * 0.01).T, rtol=1e-4, atol=1e-4)


def test_a_tensor_quantized_for_a_conv_is_shared_with_its_concat_and_pool():
    import openvino.opset13 as ops

    from segslim.deploy.openvino_graph import share_quantized_inputs, with_float_kinds

    def users(node):
        return sorted(t.get_node().get_type_name() for t in node.output(0).get_target_inputs())

    def block(quantized=True):
        x = ops.parameter([1, 4, 8, 8], np.float32)
        w = ops.constant(np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32))
        relu = ops.relu(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]))
        conv = ops.convolution(_fq(relu, 0, 4) if quantized else relu, w, [1, 1], [1, 1],
                               [1, 1], [1, 1])
        out = ops.concat([relu, conv, ops.avg_pool(relu, [1, 1], [0, 0], [0, 0], [1, 1], True)], 1)
        return ov.Model([ops.relu(relu), out], [x]), relu

    model, relu = block()
    assert share_quantized_inputs(model) == 2  # the concat and the pool; not the Relu
    assert users(relu) == ['FakeQuantize', 'Relu']
    fq = next(op for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize')
    assert users(fq) == ['AvgPool', 'Concat', 'Convolution']
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = ov.Core().compile_model(model, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})({0: x})[1]
    assert np.isfinite(got).all()
    # the conv in float: the quantization goes, the shared users get the float tensor back
    floated = with_float_kinds(model, {'spatial'})
    assert not [op for op in floated.get_ordered_ops() if op.get_type_name() == 'FakeQuantize']
    unquantized, _ = block(quantized=False)
    want = ov.Core().compile_model(unquantized, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    floated_out = ov.Core().compile_model(floated, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    np.testing.assert_allclose(floated_out({0: x})[1], want({0: x})[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, want({0: x})[1])  # the shared model did round the tensor
    # pools as a kind of their own: left on the float tensor when timed slower in INT8
    from segslim.deploy.openvino_graph import shareable_pools
    model, relu = block()
    assert shareable_pools(model) == 1
    assert share_quantized_inputs(model, pools=False) == 1  # the concat only
    assert users(relu) == ['AvgPool', 'FakeQuantize', 'Relu'] and shareable_pools(model) == 1
    # a tensor two FakeQuantizes read (two scales) is left alone
    model, relu = block()
    extra = ops.convolution(_fq(relu, 0, 2), ops.constant(np.ones((4, 4, 1, 1), np.float32)),
                            [1, 1], [0, 0], [0, 0], [1, 1])
    model.add_results([ops.result(extra)])
    assert share_quantized_inputs(model) == 0


def test_pools_read_the_int8_tensor_unless_the_timing_leaves_them_in_float(exported,
                                                                          monkeypatch):
    """--int8_layers auto on OpenVINO: `pool` is a kind to time when a pool would read a
    conv's INT8 input (the instant model's BiSeNetV2 stem pools beside a conv), and the
    variant with it in float keeps the pools on the float tensor."""
    from segslim.deploy import engine as engine_mod
    from segslim.deploy.int8_kinds import KindChoice
    from segslim.deploy.openvino_graph import POOLS
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', 'off')
    presents = []

    def choosing(float_kinds):
        def choose(present, build):
            presents.append(set(present))
            build(float_kinds)()  # every variant builds and runs
            return KindChoice(float_kinds, {'none': 0.02})
        return choose

    def pool_inputs(pred):
        return sorted(op.input_value(0).get_node().get_type_name()
                      for op in pred.model.get_ordered_ops() if op.get_type_name() in POOLS)
    opts = EngineOptions(backend='openvino', precision='int8', input_shape=(1, 3, 64, 64))
    monkeypatch.setattr(engine_mod, 'choose_float_kinds', choosing(frozenset()))
    shared = create_predictor(exported['int8'], opts)
    monkeypatch.setattr(engine_mod, 'choose_float_kinds', choosing(frozenset({'pool'})))
    floated = create_predictor(exported['int8'], opts)
    assert all('pool' in present for present in presents) and len(presents) == 2
    assert 'FakeQuantize' in pool_inputs(shared)
    assert 'FakeQuantize' not in pool_inputs(floated) and floated.shared < shared.shared
    assert floated.ops.int8_conv_ops == shared.ops.int8_conv_ops  # the convs stay INT8
    assert 'pool layers run in float' in floated.fallback
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert (floated.labels(x) == shared.labels(x)).mean() >= 0.9


def test_quantization_moves_above_layout_ops_to_the_producer_with_the_same_answers():
    import openvino.opset13 as ops

    from segslim.deploy.openvino_graph import hoist_quantization

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)

    def head():  # SegFormer's: tokens transposed back to a map, concatenated, quantized
        x = ops.parameter([1, 4, 6, 6], np.float32)
        a = ops.relu(ops.convolution(x, ops.constant(w1), [1, 1], [0, 0], [0, 0], [1, 1]))
        tokens = ops.transpose(ops.reshape(a, ops.constant(np.array([1, 8, 36])), False),
                               ops.constant(np.array([0, 2, 1])))
        back = ops.reshape(ops.transpose(tokens, ops.constant(np.array([0, 2, 1]))),
                           ops.constant(np.array([1, 8, 6, 6])), False)
        joined = ops.concat([back, ops.relu(x), ops.relu(x)], 1)
        out = ops.convolution(_fq(joined, 0, 3), ops.constant(w2), [1, 1], [1, 1], [1, 1],
                              [1, 1])
        return ov.Model([out], [x])

    model = head()
    assert hoist_quantization(model) == 5  # concat, reshape, transpose, reshape, transpose
    fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize']
    assert sorted(fq.input_value(0).get_node().get_type_name() for fq in fqs) == \
        ['Relu', 'Relu', 'Relu']
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    config = {'INFERENCE_PRECISION_HINT': 'f32'}
    want = ov.Core().compile_model(head(), 'CPU', config)({0: x})[0]
    got = ov.Core().compile_model(model, 'CPU', config)({0: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # a layout op another op also reads keeps the quantization below it
    model = head()
    transpose = next(op for op in model.get_ordered_ops() if op.get_type_name() == 'Transpose')
    model.add_results([ops.result(transpose)])
    assert hoist_quantization(model) == 3  # concat and the reshape, transpose after it


def test_a_channel_shuffle_runs_int8_when_the_quantization_moves_above_its_split():
    """A ShuffleNet unit: concat of the passed-through half and the branch, the shuffle
    (reshape, transpose, reshape; a ShapeOf reads the concat), split; the next conv quantizes
    one half. With `splits` the FakeQuantize moves above the split, the shuffle and the
    concat onto the concat's inputs, so the plugin shuffles INT8 data; without, it stays."""
    import openvino.opset13 as ops

    from segslim.deploy.openvino_graph import hoist_quantization, hoistable_splits

    rng = np.random.default_rng(0)
    w = [rng.standard_normal(shape).astype(np.float32) for shape in
         ((8, 4, 1, 1), (8, 8, 1, 1), (8, 8, 1, 1))]

    def unit():
        x = ops.parameter([1, 4, 16, 16], np.float32)
        a = ops.relu(ops.convolution(x, ops.constant(w[0]), [1, 1], [0, 0], [0, 0], [1, 1]))
        half, branch = ops.split(a, ops.constant(np.int64(1)), 2).outputs()
        branch = ops.relu(ops.convolution(_fq(branch, 0, 4), ops.constant(w[1][:4, :4]),
                                          [1, 1], [0, 0], [0, 0], [1, 1]))
        joined = ops.concat([half, branch], 1)
        shape = ops.shape_of(joined)
        shuffled = ops.reshape(ops.transpose(ops.reshape(
            joined, ops.constant(np.array([1, 2, 4, 16, 16])), False),
            ops.constant(np.array([0, 2, 1, 3, 4]))), shape, False)
        keep, conv_in = ops.split(shuffled, ops.constant(np.int64(1)), 2).outputs()
        conv = ops.relu(ops.convolution(_fq(conv_in, 0, 4), ops.constant(w[2][:4, :4]),
                                        [1, 1], [0, 0], [0, 0], [1, 1]))
        out = ops.concat([keep, conv], 1)
        return ov.Model([ops.convolution(_fq(out, 0, 4), ops.constant(w[1]), [1, 1], [0, 0],
                                         [0, 0], [1, 1])], [x])

    def sources(model):
        return sorted(op.input_value(0).get_node().get_type_name()
                      for op in model.get_ordered_ops() if op.get_type_name() == 'FakeQuantize')

    plain = unit()
    hoist_quantization(plain)  # the last concat's quantization moves onto its inputs
    assert sources(plain) == ['Relu', 'Split', 'Split', 'Split'], sources(plain)
    model = unit()
    assert hoistable_splits(model) == 2  # the kind `shuffle` is timed for this model
    # both splits, the reshape, transpose, reshape and both concats: every conv writes
    # INT8, and the passed-through halves are requantized (FakeQuantize on a split output)
    # where they join the next concat
    assert hoist_quantization(model, splits=True) == 7
    assert sources(model) == ['Relu', 'Relu', 'Relu', 'Split', 'Split'], sources(model)
    assert hoistable_splits(model) == 0
    config = {'INFERENCE_PRECISION_HINT': 'f32'}
    compiled = ov.Core().compile_model(model, 'CPU', config)
    precisions = {op.get_rt_info()['layerType'].astype(str):
                  op.get_rt_info()['runtimePrecision'].astype(str).lower()
                  for op in compiled.get_runtime_model().get_ordered_ops()}
    assert precisions.get('Transpose', precisions.get('ShuffleChannels')) in ('u8', 'i8'), \
        precisions
    x = rng.uniform(0, 1, (1, 4, 16, 16)).astype(np.float32)
    want = ov.Core().compile_model(unit(), 'CPU', config)({0: x})[0]
    got = compiled({0: x})[0]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # one more rounding, no more


def test_the_int8_kind_choice_is_kept_for_later_loads(exported, tmp_path, monkeypatch):
    from segslim.deploy import engine
    from segslim.deploy.int8_kinds import KindChoice
    calls = []

    def choose(present, build):
        calls.append(list(present))
        return KindChoice(frozenset(present[:1]), {'none': 0.02, present[0]: 0.01},
                          trials=[(present[0], 'none', 0.5)])
    monkeypatch.setattr(engine, 'choose_float_kinds', choose)
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', str(tmp_path / 'cache'))
    from segslim.deploy import int8_kinds
    monkeypatch.setattr(int8_kinds, 'machine_busy', lambda: False)  # the test's own load

    def load(threads=2):
        return create_predictor(exported['int8'], EngineOptions(
            backend='openvino', precision='int8', cpu_threads=threads))
    first = load()
    assert len(calls) == 1 and first.kinds.cached is None
    kept = os.listdir(tmp_path / 'cache' / 'int8_kinds')
    assert len(kept) == 1
    second = load()
    assert len(calls) == 1  # not measured again
    assert second.kinds.float_kinds == first.kinds.float_kinds and second.kinds.cached
    assert second.kinds.trials == first.kinds.trials and '0.50x of none' in second.fallback
    assert 'measured at an earlier load' in second.fallback
    load(threads=1)  # other settings: measured
    assert len(calls) == 2
    # a damaged file is measured again and rewritten
    (tmp_path / 'cache' / 'int8_kinds' / kept[0]).write_text('{"float_kinds": ')
    assert load().kinds.cached is None and len(calls) == 3
    assert load().kinds.cached and len(calls) == 3
    # no cache, or one that cannot be written: measured every time, the run goes on
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', 'off')
    load()
    assert len(calls) == 4
    blocker = tmp_path / 'file'
    blocker.write_text('')
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', str(blocker))
    load()
    load()
    assert len(calls) == 6


def test_the_profile_of_an_int8_model_finds_its_int8_convs(exported):
    """OpenVINO's per-node counters, grouped as oneDNN's verbose kinds: the QAT model's
    convs read INT8, the FP32 model's read float, and the shares add up to the whole."""
    from segslim.deploy.profile import TIME_GROUPS, profile_openvino, time_shares
    int8 = profile_openvino(exported['int8'], 'fp32', 1, (1, 3, 64, 64), runs=2)
    fp32 = profile_openvino(exported['fp32'], 'fp32', 1, (1, 3, 64, 64), runs=2)
    assert int8['engine'] == 'openvino' and int8['wall_ms'] > 0
    assert int8['by_kind'].get('convolution int8', 0) > 0
    assert fp32['by_kind'].get('convolution f32', 0) > 0
    assert not [k for k in fp32['by_kind'] if k.endswith(' int8')]
    for prof in (int8, fp32):
        shares = time_shares(prof)
        assert list(shares) == list(TIME_GROUPS)
        assert sum(shares.values()) == pytest.approx(1.0)
    assert time_shares(int8)['INT8 convs, matmuls'] > 0
    assert time_shares(fp32)['INT8 convs, matmuls'] == 0


def test_a_folder_chosen_with_bf16_rest_runs_so(exported, tmp_path, monkeypatch):
    """deploy.yaml `rest: bf16` (auto-quant's choice measured so) runs the unquantized ops in
    bf16 by default on a bf16 CPU; elsewhere, or without the key, they stay f32."""
    import shutil

    from segslim.deploy import openvino_engine
    from segslim.deploy.cpu import cpu_features
    from segslim.modeldir import update_deploy
    folder = str(tmp_path / 'best')
    shutil.copytree(exported['int8'], folder)
    update_deploy(folder, rest='bf16')
    opts = EngineOptions(backend='openvino', input_shape=(1, 3, 64, 64), int8_layers='all')

    def hint(model_dir):
        pred = create_predictor(model_dir, opts)
        return pred.rest, pred.properties['INFERENCE_PRECISION_HINT']
    assert hint(exported['int8']) == (None, 'f32')
    if cpu_features()['bf16']:
        assert hint(folder) == ('bf16', 'bf16')
        # the benchmark gives such a folder its one row, INT8 with bf16 rest, and the
        # folder without the key its two (f32 rest, then bf16 rest)
        from segslim.deploy.benchmark import benchmark
        report = benchmark([exported['fp32'], exported['int8'], folder], None, opts,
                           shape=(1, 3, 64, 64), warmup=1, repeats=1, with_bf16=True,
                           backends=('openvino',))
        rows = [(os.path.basename(r.model_dir), r.precision, r.rest) for r in report.rows]
        assert rows[2:] == [(os.path.basename(exported['int8']), 'int8', None),
                            (os.path.basename(exported['int8']), 'int8', 'bf16'),
                            ('best', 'int8', 'bf16')], rows
    features = dict(cpu_features(), bf16=False)
    monkeypatch.setattr(openvino_engine, 'cpu_features', lambda: features)
    assert hint(folder) == (None, 'f32')
