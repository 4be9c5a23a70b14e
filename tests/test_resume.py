"""--resume_model really resumes: iteration, LR, optimizer state, data order."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import INSTANT, ROOT, data_opts, run_cli

from segslim._paddle import paddle


def params(path):
    return paddle.load(path, return_numpy=True)


def assert_same_weights(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def log_lines(stdout):
    return {int(m.group(1)): m.group(0) for m in re.finditer(
        r'iter: (\d+)/\d+, loss: [0-9.]+, lr: [0-9.]+', stdout)}


def test_qat_resume_restores_iteration_lr_and_weights(qat_run, tmp_path):
    out = str(tmp_path / 'resumed')
    proc = run_cli('slim/quant/qat_train.py', '--config', INSTANT, '--model_path',
                   'unused-when-resuming', '--learning_rate', 0.001, '--iters', 10,
                   '--do_eval', '--save_interval', 5, '--log_iters', 5, '--save_dir', out,
                   '--resume_model', os.path.join(qat_run['dir'], 'iter_5'),
                   '--opts', *data_opts(qat_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Resumed from' in proc.stdout and 'at iter 5' in proc.stdout
    resumed, original = log_lines(proc.stdout), log_lines(qat_run['stdout'])
    assert 5 not in resumed and resumed[10] == original[10]  # same loss and LR at iter 10
    assert_same_weights(os.path.join(out, 'iter_10', 'model.pdparams'),
                        os.path.join(qat_run['dir'], 'iter_10', 'model.pdparams'))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(instant_data, tmp_path):
    # two threads, so two local processes of one thread: the same seed, thread and process
    # count give the same weights, resumed or not, and killing the first kills the job
    common = ['--config', INSTANT, '--iters', 20, '--save_interval', 5, '--log_iters', 5,
              '--seed', 0, '--keep_checkpoint_max', 2, '--cpu_threads', 2,
              '--opts'] + data_opts(instant_data)
    straight = str(tmp_path / 'straight')
    proc = run_cli('train.py', '--save_dir', straight, *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Training on CPU with 2 processes x 1 thread ' in proc.stdout + proc.stderr

    killed = str(tmp_path / 'killed')
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    env = dict(os.environ, SEGSLIM_OFFLINE='1', PYTHONWARNINGS='ignore', TMPDIR=str(tmp))
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), '--save_dir',
                              killed] + [str(a) for a in common], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, 'iter_10')) and time.time() < deadline:
        assert child.poll() is None, 'training ended before it could be killed'
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere inside the next iterations
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not [n for n in os.listdir(tmp) if n.startswith('segslim-')]  # nothing left behind
    done = sorted(int(n[5:]) for n in os.listdir(killed) if re.fullmatch(r'iter_\d+', n))
    assert done and done[-1] < 20, done
    last = os.path.join(killed, f'iter_{done[-1]}')
    proc = run_cli('train.py', '--save_dir', killed, '--resume_model', last, *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(os.path.join(killed, 'iter_20', 'model.pdparams'),
                        os.path.join(straight, 'iter_20', 'model.pdparams'))
    # keep_checkpoint_max 2 pruned the old ones but never the one resumed from
    left = sorted(n for n in os.listdir(killed) if n.startswith('iter_'))
    assert 'iter_20' in left and os.path.basename(last) in left and len(left) <= 3


def test_worker_processes_feed_the_same_batches(instant_data, tmp_path):
    logs = []
    for workers in (0, 2):
        proc = run_cli('train.py', '--config', INSTANT, '--iters', 4, '--log_iters', 1,
                       '--seed', 0, '--num_workers', workers, '--save_dir', tmp_path / str(workers),
                       '--opts', *data_opts(instant_data))
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs.append(log_lines(proc.stdout))
    assert len(logs[0]) == 4 and logs[0] == logs[1]


def test_ema_weights_are_saved_and_resumed(instant_data, tmp_path):
    common = ['--config', INSTANT, '--iters', 4, '--save_interval', 2, '--use_ema', '--seed', 0,
              '--do_eval', '--opts'] + data_opts(instant_data)
    straight = tmp_path / 'straight'
    proc = run_cli('train.py', '--save_dir', straight, *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '[EVAL EMA]' in proc.stdout
    assert (straight / 'best_ema_model' / 'model.pdparams').exists()
    resumed = tmp_path / 'resumed'
    proc = run_cli('train.py', '--save_dir', resumed, '--resume_model', straight / 'iter_2',
                   *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ('model.pdparams', 'ema_model.pdparams'):
        assert_same_weights(str(resumed / 'iter_4' / name), str(straight / 'iter_4' / name))
    ema, raw = params(str(straight / 'iter_4' / 'ema_model.pdparams')), params(
        str(straight / 'iter_4' / 'model.pdparams'))
    assert any(not np.array_equal(ema[k], raw[k]) for k in raw)


def _checkpoint(folder):
    """A resumable checkpoint of a tiny model, as the training loop writes it."""
    from segslim.train import checkpoint as ckpt
    model = paddle.nn.Conv2D(3, 2, 1)
    sched = paddle.optimizer.lr.PolynomialDecay(0.01, 10)
    opt = paddle.optimizer.SGD(sched, parameters=model.parameters())
    state = {'iter': 3, 'best_miou': np.float32(0.5), 'seed': 7, 'config': {'iters': 10},
             'scaler': {'scale': np.array([512.0], np.float32)}}
    ckpt.save_checkpoint(str(folder), model, opt, sched, state)
    return ckpt


def test_training_state_is_data_not_code(tmp_path):
    ckpt = _checkpoint(tmp_path / 'iter_3')
    assert sorted(os.listdir(tmp_path / 'iter_3')) == ['model.pdopt', 'model.pdparams',
                                                       'train_state.json']
    state = ckpt.load_checkpoint(str(tmp_path / 'iter_3')).state
    assert state['iter'] == 3 and state['seed'] == 7 and state['config'] == {'iters': 10}
    assert state['best_miou'] == 0.5 and state['scaler']['scale'] == [512.0]


def test_older_pickled_state_resumes_only_as_plain_data(tmp_path):
    import datetime
    import pickle

    from segslim.errors import UserError
    ckpt = _checkpoint(tmp_path / 'iter_3')
    os.remove(tmp_path / 'iter_3' / 'train_state.json')
    with open(tmp_path / 'iter_3' / 'train_state.pkl', 'wb') as f:
        pickle.dump({'iter': 3, 'best_miou': 0.5, 'seed': 7, 'config': {'iters': 10}}, f)
    assert ckpt.load_checkpoint(str(tmp_path / 'iter_3')).state['seed'] == 7
    with open(tmp_path / 'iter_3' / 'train_state.pkl', 'wb') as f:  # would import code
        pickle.dump({'iter': 3, 'when': datetime.date(2020, 1, 1)}, f)
    with pytest.raises(UserError, match='train_state.pkl holds more than plain data'):
        ckpt.load_checkpoint(str(tmp_path / 'iter_3'))


def test_cpu_threads_default_is_the_cores_shared_by_the_local_processes(monkeypatch):
    """Every core by default, although paddle's import sets OMP_NUM_THREADS=1 when unset."""
    from segslim._paddle import default_cpu_threads
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    for name in ('PADDLE_LOCAL_SIZE', 'PADDLE_TRAINERS_NUM'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('SEGSLIM_USER_OMP_NUM_THREADS', '')  # the user set nothing
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # what paddle's import sets then
    assert default_cpu_threads() == 8
    monkeypatch.setenv('PADDLE_TRAINERS_NUM', '2')
    assert default_cpu_threads() == 4
    monkeypatch.setenv('PADDLE_LOCAL_SIZE', '3')
    assert default_cpu_threads() == 2
    monkeypatch.setenv('SEGSLIM_USER_OMP_NUM_THREADS', '5')
    assert default_cpu_threads() == 5
