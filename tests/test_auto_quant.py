"""auto_quant.py: the decision over its steps (on fakes), one real run, resume, bad input."""
import dataclasses
import json
import os
import time

import pytest
import yaml
from conftest import INSTANT, assert_one_line_error, data_opts, make_row, run_cli, run_command

from segslim.cli import commands, flags, tools  # noqa: F401 (registers make_demo_dataset)
from segslim.cli.auto_quant import AutoQuant, Steps
from segslim.errors import UserError
from segslim.options import timing_shape

FP32 = 0.90


class FakeSteps:
    """Steps with made-up engine results: `mious` maps a candidate to {backend: mIoU} (the
    QAT entry: one dict per round); `ms` maps a candidate to {backend: latency}."""

    def __init__(self, tmp, mious, ms, skip_found=True, fail_at=None, nncf_ready=False):
        self.tmp, self.mious, self.ms = tmp, mious, ms
        self.skip_found, self.fail_at, self.nncf_ready = skip_found, fail_at, nncf_ready
        self.calls = []
        self.qat_round = 0

    def _dir(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, 'deploy.yaml'), 'w') as f:
            yaml.safe_dump({'Deploy': {'model': 'model.pdmodel'}}, f)
        return path

    def _step(self, name):
        self.calls.append(name)
        if name == self.fail_at:
            raise KeyboardInterrupt
        return self._dir(name)

    def export_fp32(self, out):
        return self._step('fp32')

    def ptq(self, out, config=None):
        return self._step('ptq')

    def nncf(self, out, max_drop=None):
        return self._step('nncf_ac' if max_drop else 'nncf')

    def skip_set(self, out, max_drop, backend):
        self.skip_backend = backend
        path = self._step('skip')
        return path if self.skip_found else None

    def recon(self, out):
        return self._step('recon')

    def qat(self, out, iters, resume):
        self.calls.append(f'qat:{iters}:{os.path.basename(resume) if resume else "-"}')
        self.qat_round += 1
        return self._dir('qat'), iters - 10  # the best checkpoint, as Steps.qat reports it

    def speedup(self, fp32_dir, model_dir, backend):
        self.calls.append(f'speed:{os.path.basename(model_dir)}:{backend}')
        return self.ms['fp32'][backend] / self.ms[os.path.basename(model_dir)][backend]

    def checkpoint(self, out, iters):
        return os.path.join(out, f'iter_{iters}')

    def miou(self, model_dir, int8):
        name = os.path.basename(model_dir)
        if name == 'qat':
            return self.mious['qat'][self.qat_round - 1]
        return self.mious[name]

    def bench(self, model_dirs):
        self.calls.append('bench')
        rows = []
        for d in model_dirs:
            name = os.path.basename(d)
            mious = self.mious['qat'][-1] if name == 'qat' else self.mious[name]
            for backend, miou in mious.items():
                rows.append(make_row(d, 'fp32' if name == 'fp32' else 'int8',
                                     self.ms[name][backend] / 1000, backend=backend, miou=miou,
                                     int8_convs=0 if name == 'fp32' else 5, convs=5))
        return rows


def auto(tmp_path, steps, drop=0.005, resume=False):
    return AutoQuant(steps, str(tmp_path / 'run'), drop, max_qat_iters=400, resume=resume)


def test_ptq_within_the_bound_is_enough_and_the_fastest_row_wins(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32, 'openvino': FP32},
        'ptq': {'paddle': FP32 - 0.001, 'openvino': FP32 - 0.004}},
        {'fp32': {'paddle': 50, 'openvino': 40}, 'ptq': {'paddle': 30, 'openvino': 20}})
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice']['candidate'] == 'ptq' and state['choice']['backend'] == 'openvino'
    deploy = yaml.safe_load(open(tmp_path / 'run' / 'best' / 'deploy.yaml'))['Deploy']
    assert deploy['engine'] == 'openvino'
    report = (tmp_path / 'run' / 'report.md').read_text()
    assert 'Choice: ptq on openvino' in report and '| ptq | openvino | int8 | 20.0 |' in report


def test_a_skip_set_is_tried_when_ptq_misses(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32}, 'ptq': {'paddle': FP32 - 0.02},
        'skip': {'paddle': FP32 - 0.003}},
        {'fp32': {'paddle': 50}, 'ptq': {'paddle': 20}, 'skip': {'paddle': 25}})
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'skip', 'speed:skip:paddle', 'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice']['candidate'] == 'skip'  # the faster PTQ row misses the bound


def test_a_skip_set_that_leaves_too_little_int8_does_not_end_the_search(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32}, 'ptq': {'paddle': FP32 - 0.02},
        'skip': {'paddle': FP32 - 0.003}, 'recon': {'paddle': FP32 - 0.01},
        'qat': [{'paddle': FP32 - 0.001}]},
        {'fp32': {'paddle': 50}, 'ptq': {'paddle': 20}, 'skip': {'paddle': 48},
         'recon': {'paddle': 20}, 'qat': {'paddle': 21}})
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'skip', 'speed:skip:paddle', 'recon', 'qat:100:-',
                           'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['candidates']['skip']['too_slow'] and state['choice']['candidate'] == 'qat'


def test_nncf_is_a_candidate_where_openvino_is_and_the_fastest_row_within_wins(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32, 'openvino': FP32},
        'ptq': {'paddle': FP32 - 0.001, 'openvino': FP32 - 0.001},
        'nncf': {'openvino': FP32 - 0.004}},  # an OpenVINO IR: OpenVINO rows only
        {'fp32': {'paddle': 50, 'openvino': 40}, 'ptq': {'paddle': 30, 'openvino': 20},
         'nncf': {'openvino': 15}}, nncf_ready=True)
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'nncf', 'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice'] == {'candidate': 'nncf', 'backend': 'openvino',
                               'dir': str(tmp_path / 'run' / 'best')}
    assert state['candidates']['nncf']['meets'] == ['openvino']
    # the signed change against FP32, under its name (a loss is negative)
    report = (tmp_path / 'run' / 'report.md').read_text()
    assert '| mIoU | vs FP32 |' in report
    assert '| nncf | openvino | int8 | 15.0 | 0.8960 | -0.0040 |' in report


def test_nncf_accuracy_control_is_tried_beside_the_skip_set(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32, 'openvino': FP32},
        'ptq': {'paddle': FP32 - 0.02, 'openvino': FP32 - 0.02},
        'nncf': {'openvino': FP32 - 0.01}, 'nncf_ac': {'openvino': FP32 - 0.004}},
        {'fp32': {'paddle': 50, 'openvino': 40}, 'ptq': {'paddle': 30, 'openvino': 20},
         'nncf': {'openvino': 15}, 'nncf_ac': {'openvino': 18}},
        skip_found=False, nncf_ready=True)
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'nncf', 'skip', 'nncf_ac', 'bench']
    assert steps.skip_backend == 'paddle'  # the first engine where PTQ missed
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice']['candidate'] == 'nncf_ac'  # the faster plain NNCF row misses
    report = (tmp_path / 'run' / 'report.md').read_text()
    assert '| nncf | openvino | int8 | 15.0 |' in report and 'no |' in report


def test_qat_runs_in_rounds_and_stops_at_the_first_that_meets_the_bound(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32}, 'ptq': {'paddle': FP32 - 0.02},
        'skip': {'paddle': FP32 - 0.01}, 'recon': {'paddle': FP32 - 0.009},
        'qat': [{'paddle': FP32 - 0.008}, {'paddle': FP32 - 0.002}, {'paddle': FP32}]},
        {'fp32': {'paddle': 50}, 'ptq': {'paddle': 20}, 'skip': {'paddle': 25},
         'recon': {'paddle': 20}, 'qat': {'paddle': 21}})
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'skip', 'recon', 'qat:100:-', 'qat:200:iter_100',
                           'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice']['candidate'] == 'qat'
    assert state['candidates']['qat']['iters'] == 200


def test_nothing_meets_the_bound_exit_1_with_the_closest_and_the_work_kept(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32}, 'ptq': {'paddle': FP32 - 0.05},
        'recon': {'paddle': FP32 - 0.04}, 'qat': [{'paddle': FP32 - 0.03}] * 4},
        {'fp32': {'paddle': 50}, 'ptq': {'paddle': 20}, 'recon': {'paddle': 20},
         'qat': {'paddle': 21}},
        skip_found=False)
    assert auto(tmp_path, steps).run() == 1
    assert steps.calls[-2:] == ['qat:400:iter_300', 'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice'] is None and set(state['candidates']) == {'fp32', 'ptq', 'skip',
                                                                    'recon', 'qat'}
    assert not (tmp_path / 'run' / 'best').exists()
    assert 'Choice: none' in (tmp_path / 'run' / 'report.md').read_text()
    assert state['closest'] == ('QAT with distillation, 400 iterations (best checkpoint: '
                                'iteration 390) on paddle, drop 0.0300')


def test_reconstruction_within_the_bound_ends_the_search_before_qat(tmp_path):
    steps = FakeSteps(str(tmp_path / 'm'), {
        'fp32': {'paddle': FP32}, 'ptq': {'paddle': FP32 - 0.02},
        'recon': {'paddle': FP32 - 0.003}},
        {'fp32': {'paddle': 50}, 'ptq': {'paddle': 20}, 'recon': {'paddle': 20}},
        skip_found=False)
    assert auto(tmp_path, steps).run() == 0
    assert steps.calls == ['fp32', 'ptq', 'skip', 'recon', 'bench']
    state = json.load(open(tmp_path / 'run' / 'auto_quant.json'))
    assert state['choice']['candidate'] == 'recon'
    assert state['candidates']['recon']['seconds'] >= 0


def test_resume_repeats_no_finished_step(tmp_path):
    mious = {'fp32': {'paddle': FP32}, 'ptq': {'paddle': FP32 - 0.02},
             'skip': {'paddle': FP32 - 0.001}}
    ms = {'fp32': {'paddle': 50}, 'ptq': {'paddle': 20}, 'skip': {'paddle': 25}}
    killed = FakeSteps(str(tmp_path / 'm'), mious, ms, fail_at='skip')
    with pytest.raises(KeyboardInterrupt):
        auto(tmp_path, killed).run()
    assert killed.calls == ['fp32', 'ptq', 'skip']
    again = FakeSteps(str(tmp_path / 'm'), mious, ms)
    assert auto(tmp_path, again, resume=True).run() == 0
    assert again.calls == ['skip', 'speed:skip:paddle', 'bench']


def test_the_bound_must_be_a_fraction(tmp_path):
    for bad in (0, 1, -0.1, 5):
        with pytest.raises(UserError, match='--max_miou_drop'):
            AutoQuant(None, str(tmp_path), bad, 100)


def test_auto_quant_end_to_end_on_the_instant_model(fp32_run, tmp_path):
    out = tmp_path / 'aq'
    proc = run_cli('slim/quant/auto_quant.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                   '--save_dir', out, '--backend', 'paddle', '--max_miou_drop', 0.05,
                   '--calib_images', 4, '--max_qat_iters', 4, '--input_shape', 1, 3, 64, 64,
                   '--opts', *data_opts(fp32_run['data']))
    state = json.load(open(out / 'auto_quant.json'))
    assert {'fp32', 'ptq'} <= set(state['candidates'])
    assert all(r['backend'] == 'paddle' for r in state['rows'])
    report = (out / 'report.md').read_text()
    assert '| fp32 | paddle | fp32 |' in report and '| ptq | paddle | int8 |' in report
    # the exit code follows the rows: 0 with a choice that is the fastest INT8 row within
    # the bound, 1 when no INT8 row is within it
    within = [r for r in state['rows'] if r['precision'] == 'int8' and r['meets']]
    assert all(r['meets'] == (r['drop'] <= 0.05) for r in state['rows'])
    if within:
        assert proc.returncode == 0, proc.stderr[-3000:]
        fastest = min(within, key=lambda r: r['s_per_img'])
        assert state['choice']['candidate'] == fastest['candidate']
        deploy = yaml.safe_load(open(out / 'best' / 'deploy.yaml'))['Deploy']
        assert deploy['engine'] == 'paddle' and deploy['quantized']
    else:
        assert proc.returncode == 1 and state['choice'] is None, proc.stderr[-3000:]
        assert not (out / 'best').exists()


def test_auto_quant_bad_inputs_are_one_line(fp32_run, tmp_path):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    args = ['--config', INSTANT, '--save_dir', tmp_path / 'o', '--opts',
            *data_opts(fp32_run['data'])]
    proc = run_command('slim/quant/auto_quant.py', '--model_path', weights,
                       '--max_miou_drop', 1.5, *args)
    assert_one_line_error(proc, '--max_miou_drop', 'between 0 and 1')
    proc = run_command('slim/quant/auto_quant.py', '--model_path', tmp_path / 'no.pdparams',
                       *args)
    assert_one_line_error(proc, 'no.pdparams', 'does not exist')
    fake = tmp_path / 'site' / 'openvino'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('No module named openvino')\n")
    proc = run_cli('slim/quant/auto_quant.py', '--model_path', weights, '--backend',
                   'openvino', *args, env={'PYTHONPATH': str(tmp_path / 'site')})
    assert_one_line_error(proc, '--backend openvino', 'not installed')
    other = os.path.join(os.path.dirname(INSTANT), '..', '..', 'configs', 'unet',
                         'unet_cityscapes_1024x512_160k.yml')
    proc = run_command('slim/quant/auto_quant.py', '--model_path', weights,
                       '--config', other, '--save_dir', tmp_path / 'u', '--opts',
                       *data_opts(fp32_run['data']))
    assert_one_line_error(proc, 'model.pdparams')


def test_a_qat_round_exports_its_best_checkpoint_and_the_next_resumes(fp32_run, tmp_path):
    from segslim.train.checkpoint import read_state
    steps = Steps(INSTANT, os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                  str(tmp_path), ['paddle'], None, 2, 'cpu')
    ran, exported_from = [], []

    def forked(command, **given):  # Steps._run's command, from the suite's preloaded server
        ran.append(command)
        if command == 'qat_export':
            exported_from.append(str(given['model_path']))
        proc = run_cli(f'slim/quant/{command}.py', *flags.to_argv(**given), '--opts',
                       *data_opts(fp32_run['data']))
        assert proc.returncode == 0, proc.stderr[-3000:]
    steps._run = forked
    out = str(tmp_path / 'qat')
    first, best = steps.qat(out, 2, None)
    assert 1 <= best <= 2 and os.path.isfile(os.path.join(first, 'model.pdmodel'))
    model, best = steps.qat(out, 4, steps.checkpoint(out, 2))
    state = read_state(steps.checkpoint(out, 4))[0]
    assert model == first and state['iter'] == 4 and best == state['best_iter']
    # evaluated at every iteration of the resumed round (4 - 2 < QAT_EVALS_PER_ROUND)
    assert sorted(os.listdir(os.path.join(out, 'train'))) == [
        'best_model', 'config.yaml', 'iter_1', 'iter_2', 'iter_3', 'iter_4',
        'quant_summary.txt']
    deploy = yaml.safe_load(open(os.path.join(model, 'deploy.yaml')))['Deploy']
    assert deploy['quantized'] and ran == ['qat_train', 'qat_export'] * 2
    best = os.path.join(out, 'train', 'best_model', 'model.pdparams')
    assert exported_from == [best, best]  # not the round's last checkpoint


def _nested_step(save_dir: str) -> int:
    """A child that runs a step in a child of its own, as auto-quant does under a comparison."""
    commands.run_step('make_demo_dataset', save_dir=save_dir, num_train=1, num_val=1,
                      num_test=0, size=16)
    return 0


def test_a_step_in_a_child_can_run_steps_in_children_of_its_own(tmp_path):
    commands.call_in_child('nested', _nested_step, str(tmp_path / 'd'))
    assert len(os.listdir(tmp_path / 'd' / 'JPEGImages')) == 2


def _sleep_after_writing_pid(path: str) -> int:
    with open(path + '.tmp', 'w') as f:
        f.write(str(os.getpid()))
    os.replace(path + '.tmp', path)
    time.sleep(120)
    return 0


def _waits_on_a_sleeping_child(path: str) -> None:
    commands.call_in_child('sleeper', _sleep_after_writing_pid, path)


def test_sigterm_to_a_step_runner_ends_its_child(tmp_path):
    import multiprocessing
    import signal
    path = str(tmp_path / 'pid')
    parent = multiprocessing.get_context('spawn').Process(target=_waits_on_a_sleeping_child,
                                                          args=(path,))
    parent.start()
    deadline = time.time() + 60
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.1)
    child = int(open(path).read())
    os.kill(parent.pid, signal.SIGTERM)
    parent.join(30)
    assert parent.exitcode == 143
    try:
        os.kill(child, 0)
    except ProcessLookupError:
        return
    os.kill(child, signal.SIGKILL)
    raise AssertionError('the child outlived its parent')


def test_a_step_runs_its_workflow_with_the_commands_own_options_in_a_child(tmp_path):
    """The child gets the command's parsed options; its user error, its exit code and its
    crash each come back as one UserError naming the step."""
    args = commands.options('make_demo_dataset', save_dir=tmp_path / 'd', num_train=2,
                            num_val=1, num_test=0, size=16)
    assert args.num_train == 2 and args.seed == 0  # the parser's default
    commands.run_in_child('make_demo_dataset', args)
    assert len(os.listdir(tmp_path / 'd' / 'JPEGImages')) == 3
    args.size = 0  # refused by the workflow itself
    with pytest.raises(UserError, match='make_demo_dataset failed: --num_train'):
        commands.run_in_child('make_demo_dataset', args)
    with pytest.raises(UserError, match='make_demo_dataset: invalid options'):
        commands.options('make_demo_dataset', size='big')
    assert flags.to_argv(a=1, b=True, c=False, d=None, e=[1, 2]) == [
        '--a', '1', '--b', '--e', '1', '2']


def test_every_export_of_the_steps_takes_the_export_shape(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(commands, 'run_step', lambda command, **given: ran.append(
        (command, given.get('input_shape'))))
    steps = Steps(INSTANT, 'm.pdparams', str(tmp_path), ['paddle', 'onnxruntime'], None, 1,
                  'cpu', export_shape=(1, 3, 64, 64))
    steps.export_fp32(str(tmp_path / 'fp32'))
    steps.ptq(str(tmp_path / 'ptq'))
    steps.recon(str(tmp_path / 'recon'))
    steps.nncf(str(tmp_path / 'nncf'))
    assert ran == [(c, [1, 3, 64, 64]) for c in ('export', 'ptq', 'ptq', 'ptq')]
    with pytest.raises(UserError, match='--input_shape 1 3 32 32 differs from --export_shape'):
        timing_shape([1, 3, 32, 32], [1, 3, 64, 64], (1, 3, 512, 512))
    assert timing_shape(None, [1, 3, 64, 64], (1, 3, 512, 512)) == [1, 3, 64, 64]
    assert timing_shape(None, None, (1, 3, 512, 512)) == [1, 3, 512, 512]


def test_qat_fine_tunes_adam_trained_configs_at_a_tenth_of_their_rate():
    from conftest import ROOT

    from segslim.config import load_config
    from segslim.options import qat_learning_rate

    def rate(name):
        return qat_learning_rate(load_config(os.path.join(ROOT, 'configs', 'street', name)))
    assert rate('bisenetv2_street_256x128.yml') == 0.001  # SGD: PaddleSeg's QAT rate
    assert rate('pp_liteseg_stdc1_street_256x128.yml') == pytest.approx(1e-4)  # AdamW 0.001
    assert rate('segformer_b0_street_256x128.yml') == pytest.approx(6e-5)  # AdamW 6e-4


def test_the_chosen_row_s_bf16_rest_is_written_for_its_engine(tmp_path):
    """An INT8 row measured with its unquantized ops in bf16 is what the folder says, so the
    engine runs best/ as the row that won (SegFormer-B0 lost 0.5 pt on OpenVINO with them
    in f32, none in bf16)."""
    class Bf16Rest(FakeSteps):
        def bench(self, model_dirs):
            rows = super().bench(model_dirs)
            ptq = next(r for r in rows if r.model_dir.endswith('ptq'))
            rows.append(dataclasses.replace(ptq, rest='bf16', s_per_img=ptq.s_per_img / 2))
            return rows
    mious = {'fp32': {'openvino': FP32}, 'ptq': {'openvino': FP32 - 0.001}}
    ms = {'fp32': {'openvino': 40}, 'ptq': {'openvino': 20}}
    for steps, rest in ((Bf16Rest(str(tmp_path / 'a'), mious, ms), 'bf16'),
                        (FakeSteps(str(tmp_path / 'b'), mious, ms), None)):
        run = tmp_path / f'run-{rest}'
        assert AutoQuant(steps, str(run), 0.005, max_qat_iters=400).run() == 0
        deploy = yaml.safe_load(open(run / 'best' / 'deploy.yaml'))['Deploy']
        assert deploy['engine'] == 'openvino' and deploy.get('rest') == rest
