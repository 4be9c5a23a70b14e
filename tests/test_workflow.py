"""The real CLIs end to end on tiny data: train -> val -> qat_train -> qat_val -> exports."""
import json
import os
import re

import yaml
from conftest import INSTANT, assert_one_line_error, data_opts, run_cli, run_command


def losses(stdout):
    return [float(v) for v in re.findall(r'loss: ([0-9.]+)', stdout)]


def test_train_lowers_loss_and_writes_checkpoints(fp32_run):
    values = losses(fp32_run['stdout'])
    assert len(values) == 4 and values[-1] < values[0]
    run = fp32_run['dir']
    for name in ('best_model/model.pdparams', 'iter_10/model.pdparams', 'iter_20/model.pdopt',
                 'iter_20/train_state.json', 'config.yaml'):
        assert os.path.isfile(os.path.join(run, name)), name
    saved = yaml.safe_load(open(os.path.join(run, 'config.yaml')))
    assert saved['iters'] == 20 and saved['train_dataset']['dataset_root'] == fp32_run['data']
    assert not [n for n in os.listdir(run) if '.tmp-' in n or '.old-' in n]


def test_use_vdl_writes_scalars(fp32_run):
    from visualdl import LogReader
    folder = os.path.join(fp32_run['dir'], 'vdl')
    logs = [n for n in os.listdir(folder) if n.startswith('vdlrecords')]
    assert logs, os.listdir(folder)
    reader = LogReader(file_path=os.path.join(folder, logs[0]))
    tags = reader.get_tags()['scalar']
    assert 'Train/loss' in tags and 'Evaluate/miou' in tags
    steps = [r.id for r in reader.get_data('scalar', 'Train/loss')]
    assert steps == [5, 10, 15, 20]


def test_val_is_above_chance(fp32_run, tmp_path):
    out = tmp_path / 'metrics.json'
    proc = run_cli('val.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                   '--json', out, '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr
    metrics = json.load(open(out))
    assert 'mIoU' in proc.stdout and 'Class IoU' in proc.stdout
    # always predicting background scores about 0.5 mIoU here
    assert metrics['miou'] > 0.6
    assert len(metrics['class_iou']) == 2 and metrics['class_iou'][1] > 0.2


def test_qat_run_quantizes_and_keeps_best(qat_run):
    assert 'QAT (Conv2D/Linear): quantizing 64 of 64 layers' in qat_run['stdout']
    run = qat_run['dir']
    assert os.path.isfile(os.path.join(run, 'best_model', 'model.pdparams'))
    assert os.path.isfile(os.path.join(run, 'iter_10', 'train_state.json'))
    assert 'best validation mIoU' in qat_run['stdout']


def test_qat_val_and_fp32_weights_refused(fp32_run, qat_run):
    proc = run_cli('slim/quant/qat_val.py', '--config', INSTANT, '--model_path',
                   os.path.join(qat_run['dir'], 'best_model', 'model.pdparams'),
                   '--opts', *data_opts(qat_run['data']))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'mIoU: 0\.[5-9]', proc.stdout)
    proc = run_command('slim/quant/qat_val.py', '--config', INSTANT, '--model_path',
                       os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                       '--opts', *data_opts(qat_run['data']))
    assert_one_line_error(proc, 'FP32 weights', 'qat_train')


def test_qat_export_is_int8_and_verified(exported):
    deploy = yaml.safe_load(open(os.path.join(exported['int8'], 'deploy.yaml')))['Deploy']
    assert deploy['model'] == 'model.pdmodel' and deploy['params'] == 'model.pdiparams'
    assert deploy['transforms'] == [{'type': 'Normalize'}] and deploy['quantized'] is True
    m = re.search(r'agrees with the QAT model on ([0-9.]+)% of pixels', exported[
        'qat_export_stdout'])
    assert m, exported['qat_export_stdout'][-2000:]
    assert float(m.group(1)) >= 99.9  # below that qat_export warns
    int8 = os.path.getsize(os.path.join(exported['int8'], 'model.pdiparams'))
    fp32 = os.path.getsize(os.path.join(exported['fp32'], 'model.pdiparams'))
    assert int8 < 0.4 * fp32  # INT8 weights


def test_val_aug_eval_and_sliding_window(fp32_run, tmp_path):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    results = []
    for i, extra in enumerate(([], ['--aug_eval', '--scales', 0.75, 1.0, '--flip_horizontal'],
                               ['--is_slide', '--crop_size', 32, 32, '--stride', 24, 24])):
        out = tmp_path / f'{i}.json'
        proc = run_cli('val.py', '--config', INSTANT, '--model_path', weights, *extra,
                       '--json', out, '--opts', *data_opts(fp32_run['data']))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert re.search(r'mIoU: 0\.[4-9]', proc.stdout), proc.stdout[-1000:]
        results.append(json.load(open(out)))
    # ignoring either flag would give the plain evaluation's numbers
    plain = results[0]['class_iou']
    assert results[1]['class_iou'] != plain and results[2]['class_iou'] != plain


def test_plain_dataset_type_with_file_lists(fp32_run, tmp_path):
    root = fp32_run['data']
    cfg = yaml.safe_load(open(INSTANT))
    cfg['_base_'] = os.path.join(os.path.dirname(INSTANT), cfg['_base_'])
    for key, mode in (('train_dataset', 'train'), ('val_dataset', 'val')):
        cfg[key] = {'_inherited_': False, 'type': 'Dataset', 'dataset_root': root,
                    'num_classes': 2, 'mode': mode,
                    mode + '_path': os.path.join(root, mode + '_list.txt'),
                    'transforms': cfg['train_dataset']['transforms'] if mode == 'train'
                    else [{'type': 'Normalize'}]}
    path = tmp_path / 'plain.yml'
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli('train.py', '--config', path, '--iters', 2, '--do_eval', '--save_dir',
                   tmp_path / 'out')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'mIoU' in proc.stdout


def test_qat_export_heads(qat_run, tmp_path):
    import numpy as np

    from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
    from segslim.options import EngineOptions
    weights = os.path.join(qat_run['dir'], 'best_model', 'model.pdparams')
    for flag, dtype, channels in (('--with_softmax', 'float32', 2),
                                  ('--without_argmax', 'float32', 2)):
        out = tmp_path / flag.strip('-')
        proc = run_cli('slim/quant/qat_export.py', '--config', INSTANT, '--model_path', weights,
                       '--save_dir', out, flag, '--verify_images', 0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        pred = Predictor(str(out), EngineOptions(precision='int8', input_shape=(1, 3, 64, 64),
                                                 int8_layers='all'))
        y = pred.run(np.zeros((1, 3, 64, 64), np.float32))
        assert str(y.dtype) == dtype and y.shape == (1, channels, 64, 64)
        assert pred.ops.int8_conv_ops > 0


def test_val_with_worker_processes_matches(fp32_run, tmp_path):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    results = []
    for workers in (0, 2):
        out = tmp_path / f'm{workers}.json'
        proc = run_cli('val.py', '--config', INSTANT, '--model_path', weights, '--num_workers',
                       workers, '--json', out, '--opts', *data_opts(fp32_run['data']))
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.load(open(out)))
    assert results[0] == results[1] and results[0]['pixels'] > 0
