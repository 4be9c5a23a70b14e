"""One data-parallel job under paddle.distributed.launch (2 CPU processes over gloo)."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import INSTANT, ROOT, data_opts, run_cli


class KeyDataset:
    """Stands in for SegDataset: each sample's image holds its key."""
    key = 'train_dataset'

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def sample(self, k):
        return {'img': np.full((1, 1, 1), k, np.float32), 'label': np.zeros((1, 1), np.int64)}


def test_each_process_gets_its_own_samples():
    from segslim.train.loop import batches
    ds = KeyDataset(10)
    single = batches(ds, 4, seed=3, start_iter=0)
    ranks = [batches(ds, 2, seed=3, start_iter=0, rank=r, world=2) for r in (0, 1)]
    for _ in range(5):  # 2 steps an epoch: crosses epochs
        whole = next(single)[0].reshape(-1).tolist()
        parts = [next(r)[0].reshape(-1).tolist() for r in ranks]
        assert not set(parts[0]) & set(parts[1])  # disjoint
        assert parts[0] + parts[1] == whole  # together: the single-process step
    for gen in [single] + ranks:
        gen.close()


def launch(script, log_dir, *args):
    env = dict(os.environ, SEGSLIM_OFFLINE='1', PYTHONWARNINGS='ignore')
    return subprocess.run(
        [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
         '--log_dir', str(log_dir), os.path.join(ROOT, script)] + [str(a) for a in args],
        cwd=str(log_dir.parent), capture_output=True, text=True, timeout=600, env=env)


def read_params(path):
    from segslim._paddle import paddle
    return paddle.load(str(path), return_numpy=True)


@pytest.fixture(scope='module')
def dp_run(instant_data, tmp_path_factory):
    base = tmp_path_factory.mktemp('dp')
    proc = launch('train.py', base / 'log', '--config', INSTANT, '--iters', 4,
                  '--save_interval', 2, '--do_eval', '--seed', 0, '--log_iters', 1,
                  '--save_dir', base / 'run', '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return {'base': base, 'run': base / 'run', 'stdout': proc.stdout, 'data': instant_data}


@pytest.mark.slow
def test_train_is_one_job(dp_run):
    out, run = dp_run['stdout'], dp_run['run']
    assert 'data parallel: 2 processes, --batch_size 2 per process (4 per step)' in out
    assert 'data parallel: weights and buffers identical on all 2 processes' in out
    assert len(re.findall(r'\[TRAIN\]', out)) == 4  # logged once, not once per process
    rank1 = open(dp_run['base'] / 'log' / 'workerlog.1').read()
    assert '[TRAIN]' not in rank1 and '[EVAL]' not in rank1 and 'saved' not in rank1
    assert sorted(os.listdir(run)) == ['best_model', 'config.yaml', 'iter_2', 'iter_4']


@pytest.mark.slow
def test_sharded_eval_equals_single_process(dp_run):
    reported = re.findall(r'\[EVAL\] #pixels: (\d+) mIoU: ([0-9.]+)', dp_run['stdout'])[-1]
    proc = run_cli('val.py', '--config', INSTANT, '--model_path',
                   dp_run['run'] / 'iter_4' / 'model.pdparams', '--opts',
                   *data_opts(dp_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = re.search(r'\[EVAL\] #pixels: (\d+) mIoU: ([0-9.]+)', proc.stdout).groups()
    assert reported == single  # all pixels counted once, same mIoU


@pytest.mark.slow
def test_resume_under_the_launcher_is_exact(dp_run):
    resumed = dp_run['base'] / 'resumed'
    resumed.mkdir()
    shutil.copytree(dp_run['run'] / 'iter_2', resumed / 'iter_2')
    proc = launch('train.py', dp_run['base'] / 'log2', '--config', INSTANT, '--iters', 4,
                  '--save_interval', 2, '--do_eval', '--resume_model', resumed / 'iter_2',
                  '--save_dir', resumed, '--opts', *data_opts(dp_run['data']))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a = read_params(resumed / 'iter_4' / 'model.pdparams')
    b = read_params(dp_run['run'] / 'iter_4' / 'model.pdparams')
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_qat_under_the_launcher_keeps_scales_identical(dp_run):
    run = dp_run['base'] / 'quant'
    proc = launch('slim/quant/qat_train.py', dp_run['base'] / 'logq', '--config', INSTANT,
                  '--model_path', dp_run['run'] / 'iter_4' / 'model.pdparams', '--iters', 2,
                  '--save_interval', 2, '--learning_rate', 0.001, '--seed', 0,
                  '--save_dir', run, '--opts', *data_opts(dp_run['data']))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert 'QAT (Conv2D/Linear): quantizing' in proc.stdout
    # the check covers every weight, batch-norm statistic and activation scale
    assert 'data parallel: weights and buffers identical on all 2 processes' in proc.stdout
    scales = {k: v for k, v in read_params(run / 'iter_2' / 'model.pdparams').items()
              if k.endswith('_scale')}
    assert scales and all(np.isfinite(v).all() and (v > 0).all() for v in scales.values())
