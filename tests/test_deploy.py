"""Deployment: benchmark report, infer masks, INT8 op-set fallback, bad model folders."""
import json
import os

import numpy as np
import pytest
import yaml
from conftest import INSTANT, data_opts, run_cli, run_command, table_rows
from PIL import Image

from segslim.deploy import paddle_engine as predictor_mod
from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
from segslim.deploy.results import NOT_FASTER_NOTE
from segslim.options import EngineOptions

ROW_FIELDS = ('model_dir', 'precision', 'miou', 'class_iou', 's_per_img', 'p90_s', 'speedup',
              'params_mb', 'pixel_agreement', 'int8_conv_ops', 'conv_ops', 'fallback',
              'engine_fp32_convs', 'samples_s')


def test_benchmark_json_has_every_field(exported, tmp_path):
    out = tmp_path / 'report.json'
    proc = run_cli('deploy/python/benchmark.py', '--config', INSTANT, '--model_dirs',
                   exported['fp32'], exported['int8'], '--device', 'cpu', '--cpu_threads', 2,
                   '--input_shape', 1, 3, 64, 64, '--warmup', 1, '--repeats', 3,
                   '--json', out, '--int8_layers', 'all',
                   '--opts', *data_opts(exported['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.load(open(out))
    assert report['threads'] == 2 and report['isa']
    rows = report['rows']
    assert [r['precision'] for r in rows][0] == 'fp32' and rows[-1]['precision'] == 'int8'
    for row in rows:
        for key in ROW_FIELDS:
            assert key in row, key
        assert 0 <= row['miou'] <= 1 and len(row['class_iou']) == 2
        assert row['s_per_img'] > 0 and row['p90_s'] >= row['s_per_img']
        assert len(row['samples_s']) == 3 and np.median(row['samples_s']) == row['s_per_img']
    assert rows[0]['speedup'] == 1.0 and rows[0]['pixel_agreement'] == 1.0
    int8 = rows[-1]
    assert int8['int8_conv_ops'] + int8['engine_fp32_convs'] == int8['conv_ops'] > 0
    assert (int8['fallback'] is None) == (int8['engine_fp32_convs'] == 0)
    # vs the FP32 engine: QAT fine-tuning changed the weights too, so not near 100 %
    assert int8['pixel_agreement'] > 0.98 and int8['params_mb'] < rows[0]['params_mb']
    assert rows[0]['int8_conv_ops'] == 0
    assert table_rows(proc.stdout)[0][:5] == ['Model', 'Engine', 'Type', 'mIoU', 's/img']
    assert 'ISA:' in proc.stdout
    # the FP32 baseline gets every pass the INT8 row gets, and the report says which
    from segslim._paddle import paddle
    from segslim.compat import pass_name

    def spelled(names):  # as the installed paddle names them (mkldnn -> onednn on 3.x)
        return [pass_name(n, paddle.__version__) for n in names]
    extra = spelled(predictor_mod.ONEDNN_EXTRA_PASSES)
    assert rows[0]['passes'] == {'appended': extra, 'deleted': []}
    assert int8['passes'] == {'appended': extra,
                              'deleted': spelled(predictor_mod.INT8_DELETE_PASSES)}
    # one line per distinct change; on a bf16 CPU the BF16 row shares the FP32 row's line
    fp32_passes = [line for line in proc.stdout.splitlines()
                   if line.startswith('Passes: ') and 'Paddle Inference FP32' in line]
    assert len(fp32_passes) == 1, proc.stdout
    assert fp32_passes[0].endswith(': +' + spelled(['interpolate_mkldnn_pass'])[0])
    # the CPU's ceiling on the engine, and every INT8 row against it
    ceiling = report['ceiling']
    assert set(ceiling) == {'paddle', 'int8_vs_best_unquantized'}
    assert ceiling['paddle']['int8_x'] > 0 and ceiling['paddle']['fp32_s'] > 0
    # ratios are the median of the turns' ratios
    assert int8['speedup_vs_engine_fp32'] == pytest.approx(np.median(
        np.divide(rows[0]['samples_s'], int8['samples_s'])))
    assert int8['of_ceiling'] == int8['speedup_vs_engine_fp32'] / ceiling['paddle']['int8_x']
    assert report['best_int8_engine'] == 'paddle' and report['best_unquantized_engine'] == \
        'paddle'
    base = min((r for r in rows if r['precision'] != 'int8'), key=lambda r: r['s_per_img'])
    assert report['gain'] == pytest.approx(np.median(np.divide(base['samples_s'],
                                                               int8['samples_s'])))
    assert report['gain_of_ceiling'] == report['gain'] / ceiling['int8_vs_best_unquantized']
    assert 'CPU ceiling (segslim.bench.ceiling' in proc.stdout and 'Gain: best INT8' in proc.stdout
    # what ran it: the stack in the report, the engine in every row, the writer in deploy.yaml
    paddle_version = 'paddlepaddle ' + paddle.__version__
    assert report['versions']['paddlepaddle'] == paddle.__version__
    assert report['versions']['paddleslim'] and report['versions']['python']
    assert {r['engine_version'] for r in rows} == {paddle_version}
    assert 'Stack: python ' in proc.stdout and paddle_version in proc.stdout
    for folder in (exported['fp32'], exported['int8']):
        with open(os.path.join(folder, 'deploy.yaml')) as f:
            written = yaml.safe_load(f)['Deploy']['versions']
        assert written['paddlepaddle'] == paddle.__version__ and written['paddleseg'], folder


def test_extra_onednn_passes_keep_the_masks(exported):
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 80)).astype(np.float32)
    for kind, precision in (('fp32', 'fp32'), ('int8', 'int8')):
        opts = EngineOptions(precision=precision, input_shape=(1, 3, 96, 80),
                             int8_layers='all')
        plain = Predictor(exported[kind], opts, extra_passes=())
        fast = Predictor(exported[kind], opts)
        assert plain.passes.appended == () and fast.passes.appended
        np.testing.assert_array_equal(plain.labels(x), fast.labels(x))
        assert plain.ops.int8_conv_ops == fast.ops.int8_conv_ops


def test_infer_writes_masks_of_input_size(exported, tmp_path):
    img = os.path.join(exported['data'], 'JPEGImages', 'N0000.jpg')
    odd = tmp_path / 'odd.png'
    Image.open(img).convert('L').resize((80, 48)).save(odd)  # grayscale, other size
    for path in (img, str(odd)):
        proc = run_cli('deploy/python/infer.py', '--config',
                       os.path.join(exported['int8'], 'deploy.yaml'), '--image_path', path,
                       '--save_dir', tmp_path / 'out', '--overlay')
        assert proc.returncode == 0, proc.stderr[-2000:]
        name = os.path.splitext(os.path.basename(path))[0]
        mask = Image.open(tmp_path / 'out' / (name + '.png'))
        assert mask.mode == 'P' and mask.size == Image.open(path).size
        assert set(np.unique(np.asarray(mask))) <= {0, 1}
        assert (tmp_path / 'out' / (name + '_overlay.jpg')).exists()


def test_int8_op_set_falls_back_and_says_so(exported, monkeypatch):
    # INT8 concat crashes oneDNN on BiSeNetV2 once the program is fused
    monkeypatch.setattr(predictor_mod, 'INT8_FALLBACK_OPS',
                        (predictor_mod.DEFAULT_INT8_OPS + ('concat', 'pool2d'),
                         predictor_mod.DEFAULT_INT8_OPS))
    # the INT8 timing per kind of layer (at the probe shape) builds with the narrowed set too
    pred = Predictor(exported['int8'], EngineOptions(precision='int8',
                                                     input_shape=(1, 3, 64, 64)))
    assert pred.fallback and 'narrowed' in pred.fallback and 'concat' in pred.fallback
    assert 'none' in pred.kinds.seconds
    # on a busy machine every kind of the instant model's tiny convs may time faster in
    # float (the engine then says INT8 did not pay); every layer INT8 runs on the narrowed set
    assert pred.ops.int8_conv_ops > 0 or pred.precision_note == NOT_FASTER_NOTE
    every = Predictor(exported['int8'], EngineOptions(precision='int8', int8_layers='all',
                                                      input_shape=(1, 3, 64, 64)))
    assert 'narrowed' in every.fallback and every.ops.int8_conv_ops > 0
    x = np.zeros((1, 3, 64, 64), np.float32)
    assert pred.labels(x).shape == every.labels(x).shape == (1, 64, 64)


def test_model_folder_without_deploy_yaml_is_one_line_error(tmp_path):
    proc = run_command('deploy/python/benchmark.py', '--model_dirs', str(tmp_path),
                       '--repeats', 1)
    assert proc.returncode == 2 and 'has no deploy.yaml' in proc.stderr
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# oneDNN verbose lines as Paddle 2.6's oneDNN 3 prints them (AMD EPYC, AVX2): a grouped INT8
# conv on the reference kernel, a JIT INT8 conv, and an FP32 conv on the reference kernel
VERBOSE = [
    'onednn_verbose,exec,cpu,convolution,ref:any,forward_inference,src_u8:a:blocked:acdb::f0 '
    'wei_s8:a:blocked:abcde::f0 bia_f32::blocked:a::f0 dst_s8:a:blocked:acdb::f0,'
    'attr-scales:src0:0+dst:0+wei:3 ,alg:convolution_direct,'
    'g16mb1_ic16oc96_ih128oh64kh3sh2dh0ph0_iw128ow64kw3sw2dw0pw0,41.6189',
    'onednn_verbose,exec,cpu,convolution,jit_uni_int8:avx2,forward_inference,src_u8:a:blocked:'
    'acdb::f0 wei_s8:a:blocked:ABcd2b8a4b::f0 bia_f32::blocked:a::f0 dst_f32:a:blocked:acdb::f0,'
    'attr-scales:src0:0+wei:1 attr-post-ops:eltwise_relu ,alg:convolution_direct,'
    'mb1_ic8oc16_ih256oh128kh3sh2dh0ph0_iw256ow128kw3sw2dw0pw0,0.116943',
    'onednn_verbose,exec,cpu,convolution,ref:any,forward_inference,src_f32::blocked:abcd::f0 '
    'wei_f32::blocked:abcd::f0 bia_f32::blocked:a::f0 dst_f32::blocked:abcd::f0,,'
    'alg:convolution_direct,mb1_ic3oc8_ih64oh64kh5sh1dh0ph2_iw64ow32kw1sw2dw0pw0,1.5',
    'onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:abcd::f0 dst_s8::blocked:'
    'abcd::f0,attr-scales:src0:0 ,,1x3x512x512,0.233887',
]


def test_reference_int8_convs_are_read_from_the_verbose_log(exported):
    from segslim.deploy.onednn import reference_int8_convs, verbose_lines
    # (groups, in, out, kernel h, kernel w, stride h, stride w) of INT8 convs on `ref` only
    assert reference_int8_convs(VERBOSE) == {(16, 16, 96, 3, 3, 2, 2)}
    pred = Predictor(exported['int8'], EngineOptions(precision='int8',
                                                     input_shape=(1, 3, 64, 64)))
    x = np.zeros((1, 3, 64, 64), np.float32)
    lines = verbose_lines(lambda: pred.run(x))  # this process's own oneDNN, captured
    convs = [line for line in lines if ',exec,cpu,convolution,' in line]
    assert convs and all(line.startswith('onednn_verbose') for line in convs)


def _grouped_shapes(model_file):
    """conv_shape of every conv with a channel multiplier in the program."""
    from segslim.program import block_ops, conv_shape, producers_map, read_program
    desc = read_program(model_file)
    ops = block_ops(desc)
    producer = producers_map(ops)
    shapes = [conv_shape(desc.block(0), op, producer, ops) for op in ops
              if op.type() in ('conv2d', 'depthwise_conv2d')]
    return sorted({s for s in shapes if s[0] > 1 and s[2] != s[1]})


def test_convs_on_reference_kernels_run_fp32_and_the_rest_int8(exported, monkeypatch, tmp_path):
    from segslim.program import program_op_types, run_convs_in_fp32
    model_file = os.path.join(exported['int8'], 'model.pdmodel')
    shapes = _grouped_shapes(model_file)
    assert shapes  # BiSeNetV2's gather-and-expansion convs: 16->96 channels in 16 groups
    out = str(tmp_path / 'model.pdmodel')
    changed = run_convs_in_fp32(model_file, out, shapes[:1])
    assert changed and program_op_types(out).count('quantize_linear') == \
        program_op_types(model_file).count('quantize_linear') - len(changed)
    opts = EngineOptions(precision='int8', input_shape=(1, 3, 64, 64), int8_layers='all')
    monkeypatch.setattr(predictor_mod, 'reference_int8_convs', lambda lines: set())
    full = Predictor(exported['int8'], opts)
    assert full.ops.int8_conv_ops == full.ops.conv_ops and full.fallback is None
    monkeypatch.setattr(predictor_mod, 'reference_int8_convs', lambda lines: set(shapes[:1]))
    part = Predictor(exported['int8'], opts)
    assert part.precision == 'int8' and part.model_file != model_file
    assert part.ops.int8_conv_ops == full.ops.conv_ops - len(changed) > 0
    assert f'{len(changed)} INT8 convs run FP32' in part.fallback and \
        'reference INT8 kernel' in part.fallback
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert (part.labels(x) == full.labels(x)).mean() >= 0.99


def _raw_program(path, ops):
    """A saved program of `ops` ((type, inputs, outputs) each), written op by op."""
    from paddle.base import core
    desc = core.ProgramDesc()
    block = desc.block(0)
    for op_type, inputs, outputs in ops:
        for names in list(inputs.values()) + list(outputs.values()):
            for name in names:
                block.var(name.encode())
        op = block.append_op()
        op.set_type(op_type)
        for key, names in inputs.items():
            op.set_input(key, names)
        for key, names in outputs.items():
            op.set_output(key, names)
    desc.flush()
    path.write_bytes(desc.serialize_to_string())
    return str(path)


def _qdq(x):
    scale = dict(Scale=[x + '.scale'], ZeroPoint=[x + '.zero'])
    return [('quantize_linear', dict(X=[x], **scale), dict(Y=[x + '.q'])),
            ('dequantize_linear', dict(X=[x + '.q'], **scale), dict(Y=[x + '.dq']))]


def test_matmuls_of_quantized_inputs_are_found_and_run_in_float(tmp_path):
    """A Linear (quantized input, weight stored INT8) and an attention product (both inputs
    quantized, one pair shared with the Linear): both are INT8 layers; taking the attention
    product's input quantization off removes only the pair nothing else reads."""
    from segslim.program import (
        block_ops,
        input_quantized_layers,
        read_program,
        run_layers_in_float,
    )
    weight = ('dequantize_linear', dict(X=['w'], Scale=['w.scale'], ZeroPoint=['w.zero']),
              dict(Y=['w.dq']))
    model = _raw_program(tmp_path / 'model.pdmodel', _qdq('x') + [weight] + [
        ('matmul_v2', dict(X=['x.dq'], Y=['w.dq']), dict(Out=['fc']))] + _qdq('fc') + [
        ('matmul_v2', dict(X=['fc.dq'], Y=['x.dq']), dict(Out=['attention'])),
        ('matmul_v2', dict(X=['attention'], Y=['x']), dict(Out=['plain']))])
    assert input_quantized_layers(model) == {'fc': None, 'attention': None}
    out = str(tmp_path / 'float.pdmodel')
    assert run_layers_in_float(model, out, ['attention', 'plain']) == ['attention']
    assert input_quantized_layers(out) == {'fc': None}
    desc = read_program(out)
    ops = {op.output(op.output_names()[0])[0]: op for op in block_ops(desc)}
    assert ops['attention'].input('X') == ['fc'] and ops['attention'].input('Y') == ['x']
    assert 'fc.q' not in ops and 'fc.dq' not in ops  # read by nothing else: gone
    assert 'x.dq' in ops and ops['fc'].input('X') == ['x.dq']  # the Linear still reads it


def test_pairs_of_one_name_go_when_no_layer_reads_them(tmp_path):
    """Two Linears that quantize one tensor (SegFormer's query and key-value): PaddleSlim
    writes both pairs to the same names. With both layers in float both pairs go, or the
    tensor keeps a scale and oneDNN runs both in INT8 anyway; with one of them still
    quantized both stay."""
    from segslim.program import block_ops, read_program, run_layers_in_float
    weight = ('dequantize_linear', dict(X=['w'], Scale=['w.scale'], ZeroPoint=['w.zero']),
              dict(Y=['w.dq']))
    model = _raw_program(tmp_path / 'model.pdmodel', _qdq('x') + _qdq('x') + [weight] + [
        ('matmul_v2', dict(X=['x.dq'], Y=['w.dq']), dict(Out=['q'])),
        ('matmul_v2', dict(X=['x.dq'], Y=['w.dq']), dict(Out=['kv']))])

    def pairs(path):
        desc = read_program(path)  # the ops live as long as their program
        return sorted(op.type() for op in block_ops(desc)
                      if op.type().endswith('quantize_linear') and op.input('X')[0] != 'w')
    both, one = str(tmp_path / 'both.pdmodel'), str(tmp_path / 'one.pdmodel')
    assert run_layers_in_float(model, both, ['q', 'kv']) == ['q', 'kv']
    assert pairs(both) == []
    assert run_layers_in_float(model, one, ['q']) == ['q']
    assert pairs(one) == pairs(model) == ['dequantize_linear'] * 2 + ['quantize_linear'] * 2


def test_paddle_runs_the_kinds_int8_does_not_pay_for_in_float(exported, monkeypatch):
    """--int8_layers auto on Paddle Inference: the kinds the timing leaves in float run in
    float (fewer INT8 convs, by exactly their count), every variant builds and runs, and the
    engine says why."""
    import dataclasses

    from segslim.deploy import engine as engine_mod
    from segslim.deploy.int8_kinds import KindChoice
    kinds = predictor_mod.layer_kinds(os.path.join(exported['int8'], 'model.pdmodel'))
    assert {'grouped', 'depthwise', 'spatial', 'pointwise'} <= set(kinds.values())
    monkeypatch.setattr(predictor_mod, 'reference_int8_convs', lambda lines: set())
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', 'off')  # measured here, not read from a load before
    opts = EngineOptions(precision='int8', input_shape=(1, 3, 64, 64))
    full = Predictor(exported['int8'], dataclasses.replace(opts, int8_layers='all'))
    assert not full.kinds.float_kinds and full.fallback is None
    floated = frozenset({'grouped', 'depthwise'})
    built = []

    def choose(present, build):
        assert sorted(present) == sorted(set(kinds.values()))
        for trial in (frozenset(), floated):
            build(trial)()
            built.append(trial)
        return KindChoice(floated, {'none': 0.02, 'depthwise+grouped': 0.01})
    monkeypatch.setattr(engine_mod, 'choose_float_kinds', choose)
    part = Predictor(exported['int8'], opts)
    assert built == [frozenset(), floated] and part.kinds.float_kinds == floated
    count = sum(kind in floated for kind in kinds.values())
    assert part.ops.int8_conv_ops == full.ops.int8_conv_ops - count > 0
    assert part.precision == 'int8' and 'depthwise, grouped layers run in float' in part.fallback
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert (part.labels(x) == full.labels(x)).mean() >= 0.9
    # matmuls in float: no matrix-product op type left INT8 for oneDNN (a Linear that reads
    # a tensor a quantized conv also reads keeps its scale there)
    told = []
    monkeypatch.setattr(predictor_mod.pi.Config, 'enable_mkldnn_int8',
                        lambda config, types: told.append(types))
    for floats in (frozenset(), frozenset({'matmul'})):
        full._config(('conv2d', 'fc', 'matmul_v2'), None, float_kinds=floats)
    full._config(('fc',), None, float_kinds=frozenset({'matmul'}))  # never "every type"
    assert told == [{'conv2d', 'fc', 'matmul_v2'}, {'conv2d'}, {'fc'}]


def record_input_shapes(monkeypatch, module):
    """The input_shape of every engine `module`.create_predictor loads from now on (a list
    that grows); the engines are the real ones."""
    real, seen = module.create_predictor, []

    def recording(model_dir, opts):
        seen.append(tuple(opts.input_shape))
        return real(model_dir, opts)
    monkeypatch.setattr(module, 'create_predictor', recording)
    return seen


def test_benchmark_engines_make_their_load_choices_at_the_timed_shape(exported, monkeypatch):
    """The engines benchmark() loads choose INT8 per kind at the shape it times, not at the
    options' default: a choice made at 512x512 for rows timed at 64x64 was both slow to make
    and made for another input."""
    from segslim.deploy import benchmark as bench_mod
    seen = record_input_shapes(monkeypatch, bench_mod)
    shape = (1, 3, 64, 64)
    assert tuple(EngineOptions().input_shape) != shape
    report = bench_mod.benchmark([exported['fp32'], exported['int8']], None, EngineOptions(),
                                 shape=shape, warmup=1, repeats=1, with_bf16=False)
    assert len(report.rows) == 2 and seen == [shape, shape]


def test_infer_makes_the_load_choices_at_its_images_shape(exported, tmp_path, monkeypatch):
    """infer.py's engine chooses INT8 per kind at the first batch's shape after the deploy
    transforms, not at the options' default 512x512."""
    from segslim.deploy import engines
    seen = record_input_shapes(monkeypatch, engines)
    folder = tmp_path / 'images'
    folder.mkdir()
    for name in ('a.png', 'b.png'):
        Image.open(os.path.join(exported['data'], 'JPEGImages', 'N0000.jpg')).resize(
            (80, 48)).save(folder / name)
    proc = run_command('deploy/python/infer.py', '--config', exported['fp32'], '--image_path',
                       folder, '--save_dir', tmp_path / 'out', '--batch_size', 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seen == [(2, 3, 48, 80)]


def test_without_the_onednn_library_the_probe_is_skipped(exported, monkeypatch):
    from segslim.deploy import onednn

    def missing():
        raise OSError('libdnnl.so.3: cannot open shared object file')
    monkeypatch.setattr(onednn, 'onednn', missing)
    pred = Predictor(exported['int8'], EngineOptions(precision='int8', int8_layers='all',
                                                     input_shape=(1, 3, 64, 64)))
    assert pred.precision == 'int8' and not pred.fp32_convs
    assert pred.model_file == os.path.join(exported['int8'], 'model.pdmodel')


def test_timing_runs_engine_after_engine_with_a_pause_between(monkeypatch):
    from segslim.deploy import benchmark as bench_mod
    events = []

    class Fake:
        def __init__(self, backend, name):
            self.backend, self.name = backend, name

        def run(self, batch):
            assert batch == self.name  # each predictor on its own batch
            events.append(self.name)

    monkeypatch.setattr(bench_mod.time, 'sleep', lambda s: events.append(f'sleep {s}'))
    preds = [Fake('paddle', 'p1'), Fake('openvino', 'o1'), Fake('paddle', 'p2')]
    times = bench_mod.time_interleaved(preds, ['p1', 'o1', 'p2'], warmup=1, repeats=2,
                                       min_sample_s=0)
    assert [len(t) for t in times] == [2, 2, 2]
    pause = f'sleep {bench_mod.SETTLE_S}'
    # an engine's predictors in a rotating order: each first in as many turns
    first = [pause, 'p1', 'p1', 'p2', 'p2', pause, 'o1', 'o1']
    second = [pause, 'p2', 'p2', 'p1', 'p1', pause, 'o1', 'o1']
    assert events == ['p1', 'o1', 'p2'] + first + second
    events.clear()
    bench_mod.time_interleaved(preds[:1], ['p1'], warmup=0, repeats=1, min_sample_s=0)
    assert events == ['p1', 'p1']  # one engine: nothing to wait for


def test_a_timed_sample_is_the_mean_of_the_runs_that_fill_its_minimum(monkeypatch):
    from segslim.deploy import benchmark as bench_mod
    clock = [0.0]

    class Fake:
        backend = 'paddle'

        def __init__(self, costs):
            self.costs, self.runs = iter(costs), 0

        def run(self, batch):
            self.runs += 1
            clock[0] += next(self.costs)

    monkeypatch.setattr(bench_mod.time, 'perf_counter', lambda: clock[0])
    # 20 ms runs: the untimed run, then 5 runs fill 0.1 s; one 60 ms hiccup among them
    light = Fake([0.02, 0.02, 0.02, 0.06, 0.02, 0.02])
    heavy = Fake([0.5, 0.5])  # longer than the minimum: one run per sample
    times = bench_mod.time_interleaved([light, heavy], [np.zeros(1)] * 2, warmup=0,
                                       repeats=1)
    assert times[0] == [pytest.approx(0.028)] and light.runs == 6
    assert times[1] == [pytest.approx(0.5)] and heavy.runs == 2
    tiny = Fake([1e-6] * 1000)
    bench_mod.time_interleaved([tiny], [np.zeros(1)], warmup=0, repeats=1)
    assert tiny.runs == 1 + bench_mod.MAX_SAMPLE_RUNS


def test_companions_are_timed_in_the_rows_turns_on_their_own_batch(exported, monkeypatch):
    from segslim.deploy import benchmark as bench_mod
    seen, calls = [], []

    class Probe:
        backend = 'paddle'

        def run(self, batch):
            seen.append(batch.shape)
    probe = bench_mod.Companion(Probe(), np.zeros((1, 3, 8, 8), np.float32))
    timed = bench_mod.time_interleaved

    def spy(preds, batches, *args, **kwargs):
        calls.append(len(preds))
        return timed(preds, batches, *args, **kwargs)
    monkeypatch.setattr(bench_mod, 'time_interleaved', spy)
    report = bench_mod.benchmark([exported['fp32']], None, EngineOptions(), shape=(1, 3, 64, 64),
                                 warmup=1, repeats=3, with_bf16=False, companions=[probe])
    assert calls == [2]  # one timing: the row and the companion share the turns
    assert len(report.rows) == 1 and len(probe.samples_s) == 3
    assert set(seen) == {(1, 3, 8, 8)}  # on its own batch, not the rows'


def square_linear_model(folder, column_scales):
    """A quantized program as QAT exports a Linear: x (N,4,8,8) to channels-last, its
    quantize/dequantize pair, a matmul with a square INT8 weight quantized per column (the
    Linear's output channel, quant_axis 1), back to channels-first; returns the weight."""
    from segslim._paddle import paddle, static_mode
    from segslim.modeldir import write_deploy
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (4, 4)).astype(np.float32)
    weight = q * np.asarray(column_scales, np.float32) / 127
    with static_mode():
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            block = main.global_block()

            def const(name, value):
                return paddle.static.create_parameter(
                    list(value.shape), 'float32', name=name,
                    default_initializer=paddle.nn.initializer.Assign(value))
            x = paddle.static.data('x', [None, 4, 8, 8], 'float32')
            t = paddle.transpose(x, [0, 2, 3, 1])
            xs, zero = const('x_scale', np.array([4.0], np.float32)), \
                const('x_zero', np.zeros(1, np.float32))
            ws, wz = const('w_scale', np.asarray(column_scales, np.float32)), \
                const('w_zero', np.zeros(4, np.float32))
            w = const('w', q)
            names = {n: block.create_var(name=n, dtype='float32') for n in ('tq', 'tdq', 'wdq')}
            attrs = {'quant_axis': -1, 'bit_length': 8}
            block.append_op(type='quantize_linear', inputs={'X': t, 'Scale': xs,
                            'ZeroPoint': zero}, outputs={'Y': names['tq']}, attrs=attrs)
            block.append_op(type='dequantize_linear', inputs={'X': names['tq'], 'Scale': xs,
                            'ZeroPoint': zero}, outputs={'Y': names['tdq']}, attrs=attrs)
            block.append_op(type='dequantize_linear', inputs={'X': w, 'Scale': ws,
                            'ZeroPoint': wz}, outputs={'Y': names['wdq']},
                            attrs={'quant_axis': 1, 'bit_length': 8})
            y = paddle.transpose(paddle.matmul(names['tdq'], names['wdq']), [0, 3, 1, 2])
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        # stored as int8, as PaddleSlim saves a quantized weight
        paddle.static.global_scope().find_var('w').get_tensor().set(q.astype(np.int8),
                                                                    paddle.CPUPlace())
        paddle.static.save_inference_model(os.path.join(folder, 'model'), [x], [y], exe,
                                           program=main)
    write_deploy(folder, {'model': 'model.pdmodel', 'params': 'model.pdiparams',
                          'transforms': [], 'input_shape': [None, 4, None, None],
                          'output_op': 'none', 'output_dtype': 'float32', 'quantized': True,
                          'int8_ops': ['conv2d', 'fc']})
    return weight


def test_square_int8_linear_weights_keep_their_output_channel_scales(tmp_path):
    """Paddle's oneDNN INT8 passes dequantize a weight whose scales number its first
    dimension per row; a square Linear's scales are per column. The engine runs the weight
    transposed, per row, so each output channel keeps its scale and the product is the
    program's (a wrong axis puts columns off by up to 2000x here)."""
    weight = square_linear_model(str(tmp_path), [0.01, 1.0, 5.0, 20.0])
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 8, 8)).astype(np.float32)
    step = 4.0 / 127
    rounded = np.clip(np.round(x / step), -127, 127) * step
    expected = np.einsum('nchw,co->nohw', rounded, weight)
    pred = Predictor(str(tmp_path), EngineOptions(device='cpu', precision='int8',
                                                  cpu_threads=1, input_shape=(1, 4, 8, 8),
                                                  int8_layers='all'))
    got = pred.run(x)
    scale = np.abs(expected).max(axis=(0, 2, 3))
    assert (np.abs(got - expected).max(axis=(0, 2, 3)) <= 0.05 * scale).all(), \
        np.abs(got - expected).max(axis=(0, 2, 3)) / scale


def test_a_failed_square_weight_rewrite_loads_the_files_as_they_are(tmp_path, monkeypatch):
    square_linear_model(str(tmp_path), [1.0, 1.0, 1.0, 1.0])

    def fail(*args):
        raise RuntimeError('unreadable')
    monkeypatch.setattr(predictor_mod, 'square_weights_by_rows', fail)
    pred = Predictor(str(tmp_path), EngineOptions(device='cpu', precision='int8', cpu_threads=1,
                                                  input_shape=(1, 4, 8, 8), int8_layers='all'))
    assert pred.model_file == os.path.join(str(tmp_path), 'model.pdmodel')
    assert pred.run(np.zeros((1, 4, 8, 8), np.float32)).shape == (1, 4, 8, 8)


def test_the_kind_choice_is_kept_for_the_program_the_engine_runs(tmp_path, monkeypatch):
    """The kind choice is cached for the program as the engine runs it: a choice timed on
    the program with its square weights as Paddle dequantizes them is not reused once the
    engine runs them per row (nor the other way round), while each is reused as it is."""
    from segslim.deploy import engine as engine_mod
    from segslim.deploy import int8_kinds
    from segslim.deploy.int8_kinds import KindChoice
    square_linear_model(str(tmp_path / 'model'), [1.0, 2.0, 3.0, 4.0])
    calls = []

    def choose(present, build):
        calls.append(list(present))
        return KindChoice(frozenset(), {'none': 0.02})
    monkeypatch.setattr(engine_mod, 'choose_float_kinds', choose)
    monkeypatch.setattr(int8_kinds, 'machine_busy', lambda: False)
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', str(tmp_path / 'cache'))

    def load():
        return Predictor(str(tmp_path / 'model'), EngineOptions(
            device='cpu', precision='int8', cpu_threads=1, input_shape=(1, 4, 8, 8)))
    assert load().program_changes == {'square_weights_by_rows': 1} and calls == [['matmul']]
    assert load().kinds.cached and len(calls) == 1
    monkeypatch.setattr(predictor_mod, 'square_weights_by_rows', lambda *args: 0)
    as_exported = load()  # the program as exported: a choice of its own
    assert as_exported.kinds.cached is None and len(calls) == 2
    assert load().kinds.cached and len(calls) == 2
