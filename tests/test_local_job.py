"""Training on every core: local processes of one data-parallel job, batch norm over all."""
import multiprocessing
import os
import platform
import re

import numpy as np
import pytest
from conftest import ROOT, data_opts, run_cli

from segslim.errors import UserError

NO_DROPOUT = os.path.join(ROOT, 'tests', 'configs', 'instant_no_dropout.yml')


def test_processes_split_threads_and_batch_evenly():
    from segslim.train.local_job import choose_processes
    assert choose_processes(None, threads=2, batch_size=4) == 2
    assert choose_processes(None, threads=1, batch_size=4) == 1
    assert choose_processes(None, threads=2, batch_size=3) == 1  # 3 images do not split
    assert choose_processes(None, threads=8, batch_size=4) == 4  # 4 processes x 2 threads
    assert choose_processes(None, threads=6, batch_size=4) == 2
    assert choose_processes(1, threads=8, batch_size=4) == 1
    with pytest.raises(UserError, match='--cpu_processes 3 does not divide --batch_size 4'):
        choose_processes(3, threads=8, batch_size=4)


def test_job_environment_is_the_launchers():
    from segslim.train.local_job import job_environment
    env = job_environment(1, 2, 3, [1000, 1001, 1002])
    assert env['PADDLE_TRAINER_ID'] == '1' and env['PADDLE_TRAINERS_NUM'] == '2'
    assert env['PADDLE_TRAINER_ENDPOINTS'] == '127.0.0.1:1001,127.0.0.1:1002'
    assert env['PADDLE_CURRENT_ENDPOINT'] == '127.0.0.1:1002'
    assert env['PADDLE_MASTER'] == '127.0.0.1:1000' and env['PADDLE_DISTRI_BACKEND'] == 'gloo'
    assert env['OMP_NUM_THREADS'] == '3'


def test_global_batch_norm_is_paddles_in_one_process(monkeypatch):
    """With one process (the sums are their own all-reduce), output, gradients and the
    running statistics equal paddle's batch norm."""
    from segslim._paddle import paddle
    from segslim.train import sync_batch_norm as sbn
    monkeypatch.setattr(sbn, '_all_reduce', lambda t: t)
    paddle.seed(0)
    x = paddle.randn([3, 5, 7, 6]) * 3 + 1
    upstream = paddle.randn([3, 5, 7, 6])
    ref = paddle.nn.BatchNorm2D(5, momentum=0.8)
    ref.weight.set_value(paddle.rand([5]) + 0.5)
    ref.bias.set_value(paddle.rand([5]))
    net = sbn.convert_cpu_sync_batch_norm(paddle.nn.Sequential(ref))
    ours = net[0]
    assert isinstance(ours, sbn.CpuSyncBatchNorm) and ours.weight is ref.weight

    def run(forward):
        xi = x.clone()
        xi.stop_gradient = False
        ref.weight.clear_gradient()
        ref.bias.clear_gradient()
        mean, var = ref._mean.numpy().copy(), ref._variance.numpy().copy()
        y = forward(xi)
        (y * upstream).sum().backward()
        got = [y.numpy(), xi.grad.numpy(), ref.weight.grad.numpy(), ref.bias.grad.numpy(),
               ref._mean.numpy().copy(), ref._variance.numpy().copy()]
        ref._mean.set_value(mean)
        ref._variance.set_value(var)
        return got

    ref.train()
    expected = run(lambda t: paddle.nn.BatchNorm2D.forward(ref, t))
    monkeypatch.setattr(sbn.distributed, 'world', lambda: (0, 2))  # take the job's path
    got = run(ours)
    for name, a, b in zip(['y', 'dx', 'dweight', 'dbias', 'mean', 'variance'], expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_global_batch_norm_of_two_equal_processes_is_paddles_on_both(monkeypatch):
    """Two processes with the same images (every sum doubled) normalise, and pass back to
    their input, what paddle's batch norm does on both halves of one batch under the sum of
    both losses; each keeps the parameter gradients of its own half."""
    from segslim._paddle import paddle
    from segslim.train import sync_batch_norm as sbn
    monkeypatch.setattr(sbn, '_all_reduce', lambda t: t * 2)
    paddle.seed(1)
    x = paddle.randn([2, 4, 5, 3]) * 2 - 1
    upstream = paddle.randn([2, 4, 5, 3])
    ref = paddle.nn.BatchNorm2D(4)
    ref.weight.set_value(paddle.rand([4]) + 0.5)
    ref.train()
    both = paddle.concat([x, x])
    both.stop_gradient = False
    y = paddle.nn.BatchNorm2D.forward(ref, both)
    (y * paddle.concat([upstream, upstream])).sum().backward()
    expected = [y.numpy()[:2], both.grad.numpy()[:2], ref.weight.grad.numpy() / 2,
                ref.bias.grad.numpy() / 2]
    ref.clear_gradients()
    ours = sbn.convert_cpu_sync_batch_norm(paddle.nn.Sequential(ref))[0]
    monkeypatch.setattr(sbn.distributed, 'world', lambda: (0, 2))
    half = x.clone()
    half.stop_gradient = False
    y = ours(half)
    (y * upstream).sum().backward()
    got = [y.numpy(), half.grad.numpy(), ref.weight.grad.numpy(), ref.bias.grad.numpy()]
    for name, a, b in zip(['y', 'dx', 'dweight', 'dbias'], expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def _weights(path):
    from segslim._paddle import paddle
    return paddle.load(str(path), return_numpy=True)


@pytest.mark.slow
def test_two_processes_train_what_one_does(instant_data, tmp_path):
    """2 processes x 2 images with the batch norm over both train what 1 process x 4 images
    trains, up to the order of float sums (a model without dropout: its masks are random
    per process); the first process alone logs and writes, and logs the step's whole loss."""
    common = ['--config', NO_DROPOUT, '--iters', 1, '--batch_size', 4, '--save_interval', 1,
              '--seed', 0, '--log_iters', 1, '--cpu_threads', 2,
              '--opts', *data_opts(instant_data)]
    two = run_cli('train.py', '--save_dir', tmp_path / 'two', *common)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert 'Training on CPU with 2 processes x 1 thread ' in two.stdout
    assert 'data parallel: 2 processes, --batch_size 2 per process (4 per step)' in two.stdout
    assert 'data parallel: weights and buffers identical on all 2 processes' in two.stdout
    assert len(re.findall(r'\[TRAIN\]', two.stdout)) == 1
    one = run_cli('train.py', '--save_dir', tmp_path / 'one', '--cpu_processes', 1, *common)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    assert 'processes x' not in one.stdout
    loss = [float(re.search(r'loss: ([0-9.]+)', p.stdout).group(1)) for p in (one, two)]
    assert loss[1] == pytest.approx(loss[0], abs=2e-4)
    a, b = _weights(tmp_path / 'one' / 'iter_1' / 'model.pdparams'), \
        _weights(tmp_path / 'two' / 'iter_1' / 'model.pdparams')
    assert a.keys() == b.keys()
    for key in a:  # per-process batch statistics would move them by up to 50x this
        scale = np.abs(a[key]).max()
        assert np.abs(a[key] - b[key]).max() <= 1e-4 * scale + 1e-6, key


def test_bad_process_count_is_one_line(instant_data, tmp_path):
    proc = run_cli('train.py', '--config', NO_DROPOUT, '--iters', 1, '--batch_size', 4,
                   '--cpu_processes', 3, '--save_dir', tmp_path / 'run',
                   '--opts', *data_opts(instant_data))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        'error: --cpu_processes 3 does not divide --batch_size 4: each process trains on an '
        'equal share of a step; pass a divisor of the batch size')


def test_running_stats_become_the_mean_over_processes(monkeypatch):
    """average_stats gives every statistic the mean of both processes' values, in its own
    shape and dtype (the CPU path takes them through numpy in one sum)."""
    from segslim._paddle import paddle
    from segslim.train import distributed
    mine = [np.array([1.0, 2.0, 3.0], np.float32), np.array([[0.5], [1.5]], np.float32),
            np.array([4.0], np.float64), np.array(7.0, np.float32)]
    other = [np.array([3.0, 2.0, 1.0], np.float32), np.array([[1.5], [-1.5]], np.float32),
             np.array([0.0], np.float64), np.array(-1.0, np.float32)]
    stats = [paddle.to_tensor(a) for a in mine]
    other_flat = np.concatenate([a.reshape(-1).astype(np.float64) for a in other])
    monkeypatch.setattr(distributed, 'world', lambda: (0, 2))
    monkeypatch.setattr(distributed, 'all_reduce_sum', lambda v: v + other_flat)
    distributed.average_stats(stats)
    for t, a, b in zip(stats, mine, other):
        assert t.numpy().dtype == a.dtype and t.numpy().shape == a.shape
        np.testing.assert_array_equal(t.numpy(), ((a.astype(np.float64) + b) / 2).astype(a.dtype))


def _two_processes(target, folder):
    """{rank: what target(folder, rank, queue) put after the rank}, from two forked
    processes of a local job whose shared-sum folder is `folder`; both must exit cleanly."""
    from segslim.train import shared_sum
    with open(folder / shared_sum.SMALL, 'wb') as f:
        f.truncate(shared_sum.file_size(2))
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(folder), r, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return {item[0]: item[1:] for item in got}


def _sum_in_process(folder, rank, queue):
    from segslim.train import shared_sum
    os.environ[shared_sum.ENV] = os.path.join(folder, '')  # the files' prefix
    shared_sum._SUMS.clear()  # a forked copy of this process's
    big = shared_sum.local_float32_sum(rank, 2, 10)
    small = shared_sum.local_sum(rank, 2)
    results = []
    for step in range(50):  # more calls than buffers: each reuses one the other read
        parts = [np.arange(4, dtype=np.float32) * (rank + 1) + step,
                 np.full(6, 0.1 * (rank + 1) + step, np.float32)]
        results.append((big.sum_parts(parts), small(np.array([rank + step], np.float64))))
    queue.put((rank, results))


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64'),
                    reason='shared-memory sums are x86 only')
def test_shared_sums_of_two_processes_agree_bit_for_bit(tmp_path):
    """Two processes summing float32 gradients (in parts) and float64 values through the
    job's folder get the exact sums, the same bits in both, call after call, and leave no
    file behind."""
    got = _two_processes(_sum_in_process, tmp_path)
    assert os.listdir(tmp_path) == []  # unlinked once both had mapped them
    for step, ((big0, small0), (big1, small1)) in enumerate(zip(got[0][0], got[1][0])):
        assert big0.dtype == np.float32 and big0.tobytes() == big1.tobytes()
        expected = np.concatenate([np.arange(4, dtype=np.float32) + step,
                                   np.full(6, 0.1 + step, np.float32)]) + \
            np.concatenate([np.arange(4, dtype=np.float32) * 2 + step,
                            np.full(6, 0.2 + step, np.float32)])
        np.testing.assert_array_equal(big0, expected)
        assert small0.tolist() == small1.tolist() == [2 * step + 1]


def _average_in_process(folder, rank, queue):
    from segslim._paddle import paddle
    from segslim.train import distributed, shared_sum
    os.environ[shared_sum.ENV] = os.path.join(folder, '')  # the files' prefix
    shared_sum._SUMS.clear()  # a forked copy of this process's
    distributed.world = lambda: (rank, 2)
    paddle.seed(rank)  # different weights in each process
    model = paddle.nn.Linear(3, 2)
    net, average, _ = distributed.data_parallel(model)
    weights = model.weight.numpy().copy()
    (model(paddle.full([1, 3], rank + 1.0)).sum()).backward()
    average()
    queue.put((rank, net is model, weights, model.weight.grad.numpy().copy()))


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64'),
                    reason='shared-memory sums are x86 only')
def test_a_local_job_averages_weights_and_gradients_through_shared_memory(tmp_path):
    """In a local job the model is trained as it is (no DataParallel): its weights start as
    the mean of both processes' and each backward's gradients become their mean, the same
    bits in both."""
    got = _two_processes(_average_in_process, tmp_path)
    assert got[0][0] and got[1][0]  # no DataParallel wrapper
    assert got[0][1].tobytes() == got[1][1].tobytes()
    assert got[0][2].tobytes() == got[1][2].tobytes()
    # d(sum(W x))/dW = x per row: 1 in process 0, 2 in process 1, mean 1.5
    np.testing.assert_array_equal(got[0][2], np.full((3, 2), 1.5, np.float32))
