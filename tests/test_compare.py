"""tools/compare_methods.py: every method on one trained model, on each engine, and the
accuracy goals of the many-class benchmark read off its lines."""
import json
import os

import yaml
from conftest import (
    INSTANT,
    assert_one_line_error,
    data_opts,
    make_report,
    make_row,
    run_cli,
    run_command,
    table_rows,
)

from segslim.bench.compare import Line, comparison, goals
from segslim.deploy.results import Accuracy


def _acc(miou, class_iou):
    return Accuracy(miou=miou, class_iou=list(class_iou), acc=0.9, pixel_agreement=0.99)


def test_the_comparison_runs_each_method_once_and_keeps_it(fp32_run, tmp_path):
    out = str(tmp_path / 'cmp')
    args = ['--config', INSTANT, '--model_path',
            os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'), '--save_dir', out,
            '--methods', 'ptq_abs_max', '--no_peers', '--backend', 'paddle', '--calib_images', 2,
            '--repeats', 1, '--export_shape', 1, 3, 64, 64, '--thin', '1',
            '--opts', *data_opts(fp32_run['data'])]
    proc = run_cli('tools/compare_methods.py', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, 'times.json')) as f:
        times = json.load(f)
    assert sorted(times) == ['fp32', 'ptq_abs_max'] and min(times.values()) > 0
    rows = table_rows(open(os.path.join(out, 'compare.md')).read())
    methods = [r[0] for r in rows[1:]]
    assert methods == ['FP32', 'ptq_abs_max'], rows
    assert rows[0][4] == '1' and rows[2][1] != '0/56'  # the thin class's column; INT8 ran
    report = json.load(open(os.path.join(out, 'report.json')))
    assert [r['precision'] for r in report['rows']] == ['fp32', 'int8']
    # --export_shape: every export at that fixed shape, timed at it
    for folder in ('fp32', 'ptq_abs_max'):
        with open(os.path.join(out, folder, 'deploy.yaml')) as f:
            assert yaml.safe_load(f)['Deploy']['input_shape'] == [1, 3, 64, 64], folder
    assert report['input_shape'] == [1, 3, 64, 64]
    again = run_cli('tools/compare_methods.py', *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'ptq_abs_max is done' in again.stdout + again.stderr
    assert json.load(open(os.path.join(out, 'times.json'))) == times


def test_bad_values_are_one_line_before_any_work(fp32_run, tmp_path):
    model = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    base = ['--config', INSTANT, '--save_dir', str(tmp_path / 'c'), '--opts',
            *data_opts(fp32_run['data'])]
    proc = run_command('tools/compare_methods.py', *base, '--model_path', model, '--thin', 'pole')
    assert_one_line_error(proc, '--thin pole')
    proc = run_command('tools/compare_methods.py', *base, '--model_path', str(tmp_path / 'x'))
    assert_one_line_error(proc, '--model_path')
    proc = run_command('tools/compare_methods.py', *base, '--model_path', model,
                       '--max_miou_drop', 5)
    assert_one_line_error(proc, '--max_miou_drop')
    proc = run_command('tools/compare_methods.py', *base, '--model_path', model,
                       '--export_shape', 1, 3, 64, 64, '--input_shape', 1, 3, 32, 32)
    assert_one_line_error(proc, '--input_shape 1 3 32 32', '--export_shape 1 3 64 64')
    assert not os.path.exists(tmp_path / 'c')


def _lines(miou_by_method, thin_by_method, backend='openvino'):
    rows = {'fp32': make_row('fp32', 'fp32', 0.01, backend=backend)}
    rows['fp32'].accuracy = _acc(0.70, [0.9, 0.5])
    for name, miou in miou_by_method.items():
        rows[name] = make_row(name, 'int8', 0.005, backend=backend)
        rows[name].accuracy = _acc(miou, [0.9, thin_by_method.get(name, 0.5)])
    report = make_report(list(rows.values()))
    return comparison(report, {r: r for r in rows}, {n: 1.0 for n in rows}, ['road', 'pole'],
                      ['pole'])


def test_goals_say_met_missed_or_not_applicable():
    lines = _lines({'ptq_abs_max': 0.68, 'ptq_recon': 0.694, 'qat': 0.698, 'qat_distill': 0.697,
                    'auto': 0.697}, {'auto': 0.49})
    assert [ln.method for ln in lines] == ['fp32', 'ptq_abs_max', 'ptq_recon', 'qat',
                                           'qat_distill', 'auto']
    assert isinstance(lines[0], Line) and abs(lines[1].drop - 0.02) < 1e-9
    said = goals(lines, 0.005)
    assert said[0].startswith('openvino: auto-quant 0.30 pt below FP32, worst thin class 1.00 '
                              'pt below FP32: met') and said[0].endswith(
        '(goal: <= 0.5 pt below, every thin class <= 1.5 pt)'), said
    assert 'ptq_abs_max 2.00 pt below FP32, ptq_recon 0.60 pt below FP32: met' in said[1], said
    assert 'does not apply' in said[2]
    missed = goals(_lines({'auto': 0.697, 'ptq_abs_max': 0.68, 'ptq_recon': 0.675},
                          {'auto': 0.47}), 0.005)
    assert 'MISSED' in missed[0] and 'MISSED' in missed[1]
    assert goals(_lines({'ptq_avg': 0.69}, {}), 0.005) == []
