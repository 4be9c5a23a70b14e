"""The engines' own quantizers timed beside ours (segslim.bench.peers), the ONNX-only model folder
they need, and INT8 only where it pays (segslim.deploy.int8_kinds)."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from conftest import (
    INSTANT,
    assert_one_line_error,
    data_opts,
    has_row,
    make_report,
    make_row,
    run_command,
)

from segslim.bench.peers import PEERS, peers_of
from segslim.builder import build_dataset
from segslim.config import load_config
from segslim.deploy.benchmark import benchmark
from segslim.deploy.engines import available_backends, create_predictor, runs_model
from segslim.deploy.int8_kinds import KINDS, choose_float_kinds, conv_kind
from segslim.deploy.report import format_report
from segslim.deploy.results import NOT_FASTER_NOTE
from segslim.errors import UserError
from segslim.modeldir import model_format, read_deploy
from segslim.options import EngineOptions

SHAPE = (1, 3, 64, 64)
BACKENDS = available_backends()


def engine(model_dir, backend, precision='fp32', **kw):
    return create_predictor(model_dir, EngineOptions(backend=backend, precision=precision,
                                                     input_shape=SHAPE, **kw))


@pytest.fixture(scope='module')
def ours(exported, tmp_path_factory):
    """The FP32 and QAT exports, with model.onnx where onnxruntime is installed."""
    base = tmp_path_factory.mktemp('ours')
    dirs = {name: str(base / name) for name in ('fp32', 'int8')}
    for name, folder in dirs.items():
        shutil.copytree(exported[name], folder)
    if 'onnxruntime' in BACKENDS:
        from segslim.bench.models import sample_images
        from segslim.onnx.export import export_onnx
        export_onnx(dirs['fp32'])
        export_onnx(dirs['int8'], 'onnxruntime', sample_images(64, 2))
    return dirs


@pytest.fixture(scope='module')
def peers(ours, exported, tmp_path_factory):
    cfg = load_config(INSTANT, opts=data_opts(exported['data']))
    return peers_of(ours['fp32'], cfg, str(tmp_path_factory.mktemp('peers')), BACKENDS, 4)


def test_each_peer_writes_a_model_folder_for_its_one_engine(peers):
    made = {os.path.basename(d): d for d in peers}
    assert not os.path.exists('sym_shape_infer_temp.onnx')  # nothing left in the cwd
    assert set(made) == {n for n, p in PEERS.items() if p.engine in BACKENDS}
    for name, folder in made.items():
        deploy = read_deploy(folder)
        assert deploy['quantized'] and deploy['peer'] == {'quantizer': name,
                                                          'engine': PEERS[name].engine}
        assert deploy['calibration'] == {'method': name, 'images': 4}
        assert [b for b in BACKENDS if runs_model(b, folder)] == [PEERS[name].engine]
        pred = engine(folder, PEERS[name].engine, 'int8')
        assert pred.peer == name and pred.int8_ran, (name, pred.ops)
        # run as the peer wrote it: no weights rewritten, no layer taken out of INT8
        assert getattr(pred, 'seven_bit', 0) == 0
        if hasattr(pred, 'kinds'):
            assert not pred.kinds.float_kinds and not pred.kinds.seconds
    if 'onnxruntime_quantize_static' in made:
        folder = made['onnxruntime_quantize_static']
        assert sorted(os.listdir(folder)) == ['deploy.yaml', 'model.onnx']
        deploy = read_deploy(folder)
        assert model_format(deploy) == 'onnx' and deploy['params'] == deploy['model']
        with pytest.raises(UserError, match='holds an ONNX model'):
            engine(folder, 'paddle')


def test_benchmark_times_the_peers_beside_ours(peers, ours, exported):
    dataset = build_dataset(load_config(INSTANT, opts=data_opts(exported['data'])),
                            'val_dataset')
    report = benchmark([ours['fp32'], ours['int8'], *peers], dataset,
                       EngineOptions(input_shape=SHAPE), shape=SHAPE, warmup=1, repeats=3,
                       with_bf16=False, backends=BACKENDS)
    peer_rows = [r for r in report.rows if r.peer]
    assert sorted((r.peer, r.backend) for r in peer_rows) == sorted(
        (os.path.basename(d), PEERS[os.path.basename(d)].engine) for d in peers)
    assert all(r.int8 and 0.0 <= r.agreement <= 1.0 for r in peer_rows)
    out = report.to_json()
    for row in peer_rows:
        ours = min((r for r in report.rows
                    if r.int8 and not r.peer and r.backend == row.backend),
                   key=lambda r: r.s_per_img)
        assert out['peers'][f'{row.peer}_s'] == row.s_per_img
        # the median of the turns' ratios
        assert out['ours_vs_peers'][row.peer] == pytest.approx(
            np.median(np.divide(row.samples_s, ours.samples_s)))
        assert out['peer_agreement'][row.peer] == row.accuracy.pixel_agreement
    assert report.gain().best_int8.peer is None  # the gain is ours alone
    text = format_report(report)
    assert 'Peers (the engines\' own quantizers' in text
    for row in peer_rows:
        assert has_row(text, row.model_dir)


def test_peers_json_and_gain_leave_peer_rows_out():
    rows = [make_row('fp32', 'fp32', 4.0), make_row('ours', 'int8', 2.0, int8_convs=4),
            make_row('fp32', 'fp32', 3.0, backend='openvino'),
            make_row('ours', 'int8', 1.5, backend='openvino', int8_convs=4),
            make_row('nncf', 'int8', 1.0, backend='openvino', int8_convs=4),
            make_row('slim', 'int8', 2.5, int8_convs=4)]
    rows[4].peer, rows[5].peer = 'nncf_openvino', 'paddleslim_ptq_paddle'
    rows[4].sample_agreement = 0.9
    report = make_report(rows)
    assert report.first_int8() == 1
    gain = report.gain()
    assert gain.best_int8 is rows[3] and gain.gain == 2.0
    out = report.to_json()
    assert out['peers'] == {'nncf_openvino_s': 1.0, 'paddleslim_ptq_paddle_s': 2.5}
    assert out['ours_vs_peers'] == {'nncf_openvino': pytest.approx(1.0 / 1.5),
                                    'paddleslim_ptq_paddle': 1.25}
    assert out['peer_agreement'] == {'nncf_openvino': 0.9, 'paddleslim_ptq_paddle': None}
    assert out['ours_vs_peers_range'] == {'nncf_openvino': None, 'paddleslim_ptq_paddle': None}
    assert 'ours 0.67x as fast, agreement' in format_report(report)


def test_ours_against_a_peer_is_the_median_turn_with_the_spread_of_the_turns():
    """On a shared machine one run's ratio moves by several percent: the report gives the
    median of the per-turn ratios and the lowest and highest single turn beside it."""
    from segslim.bench.zoo_report import ZooResult, format_markdown
    rows = [make_row('fp32', 'fp32', 3.0, backend='openvino'),
            make_row('ours', 'int8', 1.0, backend='openvino', int8_convs=4),
            make_row('nncf', 'int8', 1.0, backend='openvino', int8_convs=4)]
    rows[2].peer = 'nncf_openvino'
    rows[0].samples_s = [3.0, 3.0, 3.0]
    rows[1].samples_s = [1.0, 2.0, 1.0]  # one slow turn of ours
    rows[2].samples_s = [0.9, 2.2, 1.05]
    report = make_report(rows)
    peer = report.peers()[0]
    assert peer.vs_ours == pytest.approx(1.05) and peer.vs_ours_range == pytest.approx((0.9, 1.1))
    assert report.to_json()['ours_vs_peers_range'] == {'nncf_openvino': pytest.approx([0.9, 1.1])}
    assert 'ours 1.05x as fast (single turns 0.90-1.10)' in format_report(report)
    text = format_markdown([ZooResult('m', 'm.yml', report)])
    assert has_row(text, 'm', '1000.0 ms, ours 1.05x (0.90-1.10)')


def test_benchmark_py_peers_flag(exported, tmp_path):
    out = tmp_path / 'report.json'
    proc = run_command('deploy/python/benchmark.py', '--config', INSTANT, '--model_dirs',
                       exported['fp32'], exported['int8'], '--peers', '--calib_images', 4,
                       '--input_shape', *SHAPE, '--repeats', 2, '--warmup', 1, '--no_ceiling',
                       '--json', out, '--opts', *data_opts(exported['data']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data['peers']) == ['paddleslim_ptq_paddle_s']  # --backend paddle only
    assert data['ours_vs_peers']['paddleslim_ptq_paddle'] > 0
    proc = run_command('deploy/python/benchmark.py', '--model_dirs', exported['fp32'],
                       '--peers', '--no_ceiling')
    assert_one_line_error(proc, '--peers needs --config')


def test_conv_kinds():
    assert conv_kind(1, 16, 32, [3, 3]) == 'spatial'
    assert conv_kind(1, 16, 32, [1, 1]) == 'pointwise'
    assert conv_kind(16, 1, 1, [3, 3]) == 'depthwise'
    assert conv_kind(16, 1, 6, [3, 3]) == 'grouped'  # a channel multiplier of 6
    assert conv_kind(4, 8, 8, [3, 3]) == 'grouped'


@pytest.fixture
def clock(monkeypatch):
    """The kind choice's clock, moved only by the runs of fake variants (runs_for): a
    loaded machine's sleeps moved by more than the choice's margin."""
    from segslim.deploy import int8_kinds
    now = [0.0]
    monkeypatch.setattr(int8_kinds.time, 'perf_counter', lambda: now[0])
    return now


def runs_for(clock, secs):
    """A fake variant's run: moves `clock` by `secs`."""
    def run():
        clock[0] += secs
    return run


def test_choose_float_kinds_keeps_int8_where_it_is_faster(clock):
    # a model whose grouped convs are slower in INT8 and whose spatial convs are faster
    def build(kinds):
        return runs_for(clock, 0.02 - 0.008 * ('grouped' in kinds) +
                        0.008 * ('spatial' in kinds))
    choice = choose_float_kinds(['spatial', 'grouped', 'pointwise'], build)
    assert choice.float_kinds == {'grouped'}
    every = 'grouped+pointwise+spatial'
    assert set(choice.seconds) == {'none', 'grouped', 'grouped+pointwise', 'grouped+spatial',
                                   every}
    assert choice.seconds['grouped'] < choice.seconds['none']
    # each comparison as made: the variant, what it was timed against, their time ratio;
    # last, every kind in float against the choice
    assert [t[:2] for t in choice.trials] == [('grouped', 'none'), ('grouped+pointwise',
                                                                    'grouped'),
                                              ('grouped+spatial', 'grouped'),
                                              (every, 'grouped')]
    ratios = {variant: ratio for variant, _, ratio in choice.trials}
    assert ratios['grouped'] < 0.8 < 1.2 < ratios['grouped+spatial']
    assert 'grouped {:.2f}x of none'.format(ratios['grouped']) in choice.describe()
    # a kind whose float variant is no faster than the model as quantized is not chosen
    flat = choose_float_kinds(['spatial', 'grouped'], lambda kinds: runs_for(clock, 0.01))
    assert flat.float_kinds == frozenset() and not flat.describe()
    assert 'grouped layers run in float' in choice.describe()
    assert list(KINDS).index('grouped') < list(KINDS).index('spatial')


def test_kinds_that_pay_only_together_run_in_float_together(clock):
    """Each kind alone is 2 % faster in float (within the margin: kept INT8 by the greedy
    steps), both together 10 % (as when the quantized regions between them go only with
    both): every kind runs in float, checked once more against the model as quantized."""
    def build(kinds):
        return runs_for(clock, 0.010 * {0: 1.0, 1: 0.98, 2: 0.90}[len(kinds)])
    choice = choose_float_kinds(['spatial', 'pointwise'], build)
    assert choice.float_kinds == {'pointwise', 'spatial'}
    assert [t[:2] for t in choice.trials] == [
        ('pointwise', 'none'), ('spatial', 'none'), ('pointwise+spatial', 'none'),
        ('pointwise+spatial', 'none')]
    assert choice.trials[-1][2] == pytest.approx(0.90)
    # when the greedy steps timed every kind in float already, it is not timed again
    def spatial_slower(kinds):
        return runs_for(clock, 0.010 * (0.9 if 'pointwise' in kinds else 1.0) *
                        (1.2 if 'spatial' in kinds else 1.0))
    greedy = choose_float_kinds(['spatial', 'pointwise'], spatial_slower)
    assert greedy.float_kinds == {'pointwise'}
    assert [t[:2] for t in greedy.trials] == [('pointwise', 'none'),
                                              ('pointwise+spatial', 'pointwise')]


def test_the_kind_choice_pairs_turns_against_load_that_comes_and_goes(clock):
    """Each variant is timed on a fake clock while the machine's load changes from one turn
    to the next (up to 1.6x): the float variant 6 % faster is chosen, one 1 % faster is not,
    and a single chosen kind is not timed against the quantized model a second time."""
    calls = []
    load = iter(np.random.default_rng(0).uniform(1.0, 1.6, 10 ** 4))
    state = {'turn_load': 1.0, 'runs': 0}

    def build(kinds):
        secs = 0.010 * (1 - 0.06 * ('grouped' in kinds)) * (1 - 0.01 * ('spatial' in kinds))

        def run():
            if state['runs'] % 4 == 0:  # a new turn: two runs of each variant
                state['turn_load'] = next(load)
            state['runs'] += 1
            calls.append(frozenset(kinds))
            clock[0] += secs * state['turn_load']
        return run
    choice = choose_float_kinds(['grouped', 'spatial'], build)
    assert choice.float_kinds == {'grouped'}
    assert frozenset() in calls and not any(c == frozenset() for c in calls[len(calls) // 2:])


def test_a_close_call_is_timed_twice_as_long(clock):
    """A kind whose first nine turns land within the margin of the threshold is timed for
    nine more and decided on all eighteen; a clear call is timed once, for three turns."""
    from segslim.deploy import int8_kinds
    runs = {'grouped': 0}

    def build(kinds):
        def run():
            secs = 0.010 * (1.5 if 'spatial' in kinds else 1.0)
            if 'grouped' in kinds:  # 2 % faster in the first pairing, 10 % in the second
                runs['grouped'] += 1
                secs *= 0.98 if runs['grouped'] <= 2 + 2 * 9 else 0.90
            clock[0] += secs
        return run
    choice = choose_float_kinds(['grouped'], build)
    assert runs['grouped'] == 2 * (2 + 2 * 9)  # two pairings of warm-up and nine turns
    assert choice.float_kinds == {'grouped'}  # 0.94x over both: faster than the margin
    ratio = {variant: r for variant, _, r in choice.trials}['grouped']
    assert ratio == pytest.approx(0.94)
    runs['grouped'] = 10 ** 6  # 0.90x from the start: chosen after three turns
    clear = choose_float_kinds(['grouped', 'spatial'], build)
    # its own trial, then grouped and grouped+spatial in spatial's (1.5x: clear as well)
    assert runs['grouped'] == 10 ** 6 + 3 * (2 + 2 * 3)
    assert clear.float_kinds == {'grouped'}
    # a turn on the other side of the band (or inside it) takes all nine turns
    assert not int8_kinds._clear([1.0, 1.0, 1.0], [0.90, 0.90, 0.95])
    assert not int8_kinds._clear([1.0, 1.0, 1.0], [1.05, 0.90, 1.05])
    assert int8_kinds._clear([1.0, 1.0, 1.0], [1.05, 1.5, 1.04])


def test_a_slow_model_is_timed_for_three_turns_or_its_budget(clock):
    """A model that runs for seconds (a 1024x512 ResNet50 head) is timed for three turns,
    close calls included, once the turns have taken the budget; a fast one for nine."""
    from segslim.deploy import int8_kinds

    def timed(secs, ratio):
        return int8_kinds._compare(runs_for(clock, secs), runs_for(clock, secs * ratio))
    # four runs a turn: 3 turns of 4 x 4 s pass the 30 s budget, a close call's 3 more too
    assert len(timed(4.0, 0.98).first) == 3 + 3
    assert len(timed(4.0, 1.00).first) == 3
    assert len(timed(0.01, 1.00).first) == 9
    assert len(timed(0.01, 0.98).first) == 18
    # the turns before the budget is spent decide: 30 s in 2-s runs is four turns
    assert len(timed(2.0, 1.00).first) == 4


def assert_auto_claims_what_ran(auto, kinds):
    """--int8_layers auto timed the kinds. The instant model's convs are tiny, so on a busy
    machine every kind may time faster in float (one of the trials): the engine then says INT8
    did not pay instead of claiming an INT8 row."""
    assert 'none' in auto.kinds.seconds
    if set(kinds) <= auto.kinds.float_kinds:
        assert not auto.int8_ran and auto.precision_note == NOT_FASTER_NOTE
    else:
        assert auto.int8_ran


@pytest.mark.skipif('openvino' not in BACKENDS, reason='openvino is not installed')
def test_openvino_runs_the_float_kinds_in_float(exported):
    from segslim.deploy.openvino_graph import quantized_kinds, with_float_kinds
    pred = engine(exported['int8'], 'openvino', 'int8', int8_layers='all')
    assert not pred.kinds.float_kinds and pred.int8_ran
    kinds = [k for _, k in quantized_kinds(pred.model)]
    assert {'grouped', 'depthwise'} & set(kinds) and 'spatial' in kinds
    float_kinds = {'grouped', 'depthwise'}
    model = with_float_kinds(pred.model, float_kinds)
    left = [k for _, k in quantized_kinds(model)]
    assert sorted(left) == sorted(k for k in kinds if k not in float_kinds)
    from segslim.deploy.openvino_engine import runtime_summary
    model.reshape({model.inputs[0].get_any_name(): list(SHAPE)})
    compiled = pred.core.compile_model(model, 'CPU', pred.properties)
    ops = runtime_summary(compiled.get_runtime_model())
    assert ops.int8_conv_ops == pred.ops.int8_conv_ops - (len(kinds) - len(left))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    same = (compiled({0: x})[compiled.outputs[0]] == pred.run(x)).mean()
    assert same > 0.9, same
    auto = engine(exported['int8'], 'openvino', 'int8')  # the default: timed per kind
    assert_auto_claims_what_ran(auto, kinds)


@pytest.mark.skipif('onnxruntime' not in BACKENDS, reason='onnxruntime is not installed')
def test_onnxruntime_runs_the_float_kinds_in_float(ours, exported):
    import onnx

    from segslim.deploy.onnxruntime_engine import quantized_kinds, with_float_kinds
    folder = ours['int8']
    pred = engine(folder, 'onnxruntime', 'int8', int8_layers='all')
    assert not pred.kinds.float_kinds and pred.int8_ran
    model = onnx.load(pred.onnx_path)
    kinds = [k for _, k in quantized_kinds(model)]
    assert {'grouped', 'depthwise'} & set(kinds) and 'spatial' in kinds
    floated = with_float_kinds(model, {'grouped', 'depthwise', 'pointwise'})
    assert sorted(k for _, k in quantized_kinds(floated)) == sorted(
        k for k in kinds if k == 'spatial')
    onnx.checker.check_model(floated)
    assert len(floated.graph.node) < len(model.graph.node)  # the float layers' Q/DQ pruned
    import onnxruntime as ort
    session = ort.InferenceSession(floated.SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    # a val image: on noise the instant model's two logits nearly tie, and which side INT8
    # rounding lands on depends on the CPU's kernels (an AMX Xeon: 85 % INT8-FP32 agreement)
    dataset = build_dataset(load_config(INSTANT, opts=data_opts(exported['data'])),
                            'val_dataset')
    x = np.asarray(dataset.sample(0)['img'], np.float32)[None]
    same = (session.run(None, {session.get_inputs()[0].name: x})[0] == pred.run(x)).mean()
    assert same > 0.9, same
    auto = engine(folder, 'onnxruntime', 'int8')
    assert_auto_claims_what_ran(auto, kinds)


def test_int8_rows_with_the_rest_in_bf16_count_for_gain_and_peers():
    rows = [make_row('fp32', 'fp32', 4.0),
            make_row('fp32', 'bf16', 2.0, backend='openvino'),
            make_row('ours', 'int8', 2.2, backend='openvino', int8_convs=4),
            make_row('ours', 'int8', 1.6, backend='openvino', int8_convs=4),
            make_row('nncf', 'int8', 2.0, backend='openvino', int8_convs=4),
            make_row('nncf', 'int8', 1.2, backend='openvino', int8_convs=4)]
    rows[3].rest = rows[5].rest = 'bf16'
    rows[4].peer = rows[5].peer = 'nncf_openvino'
    report = make_report(rows)
    assert report.gain().best_int8 is rows[3] and report.gain().gain == pytest.approx(1.25)
    # each peer once, its fastest row
    assert report.peers_json()['peers'] == {'nncf_openvino_s': 1.2}
    assert report.peers_json()['ours_vs_peers'] == {'nncf_openvino': pytest.approx(0.75)}
    assert rows[3].type_label == 'INT8+BF16' and rows[2].type_label == 'INT8'
    assert rows[3].to_json()['rest'] == 'bf16'
    from segslim.bench.zoo_report import ZooResult, summary
    row = summary([ZooResult('m', 'm.yml', report)])['rows'][0]
    # the legacy keys keep the INT8 row with the rest in FP32
    assert row['openvino_int8_s'] == 2.2 and row['openvino_int8_bf16_rest_s'] == 1.6
    rows[2].sample_agreement, rows[3].sample_agreement = 0.99, 0.98
    row = summary([ZooResult('m', 'm.yml', report)])['rows'][0]
    assert row['agreement']['openvino_int8'] == 0.99
    assert row['agreement']['openvino_int8_bf16_rest'] == 0.98


def test_openvino_runs_the_rest_of_an_int8_model_in_bf16_when_asked(exported):
    import openvino
    if 'BF16' not in openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'):
        pytest.skip('this CPU has no bf16 in OpenVINO')
    from segslim.deploy.engines import create_predictor
    from segslim.options import EngineOptions
    opts = dict(backend='openvino', input_shape=(1, 3, 64, 64), int8_layers='all')
    f32 = create_predictor(exported['int8'], EngineOptions(precision='int8', **opts))
    bf16 = create_predictor(exported['int8'], EngineOptions(precision='bf16', **opts))
    assert (f32.rest, f32.properties['INFERENCE_PRECISION_HINT']) == (None, 'f32')
    assert (bf16.rest, bf16.properties['INFERENCE_PRECISION_HINT']) == ('bf16', 'bf16')
    assert bf16.precision == 'int8' and bf16.ops.int8_conv_ops == f32.ops.int8_conv_ops > 0


def test_choice_cache_keys_by_contents_and_settings_and_keeps_the_newest(tmp_path,
                                                                          monkeypatch):
    """A choice is read back for the same files and settings only, the oldest go, and one
    timed on a busy machine is timed again when a later load finds the machine quiet."""
    from segslim.deploy import int8_kinds
    from segslim.deploy.int8_kinds import ChoiceCache, KindChoice
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(int8_kinds, 'CACHE_FILES', 2)
    busy = [False]
    monkeypatch.setattr(int8_kinds, 'machine_busy', lambda: busy[0])
    model = tmp_path / 'model.pdmodel'
    model.write_bytes(b'one')
    choice = KindChoice(frozenset({'grouped'}), {'none': 0.02, 'grouped': 0.01})
    ChoiceCache([str(model)], {'threads': 2}).save(choice)
    got = ChoiceCache([str(model)], {'threads': 2}).load()
    assert got.float_kinds == {'grouped'} and got.seconds == choice.seconds and got.cached
    assert ChoiceCache([str(model)], {'threads': 1}).load() is None
    # made by an earlier version of the choice: timed again
    version = int8_kinds.CHOICE_VERSION
    monkeypatch.setattr(int8_kinds, 'CHOICE_VERSION', version + 1)
    assert ChoiceCache([str(model)], {'threads': 2}).load() is None
    monkeypatch.setattr(int8_kinds, 'CHOICE_VERSION', version)
    assert ChoiceCache([str(model)], {'threads': 2}).load() is not None
    model.write_bytes(b'two')  # another model in the same file: measured again
    assert ChoiceCache([str(model)], {'threads': 2}).load() is None
    for threads in (3, 4):
        time.sleep(0.01)  # distinct modification times
        ChoiceCache([str(model)], {'threads': threads}).save(choice)
    assert len(os.listdir(tmp_path / 'cache' / 'int8_kinds')) == 2
    assert ChoiceCache([str(model)], {'threads': 4}).load() is not None
    # timed on a busy machine: kept while it stays busy, timed again once it is quiet
    busy[0] = True
    ChoiceCache([str(model)], {'threads': 5}).save(choice)
    assert ChoiceCache([str(model)], {'threads': 5}).load() is not None
    assert ChoiceCache([str(model)], {'threads': 4}).load() is not None  # timed quiet
    busy[0] = False
    assert ChoiceCache([str(model)], {'threads': 5}).load() is None
    assert ChoiceCache([str(model)], {'threads': 4}).load() is not None
    ChoiceCache([str(model)], {'threads': 5}).save(choice)  # the new timing replaces it
    busy[0] = True
    assert ChoiceCache([str(model)], {'threads': 5}).load() is not None
    monkeypatch.setenv('SEGSLIM_CACHE_DIR', 'off')
    assert ChoiceCache([str(model)], {'threads': 4}).load() is None
