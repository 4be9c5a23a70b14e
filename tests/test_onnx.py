"""The INT8 ONNX writer: BN folding, Q/DQ placement for onnxruntime and TensorRT, the
export flags and their errors."""
import os
import shutil

import numpy as np
import pytest
import yaml
from conftest import INSTANT, assert_one_line_error, data_opts, run_cli, run_command

from segslim.builder import build_dataset
from segslim.config import load_config
from segslim.deploy.benchmark import evaluate_engines
from segslim.deploy.engines import create_predictor
from segslim.errors import UserError
from segslim.options import EngineOptions

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('paddle2onnx', reason='no wheel for this Python: no ONNX export')
from onnx import helper, numpy_helper  # noqa: E402

from segslim.onnx import qdq  # noqa: E402
from segslim.onnx.export import export_onnx  # noqa: E402
from segslim.onnx.graph import Graph  # noqa: E402
from segslim.onnx.qdq import WeightQuant, fold_batch_norms  # noqa: E402


def engine(model_dir, backend):
    # every quantized layer INT8: these tests check what the export gives the engine
    return create_predictor(model_dir, EngineOptions(backend=backend, precision='int8',
                                                     input_shape=(1, 3, 64, 64),
                                                     int8_layers='all'))


def val_set(data):
    return build_dataset(load_config(INSTANT, opts=data_opts(data)), 'val_dataset')


def qat_model(qat_run):
    from segslim.quant.qat import build_quant_model
    cfg = load_config(INSTANT, opts=data_opts(qat_run['data']))
    model, _ = build_quant_model(cfg, qat_weights=os.path.join(qat_run['dir'], 'best_model',
                                                               'model.pdparams'))
    return model


@pytest.fixture(scope='module')
def onnx_models(exported, tmp_path_factory):
    """The FP32 export and the QAT export with model.onnx for each target (in-process)."""
    base = tmp_path_factory.mktemp('onnx')
    images = sorted(os.path.join(exported['data'], 'JPEGImages', f)
                    for f in os.listdir(os.path.join(exported['data'], 'JPEGImages')))[:4]
    dirs = {}
    for name, src, target in (('fp32', exported['fp32'], 'onnxruntime'),
                              ('ort', exported['int8'], 'onnxruntime'),
                              ('trt', exported['int8'], 'tensorrt')):
        dirs[name] = str(base / name)
        shutil.copytree(src, dirs[name])
        export_onnx(dirs[name], target, images)
    return dirs


def load(model_dir):
    return onnx.load(os.path.join(model_dir, 'model.onnx'))


def test_qat_export_to_onnx_runs_every_conv_int8_in_onnxruntime(qat_run, exported,
                                                                   onnx_models, tmp_path):
    out = tmp_path / 'int8'
    proc = run_cli('slim/quant/qat_export.py', '--config', INSTANT, '--model_path',
                   os.path.join(qat_run['dir'], 'best_model', 'model.pdparams'),
                   '--save_dir', out, '--to_onnx', '--verify_images', 0,
                   '--opts', *data_opts(qat_run['data']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    deploy = yaml.safe_load(open(out / 'deploy.yaml'))['Deploy']
    assert deploy['onnx'] == 'model.onnx' and deploy['onnx_target'] == 'onnxruntime'
    pred = engine(str(out), 'onnxruntime')
    # paddle2onnx's own quantized export left a third of the convs in float (36/56)
    assert pred.precision == 'int8'
    assert pred.ops.int8_conv_ops == pred.ops.conv_ops > 0
    rows = evaluate_engines([engine(str(out), 'paddle'), pred], val_set(qat_run['data']),
                            model=qat_model(qat_run))
    # near-tied logits of a 20-iteration model make two INT8 engines differ on a few pixels
    assert rows[1].pixel_agreement >= 0.995 and rows[1].model_agreement >= 0.995, rows[1]
    # int8 weights: paddle2onnx wrote them as float, a file as large as the FP32 one
    size = os.path.getsize(out / 'model.onnx')
    assert size <= 0.3 * os.path.getsize(os.path.join(onnx_models['fp32'], 'model.onnx'))


def test_the_profile_of_an_int8_onnx_finds_its_int8_convs(onnx_models):
    """onnxruntime's own per-node profile, grouped as oneDNN's verbose kinds: the INT8 file's
    convs run QLinearConv, the FP32 file's float, and the shares add up to the whole."""
    from segslim.deploy.profile import TIME_GROUPS, profile_row, time_shares
    from segslim.deploy.results import BenchRow, OpSummary, Precision

    def profile(name, precision):  # as the gain table asks for the fastest rows
        row = BenchRow(onnx_models[name], 'onnxruntime', precision, 0.01, 0.01, 1.0,
                       OpSummary())
        return profile_row(row, 1, (1, 3, 64, 64), runs=2)
    int8, fp32 = profile('ort', Precision.INT8), profile('fp32', Precision.FP32)
    assert int8['engine'] == 'onnxruntime' and int8['wall_ms'] > 0
    assert int8['by_kind'].get('convolution int8', 0) > 0
    assert fp32['by_kind'].get('convolution f32', 0) > 0
    assert not [k for k in fp32['by_kind'] if k.endswith(' int8')]
    for prof in (int8, fp32):
        assert sum(time_shares(prof).values()) == pytest.approx(1.0)
        assert list(time_shares(prof)) == list(TIME_GROUPS)
    assert time_shares(int8)['INT8 convs, matmuls'] > time_shares(int8)['float convs, matmuls']


def test_fp32_onnx_is_plain_float(onnx_models):
    model = load(onnx_models['fp32'])
    ops = {n.op_type for n in model.graph.node}
    assert 'Conv' in ops and not ops & {'QuantizeLinear', 'DequantizeLinear'}


def test_tensorrt_target_structure(onnx_models):
    model = load(onnx_models['trt'])
    assert max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')) >= 13
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qdq = [n for n in model.graph.node if n.op_type in ('QuantizeLinear', 'DequantizeLinear')]
    assert qdq
    for n in qdq:  # symmetric int8 everywhere
        zero = inits[n.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), n.name
    convs = [n for n in model.graph.node if n.op_type == 'Conv']
    for conv in convs:  # data and weight from DQ, int8 weight initializer
        assert producer[conv.input[0]].op_type == 'DequantizeLinear', conv.name
        weight_dq = producer[conv.input[1]]
        assert weight_dq.op_type == 'DequantizeLinear'
        assert inits[weight_dq.input[0]].dtype == np.int8
    layer_outputs = {c.output[0] for c in convs}
    for n in model.graph.node:
        if n.op_type != 'QuantizeLinear':
            continue
        dq = consumers[n.output[0]]
        readers = [r for d in dq for r in consumers.get(d.output[0], [])]
        if n.input[0] in layer_outputs:  # a conv output is quantized only for quantized users
            assert all(r.op_type in ('Conv', 'MatMul', 'Add') for r in readers), n.name
    quantized = {n.input[0] for n in model.graph.node if n.op_type == 'QuantizeLinear'}
    adds = [n for n in model.graph.node if n.op_type == 'Add']
    residual = [a for a in adds if any(i in quantized or producer.get(i) is not None
                                       and producer[i].op_type == 'DequantizeLinear'
                                       for i in a.input)]
    assert residual
    for add in residual:  # identity inputs that carry a scale are read through DQ
        for i in add.input:
            assert i not in quantized, (add.name, i)


def test_tensorrt_target_runs_in_onnxruntime_like_the_int8_engine(onnx_models, exported):
    pred = engine(onnx_models['trt'], 'onnxruntime')
    assert 'TensorRT' in pred.fallback
    rows = evaluate_engines([engine(onnx_models['trt'], 'paddle'), pred],
                            val_set(exported['data']))
    assert rows[1].pixel_agreement >= 0.995
    assert abs(rows[1].miou - rows[0].miou) <= 0.01


def test_openvino_runs_both_onnx_files_int8(onnx_models):
    ov = pytest.importorskip('openvino')
    from segslim.deploy.openvino_engine import runtime_summary
    core = ov.Core()
    for name in ('ort', 'trt'):
        model = core.read_model(os.path.join(onnx_models[name], 'model.onnx'))
        model.reshape({model.inputs[0].get_any_name(): [1, 3, 64, 64]})
        summary = runtime_summary(core.compile_model(model, 'CPU').get_runtime_model())
        assert summary.int8_conv_ops == summary.conv_ops > 0, (name, summary)


def conv_bn_model(gamma):
    """x -> Conv(w) -> BatchNormalization: a float graph as paddle2onnx writes it."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    step = np.array([0.01, 0.02, 0.005, 0.03], np.float32)
    w = q.astype(np.float32) * step[:, None, None, None]
    consts = {'w': w, 'b': rng.normal(size=4).astype(np.float32),
              'gamma': np.asarray(gamma, np.float32), 'beta': rng.normal(size=4).astype(np.float32),
              'mean': rng.normal(size=4).astype(np.float32),
              'var': rng.uniform(0.5, 2, 4).astype(np.float32)}
    nodes = [helper.make_node('Constant', [], [k], value=numpy_helper.from_array(v, k))
             for k, v in consts.items()]
    nodes += [helper.make_node('Conv', ['x', 'w', 'b'], ['c'], pads=[1, 1, 1, 1]),
              helper.make_node('BatchNormalization', ['c', 'gamma', 'beta', 'mean', 'var'],
                               ['y'], epsilon=1e-5)]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info(
        'x', onnx.TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            'y', onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    return model, WeightQuant(q, step, 0)


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=['CPUExecutionProvider']).run(None, {'x': x})[0]


def test_batch_norm_folds_exactly_into_int8_weights_with_negative_factors():
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    model, quant = conv_bn_model([1.5, -0.7, 0.0001, -2.0])
    expected = run(model, x)
    g = Graph(model)
    weights = {'w': quant}
    fold_batch_norms(g, weights)
    assert [n.op_type for n in g.nodes] == ['Conv']
    folded = weights[g.nodes[0].input[1]]
    sign = np.array([1, -1, 1, -1])[:, None, None, None]
    assert np.array_equal(folded.q, quant.q * sign)  # only the signs change
    w = g.inits[g.nodes[0].input[1]]
    np.testing.assert_allclose(folded.q * folded.step[:, None, None, None], w, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(run(g.finish(), x), expected, rtol=1e-4, atol=1e-5)


def run_optimized(model, x, tmp_path):
    """The model's first output on `x` in onnxruntime with every graph optimization, and the
    op types of the graph onnxruntime runs (its fusions: QLinearConv, QLinearAdd, ...). On a
    CPU without VNNI its weights run in 7 bits, as the engine runs them: onnxruntime's u8 x s8
    kernels saturate there on 8-bit weights (up to 0.08 off on these models)."""
    from segslim.deploy.cpu import cpu_features
    from segslim.deploy.onnxruntime_engine import seven_bit_qdq
    if not cpu_features()['vnni']:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        seven_bit_qdq(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    session = ort.InferenceSession(model.SerializeToString(), so,
                                   providers=['CPUExecutionProvider'])
    got = session.run(None, {'x': x})[0]
    return got, [n.op_type for n in onnx.load(str(tmp_path / 'optimized.onnx')).graph.node]


def conv_model(weights, nodes, step, consts=(), outputs=(('y', onnx.TensorProto.FLOAT),)):
    """A graph of `nodes` on the input x (1x4x8x8) whose conv weights (name -> shape) hold
    random int8 values times `step` per output channel, with their WeightQuant; `consts`
    are further Constant values by name."""
    rng = np.random.default_rng(0)
    values, quants = {}, {}
    for name, shape in weights.items():
        q = rng.integers(-127, 128, shape).astype(np.int8)
        per_channel = np.full(shape[0], step, np.float32)
        values[name] = q.astype(np.float32) * per_channel[:, None, None, None]
        quants[name] = WeightQuant(q, per_channel, 0)
    values.update(consts)
    nodes = [helper.make_node('Constant', [], [k], value=numpy_helper.from_array(v, k))
             for k, v in values.items()] + nodes
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info(
        'x', onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [
            helper.make_tensor_value_info(name, kind, None) for name, kind in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)]), quants


def quantize_grids(quantized):
    """{tensor: (scale, zero point)} of every QuantizeLinear of a QDQ model."""
    inits = {i.name: float(numpy_helper.to_array(i)) for i in quantized.graph.initializer
             if not i.dims}
    return {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in quantized.graph.node
            if n.op_type == 'QuantizeLinear'}


def shuffle_model():
    """A ShuffleNet block as paddle2onnx writes it: two conv+relu branches, concat, channel
    shuffle (reshape, transpose, reshape), split; one half into a conv, the other into a
    concat with that conv's output, then a last conv."""
    nodes = [helper.make_node('Conv', ['x', 'wa'], ['a']), helper.make_node('Relu', ['a'], ['ra']),
             helper.make_node('Conv', ['x', 'wb'], ['b']), helper.make_node('Relu', ['b'], ['rb']),
             helper.make_node('Concat', ['ra', 'rb'], ['c'], axis=1),
             helper.make_node('Reshape', ['c', 's1'], ['r1']),
             helper.make_node('Transpose', ['r1'], ['t'], perm=[0, 2, 1, 3, 4]),
             helper.make_node('Reshape', ['t', 's2'], ['r2']),
             helper.make_node('Split', ['r2', 'split'], ['h1', 'h2'], axis=1),
             helper.make_node('Conv', ['h1', 'wc'], ['e']),
             helper.make_node('Relu', ['e'], ['re']),
             helper.make_node('Concat', ['re', 'h2'], ['f'], axis=1),
             helper.make_node('Conv', ['f', 'wd'], ['y'])]
    model, quants = conv_model(
        {'wa': (4, 4, 1, 1), 'wb': (4, 4, 1, 1), 'wc': (4, 4, 1, 1), 'wd': (2, 8, 1, 1)}, nodes,
        0.01, {'s1': np.array([1, 2, 4, 8, 8], np.int64), 's2': np.array([1, 8, 8, 8], np.int64),
               'split': np.array([4, 4], np.int64)})
    steps = {'wa': 4 / 127, 'wb': 4 / 127, 'wc': 0.05, 'wd': 0.06}
    return model, qdq.ProgramScales(steps, quants)


def test_onnxruntime_runs_concats_and_the_channel_shuffle_on_uint8(tmp_path):
    """Between quantized convs the concats, the shuffle's reshapes and transpose and the
    split share one scale per region, so onnxruntime runs them on uint8 (QLinearConcat, no
    float Concat, one quantize of the input) and the result stays within the quantization
    error."""
    model, scales = shuffle_model()
    rng = np.random.default_rng(1)
    batches = [rng.uniform(-2, 2, (1, 4, 8, 8)).astype(np.float32) for _ in range(4)]
    expected = run(model, batches[0])
    quantized, stats = qdq.quantize_graph(model, scales, 'onnxruntime', batches)
    assert stats['uint8_regions'] >= 1 and stats['int8_convs'] == 4
    got, ops = run_optimized(quantized, batches[0], tmp_path)
    assert ops.count('QLinearConcat') == 2 and 'Concat' not in ops, ops
    # the last conv writes the float output: its input and weight are dequantized for it
    assert ops.count('QLinearConv') == 3 and ops.count('Conv') == 1, ops
    assert ops.count('QuantizeLinear') == 1 and ops.count('DequantizeLinear') == 2, ops
    assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()


def test_a_layer_read_only_by_a_concat_rounds_onto_the_concat_grid():
    """The conv outputs that only a concat reads take the concat's scale and zero point, so
    onnxruntime's QLinearConcat copies them instead of requantizing each value."""
    model, scales = shuffle_model()
    rng = np.random.default_rng(1)
    batches = [rng.uniform(-2, 2, (1, 4, 8, 8)).astype(np.float32) for _ in range(4)]
    quantized, stats = qdq.quantize_graph(model, scales, 'onnxruntime', batches)
    grid = quantize_grids(quantized)
    assert grid['ra'] == grid['rb'] == grid['c'] and grid['re'] == grid['f'], grid
    assert stats['on_concat_grid'] == 3
    # a signed concat (zero point 128): a Relu output keeps zero point 0, so its Relu still
    # folds into the conv; the signed conv output beside it takes the concat's grid
    model, quants = conv_model(
        {'wa': (4, 4, 1, 1), 'wb': (4, 4, 1, 1), 'wd': (2, 8, 1, 1)},
        [helper.make_node('Conv', ['x', 'wa'], ['a']), helper.make_node('Relu', ['a'], ['ra']),
         helper.make_node('Conv', ['x', 'wb'], ['b']),
         helper.make_node('Concat', ['ra', 'b'], ['c'], axis=1),
         helper.make_node('Conv', ['c', 'wd'], ['y'])], 0.01)
    quantized, stats = qdq.quantize_graph(
        model, qdq.ProgramScales({'wa': 0.02, 'wb': 0.02, 'wd': 0.05}, quants), 'onnxruntime',
        batches)
    grid = quantize_grids(quantized)
    assert grid['c'][1] == 128 and grid['b'] == grid['c'] and grid['ra'][1] == 0, grid
    assert stats['on_concat_grid'] == 1


def residual_model(last_kernel=1):
    """Two residual sums as paddle2onnx writes them: conv+relu, conv, Add of both, Relu, read
    by a conv (`last_kernel` square) and by a Shape; then that conv's output added to its
    input, read by a Sigmoid (a float op) into the graph output."""
    pad = last_kernel // 2
    nodes = [helper.make_node('Conv', ['x', 'wa'], ['a']), helper.make_node('Relu', ['a'], ['ra']),
             helper.make_node('Conv', ['ra', 'wb'], ['b']),
             helper.make_node('Add', ['b', 'ra'], ['s']), helper.make_node('Relu', ['s'], ['rs']),
             helper.make_node('Shape', ['rs'], ['shape']),
             helper.make_node('Conv', ['rs', 'wc'], ['c'], pads=[pad] * 4),
             helper.make_node('Add', ['c', 'rs'], ['t']),
             helper.make_node('Sigmoid', ['t'], ['y'])]
    model, quants = conv_model({'wa': (4, 4, 1, 1), 'wb': (4, 4, 1, 1),
                                'wc': (4, 4, last_kernel, last_kernel)}, nodes, 0.002,
                               outputs=(('y', onnx.TensorProto.FLOAT),
                                        ('shape', onnx.TensorProto.INT64)))
    return model, qdq.ProgramScales({'wa': 4 / 127, 'wb': 0.02, 'wc': 0.03}, quants)


def test_onnxruntime_runs_residual_sums_between_quantized_layers_on_uint8(tmp_path):
    """A residual Add whose inputs are quantized and whose output (after its Relu) only
    quantized layers read becomes QLinearAdd, its Shape reading the uint8 tensor; the Add
    whose output a float op reads stays float."""
    model, scales = residual_model()
    rng = np.random.default_rng(1)
    batches = [rng.uniform(-2, 2, (1, 4, 8, 8)).astype(np.float32) for _ in range(4)]
    expected = run(model, batches[0])
    quantized, stats = qdq.quantize_graph(model, scales, 'onnxruntime', batches)
    assert stats['uint8_adds'] == 1 and stats['int8_convs'] == 3
    shape_reads = {n.input[0] for n in quantized.graph.node if n.op_type == 'Shape'}
    producer = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert [producer[t] for t in shape_reads] == ['QuantizeLinear']
    got, ops = run_optimized(quantized, batches[0], tmp_path)
    assert ops.count('QLinearAdd') == 1 and ops.count('Add') == 1, ops
    assert 'Relu' not in ops and ops.count('QLinearConv') == 3, ops
    assert np.abs(got - expected).max() <= 0.02


def test_float_layers_take_the_uint8_regions_only_they_used_with_them(tmp_path):
    """A layer run in float (the INT8 kind choice) needs no quantized output: with every layer
    float no QuantizeLinear is left, not even around the residual sum onnxruntime ran as
    QLinearAdd, and the graph computes the float model; with the last conv still INT8 its
    input and output regions and the QLinearAdd that feeds it stay."""
    from segslim.deploy.onnxruntime_engine import with_float_kinds
    rng = np.random.default_rng(1)
    batches = [rng.uniform(-2, 2, (1, 4, 8, 8)).astype(np.float32) for _ in range(4)]
    model, scales = residual_model()
    expected = run(model, batches[0])  # before quantize_graph, which edits the model
    quantized, stats = qdq.quantize_graph(model, scales, 'onnxruntime', batches)
    assert stats['uint8_adds'] == 1
    floated = with_float_kinds(quantized, {'pointwise'})
    left = [n.op_type for n in floated.graph.node]
    assert 'QuantizeLinear' not in left and 'DequantizeLinear' not in left, left
    np.testing.assert_allclose(run(floated, batches[0]), expected, atol=1e-5)
    model, scales = residual_model(last_kernel=3)
    expected = run(model, batches[0])
    quantized, stats = qdq.quantize_graph(model, scales, 'onnxruntime', batches)
    got, ops = run_optimized(with_float_kinds(quantized, {'pointwise'}), batches[0], tmp_path)
    assert ops.count('QLinearConv') == 1 and ops.count('QLinearAdd') == 1, ops
    assert np.abs(got - expected).max() <= 0.02


def test_onnxruntime_runs_a_max_pool_between_quantized_convs_on_uint8(tmp_path):
    """A MaxPool between quantized convs shares its input's scale and zero point, so
    onnxruntime runs it as NhwcMaxPool on uint8 between the QLinearConvs, not in float."""
    rng = np.random.default_rng(0)
    quants, consts = {}, {}
    for name, step in (('wa', 0.0005), ('wb', 0.003)):
        q = rng.integers(-127, 128, (8, 8 if name == 'wb' else 4, 3, 3)).astype(np.int8)
        quants[name] = WeightQuant(q, np.full(8, step, np.float32), 0)
        consts[name] = q.astype(np.float32) * step
    nodes = [helper.make_node('Constant', [], [k], value=numpy_helper.from_array(v, k))
             for k, v in consts.items()]
    nodes += [helper.make_node('Conv', ['x', 'wa'], ['a'], pads=[1, 1, 1, 1]),
              helper.make_node('Relu', ['a'], ['ra']),
              helper.make_node('MaxPool', ['ra'], ['p'], kernel_shape=[3, 3], strides=[2, 2],
                               pads=[1, 1, 1, 1]),
              helper.make_node('Conv', ['p', 'wb'], ['y'], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info(
        'x', onnx.TensorProto.FLOAT, [1, 4, 16, 16])], [helper.make_tensor_value_info(
            'y', onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    # the pool's output carries a smaller step than its input: the region takes the larger
    scales = qdq.ProgramScales({'wa': 4 / 127, 'wb': 0.5 / 127}, quants)
    batches = [rng.uniform(-1, 1, (1, 4, 16, 16)).astype(np.float32) for _ in range(2)]
    expected = run(model, batches[0])
    quantized, stats = qdq.quantize_graph(model, scales, 'onnxruntime', batches)
    assert stats['uint8_regions'] == 1
    got, ops = run_optimized(quantized, batches[0], tmp_path)
    assert 'NhwcMaxPool' in ops and 'MaxPool' not in ops, ops
    assert ops.count('QuantizeLinear') == 1 and ops.count('QLinearConv') == 1, ops
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_onnx_bad_inputs_are_one_line(fp32_run, exported, tmp_path):
    with pytest.raises(UserError, match='no exported Paddle model'):
        export_onnx(str(tmp_path))
    proc = run_command('export.py', '--config', INSTANT, '--model_path', 'x.pdparams',
                       '--save_dir', tmp_path / 'o', '--onnx_target', 'coreml')
    assert_one_line_error(proc, '--onnx_target')
    fake = tmp_path / 'site' / 'onnx'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('No module named onnx')\n")
    proc = run_cli('export.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                   '--save_dir', tmp_path / 'f',
                   '--to_onnx', '--opts', *data_opts(exported['data']),
                   env={'PYTHONPATH': str(tmp_path / 'site')})
    assert_one_line_error(proc, '--to_onnx', 'onnx package', 'pip install')
    assert not os.path.exists(tmp_path / 'f' / 'model.pdmodel')  # refused before any work


def _qdq_layers(model):
    """{conv: (int8 weights, weight scale, int32 bias, bias scale)} of a QDQ model."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type == 'Conv' and node.input[1] in producer:
            w, b = producer[node.input[1]], producer.get(node.input[2])
            out[node.name] = (inits[w.input[0]], inits[w.input[1]],
                              inits[b.input[0]] if b else None, inits[b.input[1]] if b else None)
    return out


def test_int8_weights_run_in_seven_bits_without_vnni(onnx_models, monkeypatch):
    from segslim.deploy import onnxruntime_engine
    from segslim.deploy.engine import SEVEN_BIT_NOTE
    from segslim.deploy.onnxruntime_engine import seven_bit_qdq
    model = load(onnx_models['ort'])
    before = _qdq_layers(model)
    wide = [k for k, (q, _, _, _) in before.items() if np.abs(q.astype(int)).max() > 64]
    assert wide and seven_bit_qdq(model) == len(wide)
    after = _qdq_layers(model)
    for name in wide:
        (q8, s8, b8, t8), (q7, s7, b7, t7) = before[name], after[name]
        shape = (-1,) + (1,) * (q8.ndim - 1)
        assert np.abs(q7.astype(int)).max() <= 64 and np.abs(2 * q7.astype(int) - q8).max() <= 1
        assert np.allclose(s7, 2 * s8)
        w8, w7 = q8 * s8.reshape(shape), q7 * s7.reshape(shape)
        assert np.all(np.abs(w7 - w8) <= s8.reshape(shape) * 1.001), name  # one 8-bit step
        if b8 is not None:  # the bias step stays input step x weight step
            assert np.allclose(t7 / s7, t8 / s8) and np.all(np.abs(b7 * t7 - b8 * t8) <= t8)
    assert seven_bit_qdq(model) == 0  # 7 bits already
    monkeypatch.setattr(onnxruntime_engine, 'cpu_features', lambda: {'vnni': False})
    seven = engine(onnx_models['ort'], 'onnxruntime')
    assert seven.seven_bit == len(wide) and seven.fallback == SEVEN_BIT_NOTE
    # onnxruntime still fuses every conv into QLinearConv (it needs the bias step to match)
    assert seven.ops.int8_conv_ops == seven.ops.conv_ops > 0
    assert engine(onnx_models['trt'], 'onnxruntime').seven_bit == 0  # run as float Q/DQ
    monkeypatch.setattr(onnxruntime_engine, 'cpu_features', lambda: {'vnni': True})
    eight = engine(onnx_models['ort'], 'onnxruntime')
    assert eight.seven_bit == 0 and eight.fallback is None


def test_without_onnx_the_weights_stay_8_bit_and_it_says_so(onnx_models, monkeypatch):
    import sys

    from segslim.deploy import onnxruntime_engine
    said = []
    monkeypatch.setattr(onnxruntime_engine.logger, 'warning', lambda msg, *a: said.append(msg % a))
    monkeypatch.setattr(onnxruntime_engine, 'cpu_features', lambda: {'vnni': False})
    monkeypatch.setitem(sys.modules, 'onnx', None)  # as if not installed
    pred = engine(onnx_models['ort'], 'onnxruntime')
    assert pred.seven_bit == 0 and pred.fallback is None and pred.precision == 'int8'
    assert len(said) == 1 and 'onnx is not installed' in said[0] and '8-bit weights' in said[0]


def test_onnxruntime_pool_threads_sleep_when_idle(onnx_models):
    # sessions timed in turns: a spinning pool of one took the cores from the next
    predictor = engine(onnx_models['ort'], 'onnxruntime')
    options = predictor._options()
    assert options.get_session_config_entry('session.intra_op.allow_spinning') == '0'
    assert options.intra_op_num_threads == predictor.opts.cpu_threads
