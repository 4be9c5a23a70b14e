"""The training loop, shared by train.py (FP32) and qat_train.py (fake-quant models)."""
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Generator, Iterator, List, Optional, Tuple

import numpy as np
from paddleseg.utils.ema import update_ema_model
from paddleseg.utils.timer import calculate_eta

from segslim._paddle import paddle
from segslim.config import Yaml
from segslim.data.datasets import SegDataset, collate
from segslim.data.loader import ordered_map
from segslim.errors import UserError
from segslim.fileio import recover
from segslim.logger import logger
from segslim.options import TrainOptions
from segslim.train import checkpoint as ckpt
from segslim.train import distributed
from segslim.train.evaluate import evaluate
from segslim.train.losses import compute_loss, distill_loss
from segslim.train.metrics import format_metrics

EMA_PARAMS = 'ema_model.pdparams'


@dataclass(frozen=True)
class TrainResult:
    """How a training run ended: its last iteration, the best validation mIoU and its
    iteration (-1 without --do_eval), and the last checkpoint written (None if none)."""
    iter: int
    best_miou: float
    best_iter: int
    last_checkpoint: Optional[str]


class WeightAverage:
    """--use_ema: a frozen copy of the model that follows its weights with paddleseg's EMA
    update (decay min(1 - 1 / (step + 1), 0.999): early steps follow the model closely)."""

    def __init__(self, model: paddle.nn.Layer, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.eval()
        for param in self.model.parameters():
            param.stop_gradient = True

    def update(self, model: paddle.nn.Layer, step: int) -> None:
        update_ema_model(self.model, model, step, self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()


def _load_batch(dataset: SegDataset, item: Tuple[List[int], int]):
    keys, epoch = item
    return collate([dataset.sample(k) for k in keys], dataset.key) + (epoch,)


def batches(dataset: SegDataset, batch_size: int, seed: int, start_iter: int,
            num_workers: int = 0, repeats: int = 1, rank: int = 0,
            world: int = 1) -> Generator[Tuple[np.ndarray, np.ndarray, int], None, None]:
    """Endless (images, labels, epoch) batches; epoch e visits a permutation of every sample
    `repeats` times drawn from (seed, e), dropping the last partial step. Starting at
    `start_iter` yields exactly what an uninterrupted run would yield from there on, with or
    without worker processes. With `world` processes a step takes world * batch_size samples
    of the permutation and process `rank` gets its own disjoint batch_size of them (as
    PaddleSeg's DistributedBatchSampler: --batch_size is per process)."""
    # Keys run over len * repeats per epoch; SegDataset.sample maps a key to its file
    # (key mod len) and seeds its augmentation by the whole key, so repeats differ.
    n = len(dataset) * repeats
    step = batch_size * world
    per_epoch = n // step
    if per_epoch == 0:
        raise UserError(f'config key `{dataset.key}`: {n} images are fewer than batch_size '
                        f'{batch_size} x {world} processes; lower --batch_size or add images')

    def keys_from(epoch: int, offset: int) -> Iterator[Tuple[List[int], int]]:
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(n)
            for b in range(offset, per_epoch):
                start = b * step + rank * batch_size
                chosen = order[start:start + batch_size]
                yield [epoch * n + int(i) for i in chosen], epoch
            epoch, offset = epoch + 1, 0

    return ordered_map(_load_batch, keys_from(*divmod(start_iter, per_epoch)), dataset,
                       num_workers)


def _log_window(window: Dict[str, float], it: int, epoch: int, lr: float,
                opts: TrainOptions, writer: Any) -> None:
    """One log line (and VisualDL scalars) for the iterations since the last one; resets."""
    n = max(window['iters'], 1)
    loss, batch_cost = window['loss'] / n, window['cost'] / n
    distill = ', distill_loss: {:.4f}'.format(window['distill'] / n) if opts.distill else ''
    logger.info('[TRAIN] epoch: %d, iter: %d/%d, loss: %.4f%s, lr: %.6f, batch_cost: %.4f, '
                'reader_cost: %.5f, ips: %.4f samples/sec | ETA %s', epoch + 1, it, opts.iters,
                loss, distill, lr, batch_cost, window['reader'] / n,
                window['samples'] / window['cost'] if window['cost'] else 0.0,
                calculate_eta(opts.iters - it, batch_cost))
    if writer is not None:
        writer.add_scalar('Train/loss', loss, it)
        if opts.distill:
            writer.add_scalar('Train/distill_loss', window['distill'] / n, it)
        writer.add_scalar('Train/lr', lr, it)
        writer.add_scalar('Train/batch_cost', batch_cost, it)
    window.update(loss=0.0, distill=0.0, cost=0.0, reader=0.0, samples=0, iters=0)


def train(model: paddle.nn.Layer, train_ds: SegDataset, val_ds: Optional[SegDataset],
          optimizer: paddle.optimizer.Optimizer, scheduler: paddle.optimizer.lr.LRScheduler,
          losses: Dict[str, list], cfg: Yaml, opts: TrainOptions,
          resume: Optional[ckpt.Resume] = None,
          teacher: Optional[paddle.nn.Layer] = None) -> 'TrainResult':
    """Runs iterations up to opts.iters; saves iter_N/ every save_interval and best_model/
    on a better mIoU (best_ema_model/ too with opts.use_ema). `resume` comes from
    checkpoint.load_checkpoint; with opts.distill, the frozen `teacher` adds
    opts.distill_weight x distill_loss to every step's loss.
    Returns {'iter', 'best_miou', 'best_iter', 'last_checkpoint'}."""
    return Trainer(model, train_ds, val_ds, optimizer, scheduler, losses, cfg, opts,
                   resume, teacher).run()


class Trainer:
    """The state of one training run; see train()."""

    def __init__(self, model: paddle.nn.Layer, train_ds: SegDataset,
                 val_ds: Optional[SegDataset], optimizer: paddle.optimizer.Optimizer,
                 scheduler: paddle.optimizer.lr.LRScheduler, losses: Dict[str, list],
                 cfg: Yaml, opts: TrainOptions,
                 resume: Optional[ckpt.Resume] = None,
                 teacher: Optional[paddle.nn.Layer] = None):
        if opts.distill and teacher is None:
            raise UserError('distillation needs a teacher: pass --model_path with the FP32 '
                            'weights')
        self.teacher = teacher if opts.distill else None
        if self.teacher is not None:
            self.teacher.eval()
            for param in self.teacher.parameters():
                param.stop_gradient = True
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_ds, self.val_ds, self.losses, self.cfg, self.opts = (
            train_ds, val_ds, losses, cfg, opts)
        self.start_iter = 0
        self.resumed_from: Optional[str] = None
        self.best = {'model': (-1.0, -1), 'ema': (-1.0, -1)}  # (mIoU, iter)
        self.rank, self.world = distributed.world()
        self.main = self.rank == 0  # only the first process writes
        if self.main:
            os.makedirs(opts.save_dir, exist_ok=True)
            recover(opts.save_dir)
        self.ema = WeightAverage(model) if opts.use_ema else None
        if resume is not None:
            self._resume(resume)
        self.last_ckpt: Optional[str] = self.resumed_from
        self.scaler = None
        if opts.precision == 'fp16':
            if not paddle.is_compiled_with_cuda() or 'gpu' not in paddle.get_device():
                raise UserError('--precision fp16 needs a GPU; drop it on CPU')
            self.scaler = paddle.amp.GradScaler(init_loss_scaling=1024)
            if resume is not None:
                restore_scaler(self.scaler, resume.state)
            if opts.amp_level == 'O2':
                self.model, self.optimizer = paddle.amp.decorate(
                    models=model, optimizers=optimizer, level='O2', save_dtype='float32')
        # self.model stays the plain layer that evaluation and checkpoints use
        self.net, self.average_gradients, self.stats = distributed.data_parallel(
            self.model, shared_gradients=self.scaler is None)

    def _resume(self, resume: ckpt.Resume) -> None:
        state = resume.state
        self.start_iter = int(state['iter'])
        self.best['model'] = (state.get('best_miou', -1.0), state.get('best_iter', -1))
        ema = state.get('best_ema') or [-1.0, -1]
        self.best['ema'] = (float(ema[0]), int(ema[1]))
        self.opts.seed = state.get('seed', self.opts.seed)
        self.resumed_from = os.path.dirname(resume.params)
        if self.ema is not None:
            ema_path = os.path.join(self.resumed_from, EMA_PARAMS)
            source = ema_path if os.path.isfile(ema_path) else resume.params
            ckpt.load_weights(self.ema.model, source, flag='--resume_model')
        logger.info('Resumed from %s at iter %d (best mIoU %.4f at iter %d)',
                    self.resumed_from, self.start_iter, *self.best['model'])

    def run(self) -> 'TrainResult':
        opts = self.opts
        if self.start_iter >= opts.iters:
            logger.info('Nothing to do: the checkpoint is at iter %d of %d', self.start_iter,
                        opts.iters)
        writer = None
        if opts.use_vdl and self.main:
            from visualdl import LogWriter
            writer = LogWriter(os.path.join(opts.save_dir, 'vdl'))
        data = batches(self.train_ds, opts.batch_size, opts.seed, self.start_iter,
                       opts.num_workers, opts.repeats, self.rank, self.world)
        profiler_step = profiler(opts.profiler_options)
        self.model.train()
        it = self.start_iter
        window = {'loss': 0.0, 'distill': 0.0, 'cost': 0.0, 'reader': 0.0, 'samples': 0,
                  'iters': 0}
        tic = time.time()
        try:
            while it < opts.iters:
                imgs, labels, epoch = next(data)
                window['reader'] += time.time() - tic
                it += 1
                lr = self.optimizer.get_lr()
                value, distill = self._step(imgs, labels, it)
                profiler_step()
                window['loss'] += value
                window['distill'] += distill
                window['cost'] += time.time() - tic
                window['samples'] += len(imgs) * self.world  # every process's images
                window['iters'] += 1
                if it % opts.log_iters == 0 or it == opts.iters:
                    _log_window(window, it, epoch, lr, opts, writer)
                if it % opts.save_interval == 0 or it == opts.iters:
                    self._save(it, writer)
                tic = time.time()
        except KeyboardInterrupt:
            logger.warning('Interrupted at iter %d. %s', it,
                           f'Resume with --resume_model {self.last_ckpt}'
                           if self.last_ckpt else 'No checkpoint was written yet.')
            raise
        finally:
            data.close()  # stops loader processes
            if writer is not None:
                writer.close()
        if not (opts.do_eval and self.val_ds is not None) and it > self.start_iter and \
                self.main:
            # Without evaluation the last weights are the deliverable.
            ckpt.save_checkpoint(os.path.join(opts.save_dir, 'best_model'), self.model)
        if self.world > 1:
            differ = distributed.differing_state(self.model)
            if differ:
                logger.warning('data parallel: %d weights/buffers differ between the %d '
                               'processes: %s', len(differ), self.world, ', '.join(differ[:5]))
            else:
                logger.info('data parallel: weights and buffers identical on all %d '
                            'processes', self.world)
        best_miou, best_iter = self.best['model']
        return TrainResult(it, best_miou, best_iter, self.last_ckpt)

    def _loss(self, x: paddle.Tensor, y: paddle.Tensor) -> Tuple[paddle.Tensor, float]:
        """The step's loss (task terms, plus the weighted distillation term with a teacher)
        and the unweighted distillation loss (0.0 without one)."""
        logits = self.net(x)
        loss = sum(compute_loss(logits, y, self.losses))
        if self.teacher is None:
            return loss, 0.0
        with paddle.no_grad():
            target = self.teacher(x)[0]
        axis = -1 if getattr(self.model, 'data_format', 'NCHW') == 'NHWC' else 1
        kd = distill_loss(logits[0], target, self.opts.distill_temperature, axis)
        return loss + self.opts.distill_weight * kd, float(kd)

    def _step(self, imgs: np.ndarray, labels: np.ndarray, it: int) -> Tuple[float, float]:
        """One optimizer step; returns the loss and the distillation loss, or stops the run
        on NaN/inf."""
        # Dropout draws from paddle's global generator, whose state does not survive a
        # save/load; seeding it per iteration makes a resumed run draw the same masks.
        paddle.seed(self.opts.seed * 1000003 + it + self.rank * 7919)
        x, y = paddle.to_tensor(imgs), paddle.to_tensor(labels)
        if getattr(self.model, 'data_format', 'NCHW') == 'NHWC':
            x = x.transpose((0, 2, 3, 1))
        if self.scaler is not None:
            with paddle.amp.auto_cast(level=self.opts.amp_level, enable=True):
                loss, distill = self._loss(x, y)
            scaled = self.scaler.scale(loss)
            scaled.backward()
            self.scaler.minimize(self.optimizer, scaled)
        else:
            loss, distill = self._loss(x, y)
            loss.backward()
            self.average_gradients()
            self.optimizer.step()
        self.model.clear_gradients()
        distributed.average_stats(self.stats)
        self.scheduler.step()
        value = float(loss)
        if self.world > 1:  # the step's loss over every process's images, as one process logs
            value, distill = (float(v) for v in distributed.all_reduce_sum(
                np.array([value, distill], np.float64)) / self.world)
        if not math.isfinite(value):
            raise UserError('loss became {} at iter {}; nothing was saved from this iteration '
                            '(last checkpoint: {}); lower --learning_rate or check the '
                            'labels'.format(value, it, self.last_ckpt or 'none'))
        if self.ema is not None:
            self.ema.update(self.model, it)
        return value, distill

    def _evaluate(self, which: str, model: paddle.nn.Layer, it: int, writer: Any) -> None:
        """Evaluates, logs, and writes best_model/ (best_ema_model/) on a better mIoU."""
        assert self.val_ds is not None  # only called with --do_eval and a val set
        metrics = evaluate(model, self.val_ds, **self.opts.eval.kwargs())
        title = '[EVAL]' if which == 'model' else '[EVAL EMA]'
        logger.info('\n' + format_metrics(metrics, title))
        if writer is not None:
            for key in ('miou', 'acc', 'kappa', 'mdice'):
                writer.add_scalar('Evaluate{}/{}'.format('' if which == 'model' else '_ema',
                                                         key), metrics[key], it)
        if metrics['miou'] > self.best[which][0]:  # every process sees the same mIoU
            self.best[which] = (metrics['miou'], it)
            name = 'best_model' if which == 'model' else 'best_ema_model'
            if self.main:
                ckpt.save_checkpoint(os.path.join(self.opts.save_dir, name), model)
        logger.info('%s The model with the best validation mIoU (%.4f) was saved at iter %d.',
                    title, *self.best[which])

    def _save(self, it: int, writer: Any) -> None:
        opts = self.opts
        if opts.do_eval and self.val_ds is not None:
            self._evaluate('model', self.model, it, writer)
            if self.ema is not None:
                self._evaluate('ema', self.ema.model, it, writer)
        state: ckpt.TrainState = {'iter': it, 'best_miou': self.best['model'][0],
                 'best_iter': self.best['model'][1], 'best_ema': list(self.best['ema']),
                 'seed': opts.seed, 'config': self.cfg}
        if self.scaler is not None:  # AMP's loss scale: a resumed fp16 run continues it
            state['scaler'] = self.scaler.state_dict()
        path = os.path.join(opts.save_dir, f'iter_{it}')
        self.last_ckpt = path
        if not self.main:
            return
        extra: Optional[Dict[str, object]] = (
            {EMA_PARAMS: self.ema.state_dict()} if self.ema is not None else None)
        ckpt.save_checkpoint(path, self.model, self.optimizer, self.scheduler, state, extra)
        ckpt.prune_checkpoints(opts.save_dir, opts.keep_checkpoint_max,
                               protect=[p for p in (self.resumed_from, path) if p])


def profiler(options: Optional[str]):
    """A per-iteration callable for --profiler_options "batch_range=[a,b];profile_path=P;..."
    (PaddleSeg's option string). The wheel's own train_profiler calls paddle.utils.profiler,
    which Paddle 2.6 no longer has, so this drives paddle.profiler: iterations a..b are
    recorded, a Chrome trace goes to the folder P and a summary sorted by `sorted_key` is
    printed; with exit_on_finished (the default, as upstream) the process then exits."""
    if not options:
        return lambda: None
    import sys

    from paddle import profiler as pp
    from paddleseg.utils.train_profiler import ProfilerOptions
    try:
        parsed = ProfilerOptions(options)
        start, end = parsed['batch_range'][:2]
    except (ValueError, AssertionError, KeyError):
        raise UserError(f'--profiler_options {options!r}: expected "key=value;key=value" with keys '
                        'batch_range, state, sorted_key, tracer_option, profile_path, '
                        'exit_on_finished') from None
    targets = [pp.ProfilerTarget.CPU]
    if parsed['state'] in ('GPU', 'All') and paddle.is_compiled_with_cuda():
        targets.append(pp.ProfilerTarget.GPU)
    sort = {'calls': pp.SortedKeys.CPUTotal, 'total': pp.SortedKeys.CPUTotal,
            'max': pp.SortedKeys.CPUMax, 'min': pp.SortedKeys.CPUMin,
            'ave': pp.SortedKeys.CPUAvg}.get(parsed['sorted_key'], pp.SortedKeys.CPUTotal)
    prof = pp.Profiler(targets=targets, scheduler=(start, end),
                       on_trace_ready=pp.export_chrome_tracing(parsed['profile_path']))
    state = {'step': 0}
    prof.start()

    def step() -> None:
        state['step'] += 1
        if state['step'] <= end:
            prof.step()
        if state['step'] == end:
            prof.stop()
            prof.summary(sorted_by=sort, op_detail=parsed['tracer_option'] != 'Default')
            logger.info('Profiled iterations %d-%d; trace in %s', start, end,
                        parsed['profile_path'])
            if parsed['exit_on_finished']:
                sys.exit(0)
    return step


def restore_scaler(scaler: Any, state: ckpt.TrainState) -> None:
    """Puts the checkpoint's AMP loss-scaling state back (checkpoints without it, e.g. of an
    fp32 run, leave the scaler at its start values)."""
    if state.get('scaler'):
        scaler.load_state_dict(state['scaler'])


def restore_training(resume: ckpt.Resume, model: paddle.nn.Layer,
                     optimizer: paddle.optimizer.Optimizer,
                     scheduler: paddle.optimizer.lr.LRScheduler) -> None:
    """Loads model, optimizer and LR state of a checkpoint from load_checkpoint()."""
    ckpt.load_weights(model, resume.params, flag='--resume_model')
    opt_state = dict(resume.optimizer)
    try:
        optimizer.set_state_dict(opt_state)  # restores the LR scheduler it holds too
    except (KeyError, ValueError) as e:
        raise UserError(f'--resume_model {os.path.dirname(resume.params)}: the optimizer state '
                        f'does not fit this config ({e}); resume with the config the run was '
                        'started with') from e
    if 'LR_Scheduler' in opt_state:
        scheduler.set_state_dict(opt_state['LR_Scheduler'])
