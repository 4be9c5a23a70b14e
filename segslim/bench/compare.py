"""Every quantization method on one trained model, side by side on each engine: mIoU and its
change against the engine's FP32, the IoU of the thin classes, pixel agreement with FP32 and
the time each method took to quantize.

Our methods run as a user runs them (each command's own options and workflow, in a child
process: segslim.cli.commands.run_in_child); the engines' own quantizers quantize the same
FP32 export on the same calibration images (segslim.bench.peers); one benchmark then
evaluates every model folder on every engine in one process. A finished method is kept (its
model folder, its time in times.json), so a killed comparison goes on where it stopped."""
import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from segslim.deploy.bench_report import BenchReport
from segslim.deploy.results import BenchRow, within_bound
from segslim.errors import UserError
from segslim.fileio import write_json
from segslim.logger import logger
from segslim.options import PTQ_ALGOS, QAT_LEARNING_RATE, RECON_EPOCHS, qat_learning_rate

TIMES = 'times.json'
# the timing input without --input_shape or --export_shape: the street scenes' 256x128
STREET_SHAPE = (1, 3, 128, 256)

Given = Dict[str, object]


@dataclass(frozen=True)
class Setup:
    """The trained model and what every method is given."""
    config: str
    model_path: str
    work_dir: str
    qat_iters: int
    backends: Sequence[str]
    max_miou_drop: float
    onnx: bool
    calib_images: int
    threads: int
    opts: Sequence[str] = ()
    export_shape: Optional[Sequence[int]] = None  # every export's fixed input (None: dynamic)
    qat_lr: float = QAT_LEARNING_RATE  # options.qat_learning_rate of the config

    def folder(self, name: str) -> str:
        return os.path.join(self.work_dir, name)


@dataclass(frozen=True)
class Method:
    """One of our methods: the commands it runs (command name, its flags) and the model
    folder it ends with."""
    name: str
    steps: Callable[[Setup], List[Tuple[str, Given]]]
    model_dir: Callable[[Setup], str]


def _ptq(algo: str, **extra: object) -> Callable[[Setup], List[Tuple[str, Given]]]:
    def steps(s: Setup) -> List[Tuple[str, Given]]:
        name = f'ptq_{algo}' if not extra else 'ptq_recon'
        return [('ptq', dict(config=s.config, model_path=s.model_path, save_dir=s.folder(name),
                             algo=algo, batch_nums=s.calib_images, batch_size=1,
                             verify_images=0, to_onnx=s.onnx, input_shape=s.export_shape,
                             **extra))]
    return steps


def _qat(name: str, distill: bool) -> Callable[[Setup], List[Tuple[str, Given]]]:
    def steps(s: Setup) -> List[Tuple[str, Given]]:
        train = os.path.join(s.folder(name), 'train')
        return [('qat_train', dict(config=s.config, model_path=s.model_path,
                                   learning_rate=s.qat_lr, iters=s.qat_iters, do_eval=True,
                                   save_interval=max(1, s.qat_iters // 4), seed=0,
                                   log_iters=50, distill=distill, save_dir=train)),
                ('qat_export', dict(config=s.config,
                                    model_path=os.path.join(train, 'best_model',
                                                            'model.pdparams'),
                                    save_dir=os.path.join(s.folder(name), 'model'),
                                    to_onnx=s.onnx, input_shape=s.export_shape))]
    return steps


def _auto(s: Setup) -> List[Tuple[str, Given]]:
    return [('auto_quant', dict(config=s.config, model_path=s.model_path,
                                save_dir=s.folder('auto'), max_miou_drop=s.max_miou_drop,
                                max_qat_iters=s.qat_iters, backend=list(s.backends),
                                calib_images=s.calib_images, cpu_threads=s.threads,
                                export_shape=s.export_shape))]


def _in(*parts: str) -> Callable[[Setup], str]:
    return lambda s: os.path.join(s.work_dir, *parts)


METHODS: Tuple[Method, ...] = (
    *(Method(f'ptq_{a}', _ptq(a), _in(f'ptq_{a}')) for a in PTQ_ALGOS),
    Method('ptq_recon', _ptq('abs_max', recon='region', recon_epochs=RECON_EPOCHS),
           _in('ptq_recon')),
    Method('qat', _qat('qat', False), _in('qat', 'model')),
    Method('qat_distill', _qat('qat_distill', True), _in('qat_distill', 'model')),
    Method('auto', _auto, _in('auto', 'best')),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


def _times(setup: Setup) -> Dict[str, float]:
    path = setup.folder(TIMES)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {str(k): float(v) for k, v in json.load(f).items()}


def _finished(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, 'deploy.yaml'))


Step = Callable[..., None]  # step(command, **flags): runs one command in its own process


def run_methods(setup: Setup, names: Sequence[str], step: Step) -> Dict[str, float]:
    """Each method of `names` not finished yet (the FP32 export first), each command run by
    `step`, timed; returns the seconds each took to quantize (kept in times.json across runs)."""
    times = _times(setup)
    fp32 = setup.folder('fp32')
    jobs: List[Tuple[str, List[Tuple[str, Given]], str]] = [
        ('fp32', [('export', dict(config=setup.config, model_path=setup.model_path,
                                  save_dir=fp32, to_onnx=setup.onnx,
                                  input_shape=setup.export_shape))], fp32)]
    jobs += [(m.name, m.steps(setup), m.model_dir(setup)) for m in METHODS if m.name in names]
    for name, steps, model_dir in jobs:
        if name in times and _finished(model_dir):
            logger.info('compare: %s is done (%s), kept', name, model_dir)
            continue
        tic = time.perf_counter()
        for command, given in steps:
            logger.info('compare: %s: segslim-%s', name, command.replace('_', '-'))
            step(command, **given, opts=list(setup.opts) or None)
        times[name] = time.perf_counter() - tic
        write_json(setup.folder(TIMES), times)
    return times


def run_peers(setup: Setup, cfg: object) -> Tuple[List[str], Dict[str, float]]:
    """The engines' own quantizers on the FP32 export and our PTQ's calibration images, each
    timed; a finished one is kept."""
    from segslim.bench.peers import PEERS, make_peer
    from segslim.builder import build_dataset
    from segslim.deploy.engines import BACKENDS, importable
    from segslim.modeldir import model_inputs, read_deploy
    from segslim.quant.ptq import calibration_paths
    fp32 = setup.folder('fp32')
    times = _times(setup)
    dirs: List[str] = []
    batches = None
    for peer in PEERS.values():
        out = setup.folder(peer.name)
        if peer.engine not in setup.backends or not all(
                importable(m) for m in (*peer.requires, *BACKENDS[peer.engine].requires)):
            continue
        if not (peer.name in times and _finished(out)):
            if batches is None:
                files = build_dataset(cfg, 'train_dataset').file_list  # type: ignore[arg-type]
                batches = model_inputs(read_deploy(fp32),
                                       calibration_paths(files, setup.calib_images))
            tic = time.perf_counter()
            make_peer(peer.name, fp32, out, batches)
            times[peer.name] = time.perf_counter() - tic
            write_json(setup.folder(TIMES), times)
        dirs.append(out)
    return dirs, times


@dataclass
class Line:
    """One row of the comparison: a method's model on one engine, against that engine's FP32
    row; `thin` maps each thin class to (this row's IoU, FP32's IoU)."""
    method: str
    backend: str
    row: BenchRow
    fp32: BenchRow
    quantize_s: Optional[float]
    thin: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        """FP32's mIoU minus this row's on the same engine (x 100: points)."""
        return _miou(self.fp32) - _miou(self.row)

    @property
    def worst_thin_drop(self) -> float:
        return max((fp32 - iou for iou, fp32 in self.thin.values()), default=0.0)


def _miou(row: BenchRow) -> float:
    assert row.accuracy is not None, 'the comparison evaluates every row'
    return row.accuracy.miou


def comparison(report: BenchReport, labels: Dict[str, str], times: Dict[str, float],
               classes: Sequence[str], thin: Sequence[str]) -> List[Line]:
    """Lines per engine: its FP32 row first, then every quantized row in `labels` order
    (`labels` maps a model folder to its method's name; `times` a name to seconds)."""
    order = list(labels)
    lines = []
    for backend in dict.fromkeys(r.backend for r in report.rows):
        rows = [r for r in report.rows if r.backend == backend and r.model_dir in labels
                and r.accuracy is not None and r.precision.value != 'bf16']
        fp32 = next((r for r in rows if not r.quantized), None)
        if fp32 is None:
            continue
        for r in sorted(rows, key=lambda r: (r.quantized, order.index(r.model_dir))):
            ious, base = r.accuracy.class_iou, fp32.accuracy.class_iou  # type: ignore[union-attr]
            lines.append(Line(labels[r.model_dir], backend, r, fp32,
                              times.get(labels[r.model_dir]) if r.quantized else None,
                              {c: (ious[classes.index(c)], base[classes.index(c)])
                               for c in thin}))
    return lines


def goals(lines: Sequence[Line], max_drop: float, thin_drop: float = 0.015) -> List[str]:
    """The accuracy goals per engine, each a sentence: met, missed or not applicable."""
    out = []
    for backend in dict.fromkeys(ln.backend for ln in lines):
        by = {ln.method: ln for ln in lines if ln.backend == backend and ln.row.quantized}
        auto = by.get('auto')
        if auto is not None:
            ok = (within_bound(_miou(auto.fp32), _miou(auto.row), max_drop)
                  and auto.worst_thin_drop <= thin_drop)
            out.append(f'{backend}: auto-quant {_vs_fp32(auto.drop)}, worst thin class '
                       f'{_vs_fp32(auto.worst_thin_drop)}: {_met(ok)} (goal: <= '
                       f'{100 * max_drop:.1f} pt below, every thin class <= '
                       f'{100 * thin_drop:.1f} pt)')
        for worse, better, loss, what in (('ptq_abs_max', 'ptq_recon', 0.01, 'reconstruction'),
                                           ('qat', 'qat_distill', 0.005, '--distill')):
            a, b = by.get(worse), by.get(better)
            if a is None or b is None:
                continue
            if a.drop < loss:
                out.append(f'{backend}: {worse} {_vs_fp32(a.drop)} (less than '
                           f'{100 * loss:.1f} pt below): the {what} goal does not apply')
            else:
                out.append(f'{backend}: {worse} {_vs_fp32(a.drop)}, {better} '
                           f'{_vs_fp32(b.drop)}: {_met(b.drop <= a.drop / 2)} (goal: {what} '
                           'recovers at least half)')
    return out


def _pt(x: float) -> str:
    return f'{100 * x:+.2f}'


def _vs_fp32(drop: float) -> str:
    """'0.17 pt below FP32' for a drop of 0.0017, '0.05 pt above FP32' for -0.0005."""
    return f'{100 * abs(drop):.2f} pt {"below" if drop >= 0 else "above"} FP32'


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return '-'
    return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'


def _met(ok: bool) -> str:
    return 'met' if ok else 'MISSED'


def format_comparison(lines: Sequence[Line], report: BenchReport, goal_lines: Sequence[str],
                      note: str) -> str:
    """The markdown page: what ran where, one table per engine, the goals."""
    from segslim.deploy.report import markdown_table
    thin = list(lines[0].thin) if lines else []
    out = [f'Data: {note}.',
           f'CPU: {report.cpu} | ISA: {report.isa} | threads: {report.threads} | timing input '
           f'{"x".join(map(str, report.input_shape))}, median of {report.repeats} runs',
           'Stack: ' + ', '.join(f'{k} {v}' for k, v in report.versions.items()), '',
           'mIoU and per-class IoU on the val set on each engine; change in points against '
           'the same engine\'s FP32; agreement: share of val pixels labelled as Paddle '
           'Inference FP32 labels them; quantize: wall time of the method (training included '
           'for QAT and auto-quant).']
    for backend in dict.fromkeys(ln.backend for ln in lines):
        out += ['', f'### {backend}', '']
        header = ['method', 'INT8 ops', 'mIoU', 'change', *thin, 'worst thin', 'agreement',
                  'quantize', 'ms / image']
        rows = []
        for ln in (x for x in lines if x.backend == backend):
            acc = ln.row.accuracy
            assert acc is not None
            rows.append([ln.method if ln.row.quantized else 'FP32', ln.row.ops.cell(),
                         f'{acc.miou:.4f}', _pt(-ln.drop) if ln.row.quantized else '-',
                         *(f'{iou:.3f}' for iou, _ in ln.thin.values()),
                         _pt(-ln.worst_thin_drop) if ln.row.quantized else '-',
                         f'{acc.pixel_agreement:.4f}',
                         _duration(ln.quantize_s),
                         f'{1000 * ln.row.s_per_img:.2f}'])
        out.append(markdown_table(header, rows))
    out += ['', '### Goals', ''] + [f'- {g}' for g in goal_lines or [
        'none applies to the methods compared (auto-quant; PTQ abs_max with reconstruction; '
        'QAT with --distill)']]
    return '\n'.join(out) + '\n'


def run_compare(args: argparse.Namespace, step: Step) -> int:
    """tools/compare_methods.py: every method of --methods (its commands run by `step`) and
    the peers on the trained --model_path, then the benchmark of all of them on every engine
    of --backend."""
    from segslim._paddle import set_device
    from segslim.builder import build_dataset, num_classes_of
    from segslim.config import load_config
    from segslim.deploy.benchmark import benchmark
    from segslim.deploy.engines import available_backends, importable
    from segslim.fileio import check_writable, write_text
    from segslim.options import EngineOptions, timing_shape
    cfg = load_config(args.config, opts=args.opts,
                      required=('model', 'train_dataset', 'val_dataset'))
    if not os.path.isfile(args.model_path):
        raise UserError(f'--model_path {args.model_path}: no such file (train.py writes '
                        '<save_dir>/best_model/model.pdparams)')
    check_writable(args.save_dir)
    shape = timing_shape(args.input_shape, args.export_shape, STREET_SHAPE)
    classes, thin = class_names(num_classes_of(cfg), args.thin)
    backends = list(dict.fromkeys(args.backend or available_backends()))
    setup = Setup(config=args.config, model_path=args.model_path, work_dir=args.save_dir,
                  qat_iters=args.qat_iters, backends=backends, max_miou_drop=args.max_miou_drop,
                  onnx='onnxruntime' in backends and importable('paddle2onnx'),
                  calib_images=args.calib_images, threads=args.cpu_threads,
                  opts=tuple(args.opts or ()), export_shape=args.export_shape,
                  qat_lr=qat_learning_rate(cfg))
    times = run_methods(setup, args.methods, step)
    peer_dirs, times = run_peers(setup, cfg) if args.peers else ([], times)
    labels = {setup.folder('fp32'): 'fp32',
              **{m.model_dir(setup): m.name for m in METHODS if m.name in args.methods},
              **{d: os.path.basename(d) for d in peer_dirs}}
    dataset = build_dataset(cfg, 'val_dataset')
    opts = EngineOptions(device=set_device('cpu'), cpu_threads=args.cpu_threads)
    report = benchmark(list(labels), dataset, opts, shape=shape, warmup=2,
                       repeats=args.repeats, with_bf16=False, backends=backends)
    write_json(setup.folder('report.json'), report.to_json())
    lines = comparison(report, labels, times, classes, thin)
    text = format_comparison(lines, report, goals(lines, args.max_miou_drop),
                             data_note(cfg['val_dataset'].get('dataset_root', '')))
    write_text(setup.folder('compare.md'), text)
    print(text, flush=True)
    return 0


def class_names(num_classes: int, thin: Optional[Sequence[str]]) -> Tuple[List[str], List[str]]:
    """The class names (Cityscapes' 19 train classes for a 19-class model, else the ids) and
    the thin ones among them (default: the street scenes' thin classes for 19 classes)."""
    from segslim.data.street import CLASSES, THIN_CLASSES
    names = list(CLASSES) if num_classes == len(CLASSES) else [str(i) for i in range(num_classes)]
    chosen = list(thin) if thin is not None else list(THIN_CLASSES if num_classes == len(CLASSES)
                                                      else ())
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise UserError(f'--thin {" ".join(unknown)}: not a class of this {num_classes}-class '
                        f'model (its classes: {", ".join(names)})')
    return names, chosen


def data_note(dataset_root: str) -> str:
    """The first line of the data's README.txt (the street generator's says it is synthetic),
    else the folder."""
    path = os.path.join(dataset_root, 'README.txt')
    if os.path.isfile(path):
        with open(path) as f:
            return f.readline().strip().rstrip('.')
    return dataset_root
