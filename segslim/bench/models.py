"""Latency of FP32 vs INT8 for the shipped model configs on random-init weights.

Speed does not depend on trained weights, so each model is built from its config, exported
as FP32, quantized with activation scales calibrated on a few generated images, exported as
INT8, and timed through Paddle Inference (and OpenVINO when asked) in one process,
interleaved.
"""
import datetime
import glob
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from segslim import builder
from segslim._paddle import paddle
from segslim.bench.ceiling import apply_ceilings, measure_ceilings
from segslim.bench.peers import PEERS, make_peers
from segslim.config import Yaml, load_config
from segslim.data.demo import make_sample
from segslim.deploy.benchmark import benchmark
from segslim.deploy.cpu import cpu_features
from segslim.deploy.engines import backend_label
from segslim.deploy.profile import format_profile, profile_engine
from segslim.deploy.report import format_report, markdown_table
from segslim.deploy.results import PEER_LABELS, BenchReport, Gain
from segslim.errors import UserError
from segslim.export import export_inference_model
from segslim.fileio import write_json, write_text
from segslim.logger import logger, progress
from segslim.modeldir import Preprocessor, deploy_transforms, model_inputs, read_deploy
from segslim.onnx.export import export_onnx
from segslim.options import EngineOptions
from segslim.quant.qat import calibrate, quant_config_of, quantize_model


def sample_images(size: int, count: int, seed: int = 0) -> List[np.ndarray]:
    """Generated fundus-like BGR images, a stand-in for real calibration data."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size)[0] for _ in range(count)]


def calibration_batches(cfg: Yaml, size: int, count: int,
                        seed: int = 0) -> List[np.ndarray]:
    """sample_images through the config's deploy transforms, N=1."""
    pre = Preprocessor(deploy_transforms(cfg))
    return [pre(image)[0][np.newaxis] for image in sample_images(size, count, seed)]


def export_pair(config: str, work_dir: str, size: int, calib: int = 4,
                layers: Optional[str] = 'all', fp32: bool = True,
                input_shape: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """FP32 (unless not `fp32`) and INT8 exports of the config's model with random weights;
    `layers` overrides the config's quant_config.layers (None: the config's own policy)."""
    opts = [f'quant_config.layers={layers}'] if layers else []
    cfg = load_config(config, opts=opts, required=('model',))
    paddle.seed(0)
    model = builder.build_model(cfg)
    model.eval()
    dirs = {'fp32': os.path.join(work_dir, 'fp32'), 'int8': os.path.join(work_dir, 'int8')}
    if fp32:
        export_inference_model(model, cfg, dirs['fp32'], output_op='argmax',
                               input_shape=input_shape)
    qcfg = quant_config_of(cfg)
    quanter = quantize_model(model, qcfg, summary=False)
    calibrate(model, calibration_batches(cfg, size, calib))
    export_inference_model(model, cfg, dirs['int8'], output_op='argmax', quanter=quanter,
                           int8_ops=qcfg['int8_ops'], input_shape=input_shape)
    return dirs


# Generated images that calibrate every INT8 model of `make bench` (ours and the peers'), and
# those its rows' agreement with FP32 is measured on (random weights: no val set to score).
CALIB_IMAGES = 4
AGREEMENT_IMAGES = 4

# PaddleSeg's published QAT table: ResNet50_vd OS8 models timed on Cityscapes 1024x512 crops.
CITYSCAPES_SEVEN = ('ANN', 'DANet', 'DeepLabV3P', 'DNLNet', 'EMANet', 'GCNet', 'PSPNet')


def zoo_configs(root: str = 'configs') -> List[str]:
    """Every model config of the zoo (configs/<model>/*.yml), sorted."""
    return sorted(p for p in glob.glob(os.path.join(root, '*', '*.yml'))
                  if os.path.basename(os.path.dirname(p)) not in ('_base_', 'quick_start'))


def bench_shape(cfg: Yaml, size: int) -> List[int]:
    """1x3x512x1024 for the Cityscapes seven (ResNet50_vd OS8), else 1x3xSIZExSIZE."""
    model = cfg['model']
    backbone = (model.get('backbone') or {}).get('type')
    if model['type'] in CITYSCAPES_SEVEN and backbone == 'ResNet50_vd':
        return [1, 3, 512, 1024]
    return [1, 3, size, size]


@dataclass
class ZooResult:
    """One zoo model's benchmark: its report, the engines that could not run it, and where
    the Paddle INT8 engine's time goes (deploy.profile)."""
    model: str
    config: str
    report: BenchReport
    engine_failures: List[str] = field(default_factory=list)
    int8_profile: Optional[Dict[str, Any]] = None


def bench_models(configs: Sequence[str], threads: int = 2, size: int = 512,
                 repeats: int = 20, warmup: int = 3,
                 backends: Sequence[str] = ('paddle',), peers: bool = True) -> List[ZooResult]:
    """One benchmark report per config (rows fp32, bf16 where supported, int8 on each
    backend), each model quantized with its config's own policy, and each measured against
    this CPU's ceiling (segslim.bench.ceiling, probed once per run). With `peers`, the engines'
    own quantizers (segslim.bench.peers) quantize the same FP32 export on the same generated
    calibration images and are timed in the same run; every row's agreement with the FP32
    row is measured on other generated images."""
    reports = []
    ceilings = measure_ceilings(backends, EngineOptions(device='cpu', cpu_threads=threads),
                                bf16=bool(cpu_features()['bf16']))
    for config in progress(configs, 'Models'):
        name = os.path.splitext(os.path.basename(config))[0]
        shape = bench_shape(load_config(config, required=('model',)), size)
        with tempfile.TemporaryDirectory(prefix='segslim-bench-') as work:
            logger.info('Benchmarking %s at %dx%d, %d threads', name, shape[3], shape[2],
                        threads)
            # at the timed size: paddle2onnx converts adaptive pooling only at a known size
            dirs = export_pair(config, work, shape[2], calib=CALIB_IMAGES, layers=None,
                               input_shape=shape)
            model_backends, failures = list(backends), []
            if 'onnxruntime' in backends:
                try:
                    export_onnx(dirs['fp32'])
                    export_onnx(dirs['int8'], 'onnxruntime', sample_images(shape[2], 4))
                except UserError as e:
                    logger.warning('%s: %s; no onnxruntime rows', name, e)
                    model_backends.remove('onnxruntime')
                    failures.append(str(e))
            opts = EngineOptions(device='cpu', cpu_threads=threads, input_shape=tuple(shape))
            deploy = read_deploy(dirs['fp32'])
            peer_dirs = make_peers(dirs['fp32'], os.path.join(work, 'peers'), model_inputs(
                deploy, sample_images(shape[2], CALIB_IMAGES)), model_backends) if peers else []
            samples = model_inputs(deploy, sample_images(shape[2], AGREEMENT_IMAGES, seed=1))
            try:
                report = benchmark([dirs['fp32'], dirs['int8'], *peer_dirs], None, opts,
                                   shape=shape, warmup=warmup, repeats=repeats,
                                   backends=model_backends, sample_batches=samples)
            except UserError as e:  # one engine cannot run this model: time the others
                if len(model_backends) == 1:
                    raise
                logger.warning('%s: %s; timing Paddle Inference only', name, e)
                report = benchmark([dirs['fp32'], dirs['int8'], *peer_dirs], None, opts,
                                   shape=shape, warmup=warmup, repeats=repeats,
                                   backends=('paddle',), sample_batches=samples)
                failures.append(str(e))
            apply_ceilings(report, ceilings)
            result = ZooResult(model=name, config=config, report=report,
                               engine_failures=failures)
            try:  # where the INT8 engine's time goes, in a child process
                result.int8_profile = profile_engine(dirs['int8'], 'int8', threads, shape,
                                                     runs=max(3, repeats // 4))
            except RuntimeError as e:
                logger.warning('%s', e)
            reports.append(result)
    return reports


def summary(results: List[ZooResult]) -> Dict[str, Any]:
    """docs/benchmark.json: one row per model (seconds per image of each engine, speedups,
    INT8 ops over quantizable ops) and the geometric-mean speedups."""
    rows: List[Dict[str, Any]] = []
    for res in results:
        rep = res.report
        by = {(r.backend, r.precision.value): r for r in rep.ours if not r.precision_note}
        fp32 = by[('paddle', 'fp32')]
        bf16, int8 = (by.get(('paddle', p)) for p in ('bf16', 'int8'))
        ov = {p: by.get(('openvino', p)) for p in ('fp32', 'bf16', 'int8')}
        row: Dict[str, Any] = {}
        if any(ov.values()):
            row.update({f'openvino_{p}_s': r.s_per_img if r else None for p, r in ov.items()})
            ov_int8, ov_bf16 = ov['int8'], ov['bf16']
            row['openvino_speedup'] = ov_int8.speedup if ov_int8 else None
            row['openvino_speedup_vs_bf16'] = ov_bf16.s_per_img / ov_int8.s_per_img \
                if ov_int8 and ov_bf16 else None
            row['openvino_int8_ops'] = ov_int8.ops.int8_ops if ov_int8 else None
        ort_fp32, ort_int8 = by.get(('onnxruntime', 'fp32')), by.get(('onnxruntime', 'int8'))
        if ort_fp32 and ort_int8:
            row.update(
                onnxruntime_fp32_s=ort_fp32.s_per_img, onnxruntime_int8_s=ort_int8.s_per_img,
                onnxruntime_speedup=ort_fp32.s_per_img / ort_int8.s_per_img,
                onnxruntime_int8_conv_ops=ort_int8.ops.int8_conv_ops,
                onnxruntime_conv_ops=ort_int8.ops.conv_ops)
        ops = int8.ops if int8 else None
        row.update({
            'model': res.model, 'config': res.config, 'input_shape': rep.input_shape,
            'fp32_s': fp32.s_per_img, 'bf16_s': bf16.s_per_img if bf16 else None,
            'int8_s': int8.s_per_img if int8 else None,
            'speedup': int8.speedup if int8 else None,
            # against the same engine's bf16 (the rows' own column is against the best bf16)
            'speedup_vs_bf16': bf16.s_per_img / int8.s_per_img if int8 and bf16 else None,
            'int8_ops': ops.int8_ops if ops else None,
            'quantizable_ops': ops.quantizable_ops if ops else None,
            'int8_conv_ops': ops.int8_conv_ops if ops else None,
            'conv_ops': ops.conv_ops if ops else None,
            'int8_matmul_ops': ops.int8_matmul_ops if ops else None,
            'matmul_ops': ops.matmul_ops if ops else None,
            'int8_profile_ms': res.int8_profile})
        gain = rep.gain()
        row.update(gain.to_json() if gain else dict.fromkeys(Gain.KEYS))
        row.update(rep.peers_json())
        row['agreement'] = {f'{r.backend}_{r.precision.value}': r.agreement
                            for r in rep.ours if r.agreement is not None}
        rows.append(row)

    def geomean(key):
        values = [r[key] for r in rows if r.get(key)]
        return float(np.exp(np.mean(np.log(values)))) if values else None
    def geomean_vs(peer):
        values = [r['ours_vs_peers'][peer] for r in rows
                  if (r.get('ours_vs_peers') or {}).get(peer)]
        return float(np.exp(np.mean(np.log(values)))) if values else None
    first = results[0].report
    return {'date': datetime.date.today().isoformat(),
            'isa': first.isa, 'cpu': first.cpu, 'threads': first.threads,
            'repeats': first.repeats, 'warmup': first.warmup, 'ceiling': first.ceiling_json(),
            'geomean_gain': geomean('gain'), 'geomean_gain_of_ceiling':
            geomean('gain_of_ceiling'), 'worst_gain_of_ceiling': min(
                (r['gain_of_ceiling'] for r in rows if r.get('gain_of_ceiling')), default=None),
            'rows': rows,
            'geomean_speedup': geomean('speedup'),
            'geomean_speedup_vs_bf16': geomean('speedup_vs_bf16'),
            'geomean_openvino_speedup': geomean('openvino_speedup'),
            'geomean_openvino_speedup_vs_bf16': geomean('openvino_speedup_vs_bf16'),
            'geomean_onnxruntime_speedup': geomean('onnxruntime_speedup'),
            'geomean_ours_vs_peers': {name: geomean_vs(name) for name in PEERS},
            'worst_ours_vs_peers': {name: min(
                (r['ours_vs_peers'][name] for r in rows
                 if (r.get('ours_vs_peers') or {}).get(name)), default=None) for name in PEERS}}


def summary_markdown(summ: Dict[str, Any]) -> str:
    """The head of docs/benchmark.md: what was measured how and the summary tables (from
    summary() alone)."""
    engines = ', '.join(['Paddle Inference'] + [
        name for name, key in (('OpenVINO', 'geomean_openvino_speedup'),
                               ('onnxruntime', 'geomean_onnxruntime_speedup')) if summ.get(key)])
    lines = [f'# Latency: FP32 vs bf16 vs INT8 on {engines}', '',
             'Written by `make bench` (`tools/bench_models.py`) on {}. CPU: {} ({}), {} threads, '
             'batch 1; median of {} runs after {} warm-up runs, the engines of a model '
             'interleaved in one process, each timed run after an untimed one of the same '
             'engine. Input 1x3x512x1024 for the ResNet50_vd OS8 '
             'Cityscapes models, else square (see each row). Weights are random (latency does not '
             'depend on them); INT8 activation scales come from a few generated images; each '
             'model is quantized with its config\'s `quant_config`. Exported programs have '
             'the conv-bias rewrite, so oneDNN fuses conv + bias + BN + activation in FP32, '
             'bf16 and INT8 alike. mIoU of trained models is in the demo report '
             '(`make demo`).'.format(summ.get('date', 'an unrecorded date'), summ['cpu'],
                                     summ['isa'], summ['threads'], summ['repeats'],
                                     summ['warmup']), '',
             '| Model | input | FP32 ms | bf16 ms | INT8 ms | INT8 vs FP32 | INT8 vs bf16 | '
             'INT8 convs | INT8 matmuls |', '|---|---|---|---|---|---|---|---|---|']

    def ms(v):
        return f'{v * 1000:.1f}' if v else '-'

    def ratio(v):
        return f'{v:.2f}x' if v else '-'
    for r in summ['rows']:
        lines.append('| {} | {}x{} | {} | {} | {} | {} | {} | {}/{} | {} |'.format(
            r['model'], r['input_shape'][3], r['input_shape'][2], ms(r['fp32_s']),
            ms(r['bf16_s']), ms(r['int8_s']), ratio(r['speedup']), ratio(r['speedup_vs_bf16']),
            r['int8_conv_ops'], r['conv_ops'],
            '{}/{}'.format(r['int8_matmul_ops'], r['matmul_ops']) if r['matmul_ops'] else '-'))
    lines += ['', 'Geometric mean: INT8 {} over FP32, {} over bf16.'.format(
        ratio(summ['geomean_speedup']), ratio(summ['geomean_speedup_vs_bf16']))]
    ceiling = summ.get('ceiling') or {}
    if ceiling.get('int8_vs_best_unquantized'):
        lines += ['', '### Gain against this CPU\'s ceiling', '',
                  'Ceiling (segslim.bench.ceiling: compute-bound 3x3 convs, 256 channels): '
                  + ', '.join(
                      f"{backend_label(b)} INT8 {ratio(c['int8_x'])}"
                      for b, c in ceiling.items() if isinstance(c, dict)) +
                  '; best INT8 over best unquantized {}.'.format(
                      ratio(ceiling['int8_vs_best_unquantized'])), '',
                  markdown_table(('Model', 'best INT8', 'best unquantized', 'gain',
                                  'of ceiling'),
                                 ((r['model'], '{} {}'.format(
                                     backend_label(r['best_int8_engine'] or '-'),
                                     ms(r['best_int8_s'])),
                                   '{} {}'.format(backend_label(r['best_unquantized_engine'] or
                                                                '-'),
                                                  ms(r['best_unquantized_s'])),
                                   ratio(r['gain']), f"{r['gain_of_ceiling']:.0%}"
                                   if r['gain_of_ceiling'] else '-')
                                  for r in summ['rows'])), '',
                  'Geometric mean gain {} = {} of the ceiling; worst model {}.'.format(
                      ratio(summ['geomean_gain']),
                      f"{summ['geomean_gain_of_ceiling']:.0%}"
                      if summ['geomean_gain_of_ceiling'] else '-',
                      f"{summ['worst_gain_of_ceiling']:.0%}"
                      if summ['worst_gain_of_ceiling'] else '-')]
    lines += peers_markdown(summ)
    if summ['geomean_openvino_speedup']:
        lines += ['', '### OpenVINO (same exports, same process)', '',
                  '| Model | FP32 ms | bf16 ms | INT8 ms | INT8 vs Paddle FP32 | INT8 vs OpenVINO '
                  'bf16 | INT8 ops |', '|---|---|---|---|---|---|---|']
        for r in summ['rows']:
            lines.append('| {} | {} | {} | {} | {} | {} | {} |'.format(
                r['model'], ms(r.get('openvino_fp32_s')), ms(r.get('openvino_bf16_s')),
                ms(r.get('openvino_int8_s')), ratio(r.get('openvino_speedup')),
                ratio(r.get('openvino_speedup_vs_bf16')), r.get('openvino_int8_ops', '-')))
        lines += ['', 'Geometric mean: OpenVINO INT8 {} over Paddle FP32, {} over OpenVINO '
                  'bf16.'.format(ratio(summ['geomean_openvino_speedup']),
                                 ratio(summ['geomean_openvino_speedup_vs_bf16']))]
    if summ.get('geomean_onnxruntime_speedup'):
        lines += ['', '### onnxruntime (model.onnx of the same exports, same process)', '',
                  '| Model | FP32 ms | INT8 ms | INT8 vs onnxruntime FP32 | INT8 convs |',
                  '|---|---|---|---|---|']
        for r in summ['rows']:
            lines.append('| {} | {} | {} | {} | {}/{} |'.format(
                r['model'], ms(r.get('onnxruntime_fp32_s')), ms(r.get('onnxruntime_int8_s')),
                ratio(r.get('onnxruntime_speedup')), r.get('onnxruntime_int8_conv_ops', '-'),
                r.get('onnxruntime_conv_ops', '-')))
        lines += ['', 'Geometric mean: onnxruntime INT8 {} over onnxruntime FP32.'.format(
            ratio(summ['geomean_onnxruntime_speedup']))]
    return '\n'.join(lines)


def peers_markdown(summ: Dict[str, Any]) -> List[str]:
    """The table of ours against the engines' own quantizers (segslim.bench.peers): per model and
    peer, the peer's ms and ours as a multiple of its speed on its engine."""
    names = [n for n in PEERS if any((r.get('peers') or {}).get(f'{n}_s') for r in summ['rows'])]
    if not names:
        return []

    def cell(r: Dict[str, Any], name: str) -> str:
        secs = (r.get('peers') or {}).get(f'{name}_s')
        vs = (r.get('ours_vs_peers') or {}).get(name)
        if not secs:
            return '-'
        return f'{secs * 1000:.1f} ms, ours {vs:.2f}x' if vs else f'{secs * 1000:.1f} ms'
    table = markdown_table(['Model'] + [f'{PEER_LABELS[n]} ({backend_label(PEERS[n].engine)})'
                                        for n in names],
                           ([r['model']] + [cell(r, n) for n in names] for r in summ['rows']))
    geo, worst = summ.get('geomean_ours_vs_peers') or {}, summ.get('worst_ours_vs_peers') or {}
    return ['', '### Against the engines\' own quantizers (same FP32 export, same calibration '
            'images, same run)', '',
            'Each peer as its documentation shows it (segslim.bench.peers); "ours Nx" is the '
            'peer\'s time over our fastest INT8 row on the same engine (above 1: ours is '
            'faster).', '',
            table, '', 'Geometric mean of ours over each peer: ' + ', '.join(
                '{} {} (worst model {})'.format(
                    PEER_LABELS[n], f'{geo[n]:.2f}x' if geo.get(n) else '-',
                    f'{worst[n]:.2f}x' if worst.get(n) else '-') for n in names) + '.']


def format_markdown(results: List[ZooResult]) -> str:
    """docs/benchmark.md: summary_markdown, where the INT8 time goes, then each model's
    report (fallbacks and FP32 ops named)."""
    lines = [summary_markdown(summary(results))]
    for res in results:
        for failure in res.engine_failures:
            lines.append(f'{res.model}: an engine could not run it: {failure}.')
    profiled = [res for res in results if res.int8_profile]
    if profiled:
        slowest = max(profiled, key=lambda res: res.int8_profile['wall_ms']
                      if res.int8_profile else 0.0)
        lines += ['', '## Where the INT8 time goes', '',
                  'oneDNN\'s own per-primitive times (verbose mode, in a separate run), and '
                  'the rest of the wall time: Paddle\'s native CPU kernels (bilinear resize, '
                  'arg_max, ...) and framework overhead. The slowest INT8 model in full:', '',
                  format_profile('{} INT8 {}x{}'.format(  # noqa: UP032
                      slowest.model, slowest.report.input_shape[3],
                      slowest.report.input_shape[2]), slowest.int8_profile or {}), '',
                  '| Model (INT8) | int8 convolutions | reorders | native kernels | other '
                  'oneDNN |', '|---|---|---|---|---|']
        for res in profiled:
            prof = res.int8_profile or {}
            conv = prof['by_kind'].get('convolution int8', 0.0)
            reorder = prof['by_kind'].get('reorder', 0.0)
            other = sum(prof['by_kind'].values()) - conv - reorder
            lines.append('| {} | {:.0%} | {:.0%} | {:.0%} | {:.0%} |'.format(
                res.model, *(v / prof['total_ms'] for v in
                                (conv, reorder, prof['native_ms'], other))))
    for res in results:
        lines += ['', '## ' + res.model, '', format_report(res.report, name=res.model)]
    return '\n'.join(lines) + '\n'


def write_report(reports: List[ZooResult], out: str) -> None:
    """Prints the markdown and writes it to `out`, with the summary beside it as JSON."""
    text = format_markdown(reports)
    print(text, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_text(out, text)
        write_json(os.path.splitext(out)[0] + '.json', summary(reports))
