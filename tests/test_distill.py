"""qat_train --distill: the FP32 model teaches the QAT model through a KL term on the
per-pixel class distributions."""
import os

import numpy as np
import pytest
from conftest import INSTANT, assert_one_line_error, data_opts, run_cli, run_command

from segslim._paddle import paddle


class TinyNet(paddle.nn.Layer):
    """A segmentation net in PaddleSeg's form: a list of N,C,H,W logits."""

    def __init__(self, seed):
        super().__init__()
        paddle.seed(seed)
        self.conv = paddle.nn.Conv2D(3, 2, 3, padding=1)

    def forward(self, x):
        return [self.conv(x)]


def loss_and_grads(distill, weight=1.0, temperature=1.0, teacher_seed=1):
    from segslim.options import TrainOptions
    from segslim.train.loop import Trainer
    student = TinyNet(0)
    sched = paddle.optimizer.lr.PolynomialDecay(0.01, 10)
    opt = paddle.optimizer.SGD(sched, parameters=student.parameters())
    losses = {'types': [paddle.nn.CrossEntropyLoss(axis=1)], 'coef': [1.0]}
    opts = TrainOptions(iters=10, batch_size=2, distill=distill, distill_weight=weight,
                        distill_temperature=temperature)
    trainer = Trainer(student, None, None, opt, sched, losses, {}, opts,
                      teacher=TinyNet(teacher_seed) if distill else None)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    y = paddle.to_tensor(rng.integers(0, 2, (2, 8, 8)).astype(np.int64))
    loss, kd = trainer._loss(x, y)
    loss.backward()
    return float(loss), kd, student.conv.weight.grad.numpy().copy()


def test_distill_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from segslim.train.losses import distill_loss
    rng = np.random.default_rng(0)
    a = paddle.to_tensor(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    b = paddle.to_tensor(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    assert abs(float(distill_loss(a, a))) < 1e-6
    assert float(distill_loss(a, b)) > 0.01
    a.stop_gradient = False
    distill_loss(a, b, temperature=2.0).backward()
    assert float(paddle.abs(a.grad).sum()) > 0


def test_distill_changes_the_loss_and_the_gradients_but_not_with_weight_zero():
    plain_loss, plain_kd, plain_grad = loss_and_grads(False)
    zero_loss, zero_kd, zero_grad = loss_and_grads(True, weight=0.0)
    kd_loss, kd, kd_grad = loss_and_grads(True, weight=1.0)
    assert plain_kd == 0.0 and zero_kd > 0  # measured, and weighted by zero
    assert zero_loss == pytest.approx(plain_loss, abs=1e-6)
    np.testing.assert_allclose(zero_grad, plain_grad, atol=1e-7)
    assert kd_loss == pytest.approx(plain_loss + kd, rel=1e-5)
    assert np.abs(kd_grad - plain_grad).max() > 1e-4


def test_qat_train_distills_and_logs_the_term(fp32_run, tmp_path):
    out = tmp_path / 'q'
    proc = run_cli('slim/quant/qat_train.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                   '--iters', 2, '--log_iters', 1, '--seed', 0, '--use_vdl', '--distill',
                   '--distill_weight', 0.5, '--distill_temperature', 2,
                   '--save_dir', out, '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Distilling from' in proc.stdout
    assert proc.stdout.count('distill_loss: ') == 2
    assert any(name.startswith('vdlrecords') for name in os.listdir(out / 'vdl'))


def test_distill_needs_fp32_weights(instant_data, tmp_path):
    proc = run_command('slim/quant/qat_train.py', '--config', INSTANT, '--distill',
                       '--iters', 1, '--save_dir', tmp_path, '--opts', *data_opts(instant_data))
    assert_one_line_error(proc, '--distill', '--model_path')
    proc = run_command('slim/quant/qat_train.py', '--config', INSTANT, '--distill',
                       '--distill_temperature', 0, '--save_dir', tmp_path)
    assert_one_line_error(proc, '--distill_temperature', 'positive')
