"""slim/quant/auto_quant.py: from FP32 weights to the fastest INT8 model that keeps its mIoU
on the engine that will run it.

Steps, each the workflow of the command a user would run (with that command's options,
logged as its command line, in a child process of its own),
each result checked on the engines and written to <save_dir>/auto_quant.json before the next
step starts, so --resume repeats nothing that finished:
  1. fp32   export.py: the reference mIoU of each engine
  2. ptq    ptq.py: done when an engine's INT8 mIoU is within --max_miou_drop of its FP32;
     nncf   where OpenVINO is an engine and nncf is installed, also ptq.py --quantizer nncf
            (OpenVINO's own quantizer; its IR model runs on OpenVINO only)
  3. skip   analysis.py --max_miou_drop --backend (the first engine where PTQ missed), then
            ptq.py with the skip set it found (a set that leaves the model under MIN_SPEEDUP
            of FP32 speed does not end the search);
     nncf_ac and NNCF's accuracy-controlled variant (ptq.py --quantizer nncf
            --max_miou_drop) as the anchor on OpenVINO
     recon  ptq.py --recon region: every layer INT8 with the rounding learned block by block
  4. qat    qat_train.py --distill --do_eval in rounds up to --max_qat_iters; after each
            round qat_export.py of the best checkpoint so far by simulated val mIoU (a longer
            round can end lower than it was), stopping at the first round that meets the bound
  5. choose benchmark of every candidate on every engine (latency and mIoU, as
            benchmark.py measures them): the fastest INT8 row within the bound is the answer,
            copied to <save_dir>/best/ (deploy.yaml names its engine); report.md lists all.
The decision logic (AutoQuant) only sees the Steps interface, so tests drive it with fakes."""
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from segslim.deploy.engines import importable
from segslim.deploy.results import BenchRow, Precision, paired_ratio, within_bound
from segslim.fileio import write_json, write_text
from segslim.logger import logger
from segslim.modeldir import update_deploy
from segslim.options import (
    CALIBRATION_IMAGES,
    QAT_LEARNING_RATE,
    RECON_EPOCHS,
    TIMING_SHAPE,
    check_max_miou_drop,
)

STATE = 'auto_quant.json'
# A skip set that leaves the model less than this much faster than FP32 on the engines where
# it meets the bound does not end the search: QAT is tried next.
MIN_SPEEDUP = 1.1
# Evaluations (and checkpoints) per QAT round: where the best checkpoint can come from.
QAT_EVALS_PER_ROUND = 5


class Steps:
    """The real steps: the project's workflows in child processes, engines in this one."""

    def __init__(self, config: str, model_path: str, save_dir: str, backends: Sequence[str],
                 num_images: Optional[int], threads: int, device: str,
                 calib_images: int = CALIBRATION_IMAGES, opts: Sequence[str] = (),
                 shape: Sequence[int] = TIMING_SHAPE,
                 export_shape: Optional[Sequence[int]] = None,
                 qat_lr: float = QAT_LEARNING_RATE):
        self.config, self.model_path, self.save_dir = config, model_path, save_dir
        self.backends, self.num_images, self.threads = list(backends), num_images, threads
        self.device, self.calib_images, self.opts = device, calib_images, list(opts)
        self.shape = list(shape)
        # every model a step exports takes this fixed input shape (None: dynamic)
        self.export_shape = list(export_shape) if export_shape else None
        self.qat_lr = qat_lr  # options.qat_learning_rate of the config
        self._val: Any = None
        self.nncf_ready = 'openvino' in self.backends and importable('nncf')

    def _run(self, command: str, **given: Any) -> None:
        """Runs `command` with these flags in a child process (commands.run_step)."""
        from segslim.cli import commands, flags
        logger.info('auto-quant: segslim-%s %s', command.replace('_', '-'),
                    ' '.join(flags.to_argv(**given)))
        commands.run_step(command, **given, opts=self.opts or None)

    def _onnx(self) -> bool:
        return 'onnxruntime' in self.backends

    def export_fp32(self, out: str) -> str:
        self._run('export', config=self.config, model_path=self.model_path, save_dir=out,
                  to_onnx=self._onnx(), input_shape=self.export_shape)
        return out

    def ptq(self, out: str, config: Optional[str] = None) -> str:
        self._run('ptq', config=config or self.config, model_path=self.model_path,
                  save_dir=out, batch_nums=self.calib_images, batch_size=1, verify_images=0,
                  device=self.device, to_onnx=self._onnx(), input_shape=self.export_shape)
        return out

    def nncf(self, out: str, max_drop: Optional[float] = None) -> str:
        """ptq.py --quantizer nncf (accuracy-controlled with `max_drop`): an OpenVINO IR."""
        self._run('ptq', config=self.config, model_path=self.model_path, save_dir=out,
                  quantizer='nncf', batch_nums=self.calib_images, verify_images=0,
                  max_miou_drop=max_drop, num_images=self.num_images if max_drop else None,
                  input_shape=self.export_shape)
        return out

    def recon(self, out: str) -> str:
        """ptq.py --recon region: every layer INT8, the rounding learned block by block on
        the calibration images (RECON_EPOCHS passes)."""
        self._run('ptq', config=self.config, model_path=self.model_path, save_dir=out,
                  batch_nums=self.calib_images, batch_size=1, verify_images=0,
                  device=self.device, to_onnx=self._onnx(), recon='region',
                  recon_epochs=RECON_EPOCHS, input_shape=self.export_shape)
        return out

    def skip_set(self, out: str, max_drop: float, backend: str) -> Optional[str]:
        """A PTQ model with the shortest skip set analysis.py finds for the bound on
        `backend`."""
        analysis = os.path.join(out, 'analysis')
        self._run('analysis', config=self.config, model_path=self.model_path,
                  save_dir=analysis, max_miou_drop=max_drop, backend=backend,
                  num_images=self.num_images or len(self.val_set()),
                  calib_images=self.calib_images, input_shape=self.export_shape)
        with open(os.path.join(analysis, 'sensitivity.json')) as f:
            if not json.load(f)['skip']:
                return None
        return self.ptq(os.path.join(out, 'infer'), os.path.join(analysis, 'skip_layers.yml'))

    def qat(self, out: str, iters: int, resume: Optional[str]) -> Tuple[str, int]:
        """QAT with distillation up to `iters` (resuming a round's checkpoint), evaluated
        QAT_EVALS_PER_ROUND times a round; exports the best checkpoint so far by simulated
        val mIoU. Returns the export and the iteration it comes from."""
        from segslim.train.checkpoint import read_state
        train_dir = os.path.join(out, 'train')
        start = read_state(resume)[0]['iter'] if resume else 0
        self._run('qat_train', config=self.config, model_path=self.model_path,
                  learning_rate=self.qat_lr, iters=iters, do_eval=True,
                  save_interval=max(1, (iters - start) // QAT_EVALS_PER_ROUND),
                  distill=True, seed=0, save_dir=train_dir, log_iters=50,
                  resume_model=resume)
        best_iter = read_state(self.checkpoint(out, iters))[0]['best_iter']
        self._run('qat_export', config=self.config,
                  model_path=os.path.join(train_dir, 'best_model', 'model.pdparams'),
                  save_dir=os.path.join(out, 'infer'), verify_images=0, to_onnx=self._onnx(),
                  input_shape=self.export_shape)
        return os.path.join(out, 'infer'), best_iter

    def checkpoint(self, out: str, iters: int) -> str:
        return os.path.join(out, 'train', f'iter_{iters}')

    def val_set(self) -> Any:
        if self._val is None:
            from segslim.builder import build_dataset
            from segslim.config import load_config
            self._val = build_dataset(load_config(self.config, opts=self.opts), 'val_dataset')
        return self._val

    def _opts(self, backend: str, precision: str) -> Any:
        from segslim.options import EngineOptions
        return EngineOptions(backend=backend, precision=precision, device='cpu',
                             cpu_threads=self.threads, input_shape=tuple(self.shape))

    def miou(self, model_dir: str, int8: bool) -> Dict[str, float]:
        """Engine mIoU on the val set, per backend."""
        from segslim.deploy.benchmark import evaluate_engines
        from segslim.deploy.engines import create_predictor, runs_model
        backends = [b for b in self.backends if runs_model(b, model_dir)]
        preds = [create_predictor(model_dir, self._opts(b, 'int8' if int8 else 'fp32'))
                 for b in backends]
        rows = evaluate_engines(preds, self.val_set(), self.num_images,
                                desc=os.path.basename(model_dir.rstrip('/')))
        return {b: row.miou for b, row in zip(backends, rows)}

    def speedup(self, fp32_dir: str, model_dir: str, backend: str) -> float:
        """FP32 time over INT8 time of the two folders on `backend` (timing only, the
        benchmark's interleaved median at --input_shape)."""
        from segslim.deploy.benchmark import time_interleaved, timing_batch
        from segslim.deploy.engines import create_predictor
        preds = [create_predictor(d, self._opts(backend, p))
                 for d, p in ((fp32_dir, 'fp32'), (model_dir, 'int8'))]
        batch = timing_batch(preds[0], self.val_set(), self.shape)
        times = time_interleaved(preds, [batch, batch], warmup=2, repeats=5)
        return paired_ratio(times[0], times[1])

    def bench(self, model_dirs: Sequence[str]) -> List[BenchRow]:
        """benchmark.py's rows for the candidates (first: the FP32 export)."""
        from segslim.deploy.benchmark import benchmark
        return benchmark(model_dirs, self.val_set(), self._opts(self.backends[0], 'fp32'),
                         shape=self.shape, backends=self.backends, repeats=10,
                         warmup=3).rows


@dataclass
class Candidate:
    """One benchmark row of a candidate, judged against the FP32 export's mIoU on its
    engine (`reference`) with the bound `max_drop`."""
    name: str
    row: BenchRow
    reference: float
    max_drop: float

    @property
    def drop(self) -> float:
        return self.reference - (self.row.miou or 0.0)

    @property
    def meets(self) -> bool:
        return within_bound(self.reference, self.row.miou or 0.0, self.max_drop)

    def to_json(self) -> Dict[str, Any]:
        """The record auto_quant.json keeps of it (and report.md reads)."""
        return {'candidate': self.name, 'backend': self.row.backend,
                'precision': self.row.precision.value, 's_per_img': self.row.s_per_img,
                'miou': self.row.miou, 'drop': self.drop, 'meets': self.meets,
                'int8_conv_ops': self.row.ops.int8_conv_ops, 'conv_ops': self.row.ops.conv_ops}


class AutoQuant:
    """The decision over the steps' results; state in <save_dir>/auto_quant.json."""

    def __init__(self, steps: Any, save_dir: str, max_drop: float, max_qat_iters: int,
                 resume: bool = False, qat_rounds: int = 4):
        check_max_miou_drop(max_drop)
        self.steps, self.save_dir, self.max_drop = steps, save_dir, max_drop
        self.max_qat_iters, self.rounds = max_qat_iters, qat_rounds
        self.path = os.path.join(save_dir, STATE)
        self.state: Dict[str, Any] = {'candidates': {}, 'max_miou_drop': max_drop}
        if resume and os.path.isfile(self.path):
            with open(self.path) as f:
                self.state = json.load(f)
            logger.info('auto-quant: resuming; done: %s',
                        ', '.join(self.state['candidates']) or 'nothing')

    def _save(self) -> None:
        write_json(self.path, self.state)

    def _done(self, name: str) -> Optional[Dict[str, Any]]:
        cand = self.state['candidates'].get(name)
        return cand if cand and cand.get('final') and os.path.isdir(cand['dir']) else None

    def _record(self, name: str, method: str, model_dir: Optional[str], started: float,
                int8: bool = True, final: bool = True, **extra: Any) -> Dict[str, Any]:
        cand: Dict[str, Any] = {'method': method, 'dir': model_dir, 'final': final,
                                'seconds': round(time.time() - started, 1), **extra}
        if model_dir:
            cand['miou'] = self.steps.miou(model_dir, int8)
            ref = self.state['candidates'].get('fp32', {}).get('miou', cand['miou'])
            cand['drop'] = {b: ref[b] - m for b, m in cand['miou'].items()}
            cand['meets'] = [b for b, m in cand['miou'].items()
                             if within_bound(ref[b], m, self.max_drop)]
            logger.info('auto-quant: %s: mIoU %s; within %.4f on: %s', method,
                        ', '.join(f'{b} {m:.4f}' for b, m in cand['miou'].items()),
                        self.max_drop, ', '.join(cand['meets']) or 'no engine')
        self.state['candidates'][name] = cand
        self._save()
        return cand

    def run(self) -> int:
        os.makedirs(self.save_dir, exist_ok=True)

        def d(name: str) -> str:
            return os.path.join(self.save_dir, name)
        if not self._done('fp32'):
            t = time.time()
            self._record('fp32', 'FP32 export', self.steps.export_fp32(d('fp32_infer')), t,
                         int8=False)
        if not self._done('ptq'):
            t = time.time()
            self._record('ptq', 'PTQ', self.steps.ptq(d('ptq_infer')), t)
        nncf = self.steps.nncf_ready
        if nncf and not self._done('nncf'):
            t = time.time()
            self._record('nncf', 'PTQ by NNCF (OpenVINO)', self.steps.nncf(d('nncf_infer')), t)
        if not self._met() and not self._done('skip'):
            t = time.time()
            # checked on the first engine (in --backend order) where PTQ missed
            ptq = self.state['candidates']['ptq']
            backend = next(b for b in ptq['miou'] if b not in ptq['meets'])
            model = self.steps.skip_set(d('skip'), self.max_drop, backend)
            self._record('skip', f'PTQ with a skip set (checked on {backend})', model, t,
                         note='' if model else f'no skip set needed or found on {backend}')
        self._check_speed('skip')
        if not self._met() and nncf and not self._done('nncf_ac'):
            t = time.time()
            self._record('nncf_ac', 'PTQ by NNCF, accuracy-controlled (OpenVINO)',
                         self.steps.nncf(d('nncf_ac_infer'), self.max_drop), t)
        if not self._met() and not self._done('recon'):
            t = time.time()
            self._record('recon', 'Reconstruction PTQ (BRECQ, region by region)',
                         self.steps.recon(d('recon_infer')), t)
        if not self._met():
            self._qat(d('qat'))
        return self._choose()

    def _met(self) -> bool:
        return any(c.get('meets') and not c.get('too_slow')
                   for n, c in self.state['candidates'].items() if n != 'fp32')

    def _check_speed(self, name: str) -> None:
        """Marks a candidate that meets the bound but keeps so much in FP32 that it is less
        than MIN_SPEEDUP faster than FP32 on every engine where it meets (it stays a
        candidate; the search goes on)."""
        cand = self.state['candidates'].get(name) or {}
        if not cand.get('meets') or 'speedup' in cand:
            return
        fp32 = self.state['candidates']['fp32']['dir']
        cand['speedup'] = {b: self.steps.speedup(fp32, cand['dir'], b) for b in cand['meets']}
        cand['too_slow'] = max(cand['speedup'].values()) < MIN_SPEEDUP
        if cand['too_slow']:
            logger.warning('auto-quant: %s meets the bound but runs only %s of FP32 speed: too '
                           'little INT8 to be worth it; going on', cand['method'], ', '.join(
                               f'{v:.2f}x on {b}' for b, v in cand['speedup'].items()))
        self._save()

    def _qat(self, out: str) -> None:
        cand = self.state['candidates'].get('qat') or {}
        if cand.get('final'):
            return
        chunk = max(1, -(-self.max_qat_iters // self.rounds))
        done = cand.get('iters', 0)
        t = time.time() - cand.get('seconds', 0)
        while done < self.max_qat_iters:
            iters = min(done + chunk, self.max_qat_iters)
            resume = self.steps.checkpoint(out, done) if done else None
            model, best_iter = self.steps.qat(out, iters, resume)
            last = iters >= self.max_qat_iters
            cand = self._record('qat', f'QAT with distillation, {iters} iterations (best '
                                f'checkpoint: iteration {best_iter})', model, t, final=False,
                                iters=iters, best_iter=best_iter)
            if cand['meets'] or last:
                cand['final'] = True
                self._save()
                return
            done = iters

    def _choose(self) -> int:
        cands = {n: c for n, c in self.state['candidates'].items() if c.get('dir')}
        names = [n for n in cands if n != 'fp32']
        rows = self.steps.bench([cands['fp32']['dir']] + [cands[n]['dir'] for n in names])
        by_dir = {c['dir']: n for n, c in cands.items()}
        ref = {r.backend: r.miou for r in rows if by_dir.get(r.model_dir) == 'fp32'
               and r.precision is Precision.FP32}
        table = [Candidate(by_dir.get(r.model_dir, '?'), r, ref.get(r.backend, r.miou) or 0.0,
                           self.max_drop) for r in rows]
        int8 = [c for c in table if c.row.int8]
        good = sorted((c for c in int8 if c.meets), key=lambda c: c.row.s_per_img)
        self.state['rows'] = [c.to_json() for c in table]
        choice = good[0] if good else None
        fastest_float = min((c.row for c in table if not c.row.quantized),
                            key=lambda r: r.s_per_img)
        if choice is not None:
            best = os.path.join(self.save_dir, 'best')
            partial = best + '.partial'  # a kill mid-copy leaves no half-written best/
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(choice.row.model_dir, partial)
            # the engine it was measured on, and its unquantized ops' precision where that
            # row ran them in bf16 (the engine runs the folder so by default)
            update_deploy(partial, engine=choice.row.backend,
                          **({'rest': choice.row.rest} if choice.row.rest else {}))
            shutil.rmtree(best, ignore_errors=True)
            os.rename(partial, best)
            self.state['choice'] = {'candidate': choice.name, 'backend': choice.row.backend,
                                    'dir': best}
            logger.info('auto-quant: best: %s on %s, %.1f ms, mIoU %.4f (%+.4f vs FP32) -> %s',
                        cands[choice.name]['method'], choice.row.backend,
                        1000 * choice.row.s_per_img, choice.row.miou, -choice.drop, best)
            if fastest_float.s_per_img < choice.row.s_per_img:
                logger.warning('auto-quant: the FP32 model runs faster (%s %s, %.1f ms) than '
                               'any INT8 row that keeps the mIoU on this CPU',
                               fastest_float.backend, fastest_float.precision,
                               1000 * fastest_float.s_per_img)
        else:
            closest = min(int8, key=lambda c: c.drop) if int8 else None
            self.state['choice'] = None
            self.state['closest'] = '{} on {}, drop {:.4f}'.format(
                cands[closest.name]['method'], closest.row.backend,
                closest.drop) if closest else 'none'
            logger.error('auto-quant: no INT8 candidate keeps mIoU within %.4f; closest: %s',
                         self.max_drop, self.state['closest'])
        self._save()
        write_text(os.path.join(self.save_dir, 'report.md'), report_markdown(self.state))
        return 0 if choice is not None else 1


def report_markdown(state: Dict[str, Any]) -> str:
    """report.md: every candidate tried, every engine row, and the choice."""
    lines = ['# auto-quant', '', 'Bound: INT8 mIoU within {:.4f} of the FP32 export on the same '
             'engine.'.format(state['max_miou_drop']), '', '## Candidates', '',
             '| candidate | method | time s | engine mIoU (vs FP32) |', '|---|---|---|---|']
    for name, c in state['candidates'].items():
        mious = ', '.join('{} {:.4f} ({:+.4f})'.format(b, m, 0.0 - c['drop'][b])
                          for b, m in (c.get('miou') or {}).items())
        lines.append('| {} | {} | {} | {} |'.format(name, c['method'], c['seconds'],
                                                     mious or c.get('note', '-')))
    lines += ['', '## Engines (latency and mIoU as benchmark.py measures them)', '',
              '| candidate | engine | precision | ms | mIoU | vs FP32 | INT8 convs | within |',
              '|---|---|---|---|---|---|---|---|']
    for r in state.get('rows', []):
        lines.append('| {} | {} | {} | {:.1f} | {:.4f} | {:+.4f} | {}/{} | {} |'.format(
            r['candidate'], r['backend'], r['precision'], 1000 * r['s_per_img'], r['miou'],
            0.0 - r['drop'], r['int8_conv_ops'], r['conv_ops'], 'yes' if r['meets'] else 'no'))
    choice = state.get('choice')
    lines += ['', 'Choice: ' + ('{candidate} on {backend}, in {dir}'.format(**choice) if choice
                                else 'none: no INT8 candidate keeps the mIoU (exit code 1); '
                                'closest: ' + state.get('closest', 'none'))]
    return '\n'.join(lines) + '\n'
