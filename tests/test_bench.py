"""make bench: input shapes, the summary JSON, and the oneDNN time profile."""
import contextlib
import os

import pytest
from conftest import ROOT, has_row, make_report, make_row


def test_parse_verbose_sums_by_kind_and_dtype():
    from segslim.deploy.onednn import parse_verbose
    lines = [
        'onednn_verbose,info,prim_template:operation,engine,primitive,...,exec_time',
        'onednn_verbose,exec,cpu,convolution,brgconv:avx512_core_vnni,forward_inference,'
        'src_u8::blocked:acdb::f0 wei_s8::blocked:AcdB::f0,,alg:convolution_direct,mb1,1.5',
        'onednn_verbose,exec,cpu,convolution,jit:avx512_core,forward_inference,'
        'src_f32::blocked:aBcd16b::f0 wei_f32::blocked:ABcd16b16a::f0,,,mb1,2.0',
        'onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:abcd::f0 '
        'dst_s8::blocked:abcd::f0,,,1x3x512x512,0.25',
        'onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_s8 dst_s8,,,1x3,0.75',
        'some other line, not oneDNN',
    ]
    assert parse_verbose(lines) == {'convolution int8': 1.5, 'convolution f32': 2.0,
                                    'reorder': 1.0}


def test_verbose_of_paddle_3_finds_the_reference_int8_convs():
    """oneDNN 3.x as Paddle 3.2 ships it: a `v1,primitive` header and `src:u8` memory
    (lines from BiSeNetV2's INT8 run on AVX2)."""
    from segslim.deploy.onednn import parse_verbose, reference_int8_convs
    lines = [
        'onednn_verbose,v1,primitive,exec,cpu,convolution,ref:any,forward_inference,'
        'src:u8:a:blocked:acdb::f0 wei:s8:a:blocked:abcde::f0 bia:f32::blocked:a::f0 '
        'dst:s8:a:blocked:acdb::f0,attr-scales:src0:0:f32+dst:0:f32+wei:3:f32,'
        'alg:convolution_direct,g32mb1_ic32oc192_ih64oh64kh3sh1dh0ph1_iw64ow64kw3sw1dw0pw1,'
        '60.85',
        'onednn_verbose,v1,primitive,exec,cpu,convolution,jit_uni_int8:avx2,forward_inference,'
        'src:s8:a:blocked:acdb::f0 wei:s8:ap:blocked:ABcd2b8a4b::f3:s8m1:sa0.5 '
        'dst:u8::blocked:acdb::f0,attr-scales:src0:0:f32,alg:convolution_direct,'
        'mb1_ic3oc16_ih512oh256kh3sh2dh0ph0_iw512ow256kw3sw2dw0pw0,0.38',
        'onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,'
        'src:f32::blocked:abcd::f0 dst:s8::blocked:abcd::f0,attr-scales:src0:0:f32,,'
        '1x3x512x512,0.25',
        'onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,ref:any,'
        'forward_inference,src:u8,,,g32mb1_ic32oc192,0.1',
    ]
    assert parse_verbose(lines) == pytest.approx({'convolution int8': 61.23, 'reorder': 0.25})
    assert reference_int8_convs(lines) == {(32, 32, 192, 3, 3, 1, 1)}


def test_bench_shape_and_zoo_list():
    from segslim.bench.models import bench_shape, zoo_configs
    from segslim.config import load_config
    configs = zoo_configs(os.path.join(ROOT, 'configs'))
    assert len(configs) >= 17
    assert not [c for c in configs if 'quick_start' in c or os.sep + 'street' + os.sep in c]
    seven = [c for c in configs if bench_shape(load_config(c, required=('model',)), 512) ==
             [1, 3, 512, 1024]]
    assert len(seven) == 7 and all('resnet50_os8' in c for c in seven)


def test_summary_rows_and_geomean():
    from segslim.bench.zoo_report import ZooResult, format_markdown, summary

    def report(name, fp32, bf16, int8):
        def row(precision, s):
            return make_row(name, precision, s, speedup=fp32 / s,
                            int8_convs=4 if precision == 'int8' else 0)
        return ZooResult(model=name, config=name + '.yml', report=make_report(
            [row('fp32', fp32), row('bf16', bf16), row('int8', int8)]))
    reports = [report('a', 4.0, 2.0, 1.0), report('b', 9.0, 6.0, 1.0)]
    summ = summary(reports)
    assert [r['speedup'] for r in summ['rows']] == [4.0, 9.0]
    assert summ['geomean_speedup'] == pytest.approx(6.0)  # sqrt(4 * 9)
    assert summ['geomean_speedup_vs_bf16'] == pytest.approx((2.0 * 6.0) ** 0.5)
    assert set(summ['rows'][0]) >= {'model', 'config', 'input_shape', 'fp32_s', 'bf16_s',
                                    'int8_s', 'speedup', 'speedup_vs_bf16', 'int8_ops',
                                    'quantizable_ops'}
    text = format_markdown(reports)
    assert has_row(text, 'a', '64x64', '4000.0', '2000.0', '1000.0', '4.00x', '2.00x', '4/4',
                   '-')
    assert 'Geometric mean: INT8 6.00x over FP32' in text


def test_summary_of_onnxruntime_rows_only():
    """`make bench` with --backend onnxruntime alone: no Paddle rows, still a summary and a
    report (it failed on the missing Paddle FP32 row)."""
    from segslim.bench.zoo_report import ZooResult, format_markdown, summary
    rows = [make_row('a', 'fp32', 4.0, backend='onnxruntime'),
            make_row('a', 'int8', 2.0, backend='onnxruntime', int8_convs=4)]
    results = [ZooResult(model='a', config='a.yml', report=make_report(rows))]
    row = summary(results)['rows'][0]
    assert row['fp32_s'] is None and row['onnxruntime_speedup'] == 2.0
    assert (row['best_int8_engine'], row['gain']) == ('onnxruntime', 2.0)
    assert 'onnxruntime' in format_markdown(results)


def test_summary_puts_each_model_against_its_own_probe():
    from segslim.bench.ceiling import apply_ceilings
    from segslim.bench.zoo_report import ZooResult, format_markdown, summary
    from segslim.deploy.bench_report import Ceiling
    results = []
    # each model's probe was timed in its own turns: the machine was faster for b's INT8
    probes = {'a': (2.0, 1.0, 1.6, 0.5), 'b': (2.0, 0.8, 1.6, 0.4)}
    for name, (pd_int8, ov_int8) in (('a', (2.0, 1.0)), ('b', (3.0, 2.5))):
        pd_fp32, pd_probe, ov_fp32, ov_probe = probes[name]
        ceilings = {'paddle': Ceiling('paddle', pd_fp32, pd_probe, None, '5/5 convs INT8'),
                    'openvino': Ceiling('openvino', ov_fp32, ov_probe, None, '5/5 convs INT8')}
        rows = [make_row(name, 'fp32', 4.0), make_row(name, 'int8', pd_int8, int8_convs=4),
                make_row(name, 'fp32', 3.0, backend='openvino'),
                make_row(name, 'int8', ov_int8, backend='openvino', int8_convs=4)]
        for r in rows:
            if r.int8:
                r.speedup_vs_engine_fp32 = (4.0 if r.backend == 'paddle' else 3.0) / r.s_per_img
        report = make_report(rows)
        apply_ceilings(report, ceilings)
        results.append(ZooResult(model=name, config=name + '.yml', report=report))
    summ = summary(results)
    a, b = summ['rows']
    # a's probe: best unquantized 1.6 (OpenVINO FP32) over best INT8 0.5 (OpenVINO); b's 4.0
    assert a['ceiling']['int8_vs_best_unquantized'] == pytest.approx(3.2)
    assert b['ceiling']['int8_vs_best_unquantized'] == pytest.approx(4.0)
    # the run's ceiling: medians over the models' probes, and their spread
    assert summ['ceiling']['int8_vs_best_unquantized'] == pytest.approx(3.6)
    assert summ['ceiling']['int8_vs_best_unquantized_range'] == pytest.approx([3.2, 4.0])
    assert summ['ceiling']['paddle']['int8_x'] == pytest.approx((2.0 + 2.5) / 2)
    assert summ['ceiling']['models'] == 2
    assert (a['best_int8_engine'], a['best_int8_s'], a['best_unquantized_s']) == \
        ('openvino', 1.0, 3.0)
    assert a['gain'] == 3.0 and a['gain_of_ceiling'] == pytest.approx(3.0 / 3.2)
    assert (b['best_int8_engine'], b['gain']) == ('openvino', 3.0 / 2.5)
    assert b['gain_of_ceiling'] == pytest.approx(1.2 / 4.0)
    assert summ['worst_gain_of_ceiling'] == pytest.approx(1.2 / 4.0)
    assert summ['geomean_gain'] == pytest.approx((3.0 * 1.2) ** 0.5)
    # each INT8 row against its own engine's ceiling, from its own model's probe
    assert results[0].report.rows[1].of_ceiling == pytest.approx(2.0 / 2.0)
    assert results[1].report.rows[1].of_ceiling == pytest.approx((4.0 / 3.0) / 2.5)
    assert results[0].report.rows[3].of_ceiling == pytest.approx(3.0 / 3.2)
    text = format_markdown(results)
    assert has_row(text, 'a', 'OpenVINO 1000.0', 'OpenVINO 3000.0', '3.00x', '3.20x', '94%')
    assert has_row(text, 'b', 'OpenVINO 2500.0', 'OpenVINO 3000.0', '1.20x', '4.00x', '30%')
    assert 'best unquantized 3.60x (from 3.20x to 4.00x between models)' in text


def test_openvino_layers_by_kind_and_what_int8_can_gain():
    from segslim.deploy.profile import attainable_gain, openvino_kind, time_shares
    assert openvino_kind('Convolution', 'brgconv_avx512_amx_1x1_i8') == 'convolution int8'
    assert openvino_kind('GroupConvolution', 'brgconv_avx512_dw_bf16') == 'convolution bf16'
    assert openvino_kind('Convolution', 'brgconv_avx512_amx_I8') == 'convolution int8'
    assert openvino_kind('FullyConnectedQuantizedLegacy', 'brgemm_avx512_amx_i8') == \
        'matmul int8'
    assert openvino_kind('Interpolate', 'jit_avx512_bf16') == 'resampling'
    assert openvino_kind('Transpose', 'unknown_i8') == 'layout'
    assert openvino_kind('AdaptiveAvgPool', 'jit_avx512_f32') == 'pooling'
    assert openvino_kind('Bucketize', 'ref_f32') == 'bucketize'
    # onnxruntime: the op type says the data (QLinearConv reads uint8, FusedConv float)
    from segslim.deploy.profile import onnxruntime_kind
    assert [onnxruntime_kind(t) for t in ('QLinearConv', 'FusedConv', 'Conv', 'QLinearMatMul',
                                          'MatMulIntegerToFloat', 'FusedMatMul', 'Gemm')] == \
        ['convolution int8', 'convolution f32', 'convolution f32', 'matmul int8',
         'matmul int8', 'matmul f32', 'matmul f32']
    assert [onnxruntime_kind(t) for t in ('Resize', 'ReorderInput', 'QLinearConcat',
                                          'NhwcMaxPool', 'QLinearAdd', 'Transpose',
                                          'LayerNormalization', 'ArgMax', 'Cast')] == \
        ['resampling', 'reorder', 'concat', 'pooling', 'eltwise', 'layout',
         'layer_normalization', 'argmax', 'cast']
    # half of the unquantized time in convs: with convs 2x faster, 1 / (0.5 + 0.25)
    unquantized = {'by_kind': {'convolution bf16': 4.0, 'matmul bf16': 1.0, 'resampling': 3.0},
                   'native_ms': 2.0, 'total_ms': 10.0}
    assert attainable_gain(unquantized, 2.0) == pytest.approx(1 / 0.75)
    assert attainable_gain(unquantized, 1.0) == pytest.approx(1.0)
    shares = time_shares(unquantized)
    assert shares['float convs, matmuls'] == pytest.approx(0.5)
    assert (shares['resize'], shares['other']) == pytest.approx((0.3, 0.2))


def test_the_gain_profile_is_of_the_fastest_rows_against_the_models_probe(monkeypatch):
    from segslim.bench import models
    from segslim.deploy.bench_report import Ceiling
    rows = [make_row('fp32', 'fp32', 4.0), make_row('int8', 'int8', 2.0, int8_convs=4),
            make_row('fp32', 'bf16', 3.0, backend='openvino'),
            make_row('int8', 'int8', 1.5, backend='openvino', int8_convs=4),
            make_row('fp32', 'fp32', 2.5, backend='onnxruntime')]
    report = make_report(rows)
    asked = []

    def profile_row(row, threads, shape, runs):
        asked.append((row.backend, row.precision.value))
        compute = 6.0 if row.int8 else 8.0
        return {'by_kind': {('convolution int8' if row.int8 else 'convolution bf16'): compute},
                'native_ms': 2.0, 'total_ms': compute + 2.0}
    monkeypatch.setattr(models, 'profile_row', profile_row)
    assert models.gain_profile(report, 2, (1, 3, 64, 64), 3).attainable is None  # no probe
    report.ceiling = {'openvino': Ceiling('openvino', 4.0, 1.0, 2.0, '5/5 convs INT8')}
    prof = models.gain_profile(report, 2, (1, 3, 64, 64), 3)
    assert asked[-2:] == [('openvino', 'int8'), ('onnxruntime', 'fp32')]
    # the probe: best unquantized 2.0 (bf16) over INT8 1.0; 8 of 10 ms in convs
    assert prof.attainable == pytest.approx(10.0 / (2.0 + 8.0 / 2.0))

    def no_profiler(row, threads, shape, runs):
        return None if row.backend == 'onnxruntime' else profile_row(row, threads, shape, runs)
    monkeypatch.setattr(models, 'profile_row', no_profiler)
    assert models.gain_profile(report, 2, (1, 3, 64, 64), 3) is None


def test_summary_says_what_each_model_allows():
    from segslim.bench.zoo_report import ZooResult, format_markdown, summary
    from segslim.deploy.profile import GainProfile
    results = []
    for name, attainable in (('a', 2.0), ('b', None)):
        rows = [make_row(name, 'fp32', 3.0), make_row(name, 'int8', 1.0, int8_convs=4)]
        int8 = {'by_kind': {'convolution int8': 0.5, 'resampling': 0.25}, 'native_ms': 0.25,
                'total_ms': 1.0, 'engine': 'paddle'}
        unquantized = {'by_kind': {'convolution f32': 2.0}, 'native_ms': 1.0, 'total_ms': 3.0}
        results.append(ZooResult(model=name, config=name + '.yml', report=make_report(rows),
                                 gain_profile=GainProfile(int8, unquantized, attainable)))
    summ = summary(results)
    a, b = summ['rows']
    assert a['best_int8_profile_ms'] == results[0].gain_profile.int8
    assert a['best_unquantized_profile_ms'] == results[0].gain_profile.unquantized
    assert (a['attainable_gain'], a['gain_of_attainable']) == (2.0, pytest.approx(1.5))
    assert (b['attainable_gain'], b['gain_of_attainable']) == (None, None)
    assert summ['geomean_gain_of_attainable'] == pytest.approx(1.5)
    text = format_markdown(results)
    assert has_row(text, 'a', 'Paddle Inference', '50%', '0%', '25%', '0%', '0%', '25%',
                   '2.00x', '150%')
    assert has_row(text, 'b', 'Paddle Inference', '50%', '0%', '25%', '0%', '0%', '25%',
                   '-', '-')


def test_ratios_pair_the_turns_of_one_run():
    from segslim.deploy.bench_report import Ceiling, int8_vs_best_unquantized
    from segslim.deploy.results import paired_ratio
    # the second turn ran slow for both rows: their medians say 3 / 2.0, each turn 2.0
    ours = [1.0, 3.0, 1.0]
    peer = [2.0, 6.0, 2.0]
    assert paired_ratio(peer, ours) == 2.0 and paired_ratio([2.0, 6.0], [1.0]) == 4.0
    rows = [make_row('fp32', 'fp32', 4.0, backend='openvino'),
            make_row('int8', 'int8', 1.0, backend='openvino', int8_convs=4),
            make_row('nncf', 'int8', 3.0, backend='openvino', int8_convs=4)]
    rows[0].samples_s = [4.0, 4.0, 2.0]
    rows[1].samples_s, rows[2].samples_s = ours, [1.5, 6.0, 3.0]
    rows[2].peer = 'nncf_openvino'
    report = make_report(rows)
    assert report.gain().gain == 2.0  # per turn 4, 1.33, 2
    (peer_result,) = report.peers()
    # per turn 1.5, 2, 3 (the medians: 3.0 / 1.0)
    assert peer_result.vs_ours == 2.0 and report.peers_json()['peers']['nncf_openvino_s'] == 3.0
    probe = Ceiling('openvino', 3.0, 1.0, 2.5, '5/5 convs INT8', fp32_samples=(2.0, 8.0, 3.0),
                    int8_samples=(0.5, 2.0, 1.0), bf16_samples=(1.0, 4.0, 2.5))
    # the medians would say 3.0, 1.2 and 2.5 (bf16 over INT8)
    assert (probe.int8_x, probe.bf16_x) == (4.0, 2.0)
    assert int8_vs_best_unquantized({'openvino': probe}) == 2.0


def test_a_killed_zoo_benchmark_goes_on_from_the_models_it_finished(tmp_path, monkeypatch):
    from segslim.bench import models
    from segslim.bench.parts import clear_parts
    from segslim.bench.zoo_report import ZooResult
    measured = []

    def bench_one(config, name, *args):
        if name == 'c':
            raise KeyboardInterrupt  # the kill, on the third model
        measured.append(name)
        return ZooResult(model=name, config=config, report=make_report(
            [make_row(name, 'fp32', 1.0)]))
    monkeypatch.setattr(models, 'ceiling_probe', lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(models, '_bench_one', bench_one)
    parts = str(tmp_path / 'benchmark.parts')
    with pytest.raises(KeyboardInterrupt):
        models.bench_models(['a.yml', 'b.yml', 'c.yml'], repeats=5, parts_dir=parts)
    assert measured == ['a', 'b'] and sorted(os.listdir(parts)) == ['a.pkl', 'b.pkl']
    monkeypatch.setattr(models, '_bench_one', lambda config, name, *a: bench_one(
        config, 'c2' if name == 'c' else name, *a))
    results = models.bench_models(['a.yml', 'b.yml', 'c.yml'], repeats=5, parts_dir=parts)
    assert measured == ['a', 'b', 'c2'] and [r.model for r in results] == ['a', 'b', 'c2']
    assert results[0].report.rows[0].s_per_img == 1.0
    # other settings measure again, and so does another CPU of the same model name
    models.bench_models(['a.yml'], repeats=3, parts_dir=parts)
    assert measured[-1] == 'a'
    measured.clear()
    real = models.cpu_features()
    monkeypatch.setattr(models, 'cpu_features', lambda: dict(real, isa='other ISA'))
    models.bench_models(['b.yml'], repeats=5, parts_dir=parts)
    assert measured == ['b']
    clear_parts(parts)
    assert not os.path.exists(parts)


def test_the_ceiling_probe_runs_every_conv_int8(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from segslim.bench import ceiling
    from segslim.options import EngineOptions
    asked = []

    def create_predictor(model_dir, opts):
        asked.append(opts)
        return SimpleNamespace(int8_ran=True, ops=SimpleNamespace(int8_conv_ops=5, conv_ops=5))
    monkeypatch.setattr(ceiling, 'create_predictor', create_predictor)
    probe = ceiling.CeilingProbe(str(tmp_path), ['paddle'],
                                 EngineOptions(device='cpu', cpu_threads=1), bf16=False)
    assert [(o.precision, o.int8_layers) for o in asked] == [('fp32', 'auto'), ('int8', 'all')]
    # the turns a benchmark timed them in: FP32 over INT8 per turn 2, 4, 2
    for companion, turns in zip(probe.companions, ([2.0, 8.0, 3.0], [1.0, 2.0, 1.5])):
        assert companion.batch.shape == (1, 3, ceiling.SIDE, ceiling.SIDE)
        companion.samples_s = turns
    out = probe.ceilings()
    assert out['paddle'].int8_x == 2.0 and out['paddle'].fp32_s == 3.0
    assert out['paddle'].ran == '5/5 convs INT8' and out['paddle'].bf16_s is None


def test_profiles_take_the_median_run_so_one_slow_run_does_not_move_them():
    """A shared VM stalls now and then: the profile's wall time and each node's time are
    medians over the runs, where a mean would carry the stall into every share."""
    import time

    from segslim.deploy.engine import median_per_key
    from segslim.deploy.onnxruntime_engine import OnnxRuntimePredictor
    from segslim.deploy.profile import _profile_nodes
    runs = [{'conv': 1.0, 'resize': 0.5}, {'conv': 50.0, 'resize': 0.5}, {'conv': 1.2}]
    assert median_per_key(runs) == {'conv': 1.2, 'resize': 0.5}
    assert median_per_key([{'conv': 1.0, 'topk': 3.0}, {'conv': 1.0}, {'conv': 1.0}]) == \
        {'conv': 1.0}  # in one run of three: its median is 0

    class Stalling:  # the fourth timed run stalls for 0.3 s
        backend = 'openvino'
        calls = 0

        def run(self, images):
            self.calls += 1
            if self.calls == 3 + 4:
                time.sleep(0.3)

        def node_times(self, images, runs, between=None):
            for _ in range(runs):  # each profiled run after a timed one: the same minutes
                between()
            return {('Convolution', 'brgconv_avx512_I8'): 2.0}
    stalling = Stalling()
    prof = _profile_nodes(stalling, (1, 3, 8, 8), 5, lambda key: 'convolution int8')
    assert stalling.calls == 3 + 5
    assert prof['wall_ms'] < 30  # the mean of the five runs is 60 ms or more
    assert prof['by_kind'] == {'convolution int8': 2.0} and prof['engine'] == 'openvino'

    # onnxruntime's profile: the n-th event of a node is its n-th run, the first left out
    pred = object.__new__(OnnxRuntimePredictor)
    durations = {'conv_0': [900, 1000, 40000, 1100], 'add_0': [10, 200, 200, 200]}
    events = [{'name': name, 'ts': run * 100 + i, 'dur': dur,
               'args': {'op_name': 'QLinearConv' if name.startswith('conv') else 'QLinearAdd'}}
              for i, (name, durs) in enumerate(durations.items())
              for run, dur in enumerate(durs)]
    pred._profiled = lambda images, runs, between=None: events
    assert pred.node_times(None, 3) == {('QLinearConv', ''): 1.1, ('QLinearAdd', ''): 0.2}
