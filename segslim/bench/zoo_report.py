"""The zoo benchmark's results: one ZooResult per model, the summary JSON
(docs/benchmark.json) and the markdown report (docs/benchmark.md)."""
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from segslim.bench.peers import PEERS
from segslim.deploy.bench_report import PEER_LABELS, BenchReport, Gain
from segslim.deploy.benchmark import MIN_SAMPLE_S, SETTLE_S
from segslim.deploy.engines import backend_label
from segslim.deploy.profile import TIME_GROUPS, GainProfile, format_profile, time_shares
from segslim.deploy.report import format_report, markdown_table
from segslim.deploy.results import row_ratio
from segslim.fileio import write_json, write_text


@dataclass
class ZooResult:
    """One zoo model's benchmark: its report, the engines that could not run it, where the
    Paddle INT8 engine's time goes, and where its fastest INT8 and unquantized rows' time
    goes (deploy.profile)."""
    model: str
    config: str
    report: BenchReport
    engine_failures: List[str] = field(default_factory=list)
    int8_profile: Optional[Dict[str, Any]] = None
    gain_profile: Optional[GainProfile] = None


def summary(results: List[ZooResult]) -> Dict[str, Any]:
    """docs/benchmark.json: one row per model (seconds per image of each engine, speedups,
    INT8 ops over quantizable ops) and the geometric-mean speedups."""
    rows: List[Dict[str, Any]] = []
    for res in results:
        rep = res.report
        by = {(r.backend, r.precision.value): r for r in rep.ours
              if not r.precision_note and not r.rest}
        rest = {r.backend: r for r in rep.ours if r.rest == 'bf16' and r.int8}
        fp32 = by.get(('paddle', 'fp32'))  # none when only other engines were asked for
        bf16, int8 = (by.get(('paddle', p)) for p in ('bf16', 'int8'))
        ov = {p: by.get(('openvino', p)) for p in ('fp32', 'bf16', 'int8')}
        row: Dict[str, Any] = {}
        if any(ov.values()):
            row.update({f'openvino_{p}_s': r.s_per_img if r else None for p, r in ov.items()})
            ov_int8, ov_bf16 = ov['int8'], ov['bf16']
            row['openvino_speedup'] = ov_int8.speedup if ov_int8 else None
            row['openvino_speedup_vs_bf16'] = row_ratio(ov_bf16, ov_int8) \
                if ov_int8 and ov_bf16 else None
            row['openvino_int8_ops'] = ov_int8.ops.int8_ops if ov_int8 else None
            # the same INT8 model with its unquantized ops in bf16 (bf16 CPUs)
            row['openvino_int8_bf16_rest_s'] = rest['openvino'].s_per_img \
                if 'openvino' in rest else None
        ort_fp32, ort_int8 = by.get(('onnxruntime', 'fp32')), by.get(('onnxruntime', 'int8'))
        if ort_fp32 and ort_int8:
            row.update(
                onnxruntime_fp32_s=ort_fp32.s_per_img, onnxruntime_int8_s=ort_int8.s_per_img,
                onnxruntime_speedup=row_ratio(ort_fp32, ort_int8),
                onnxruntime_int8_conv_ops=ort_int8.ops.int8_conv_ops,
                onnxruntime_conv_ops=ort_int8.ops.conv_ops)
        ops = int8.ops if int8 else None
        row.update({
            'model': res.model, 'config': res.config, 'input_shape': rep.input_shape,
            'fp32_s': fp32.s_per_img if fp32 else None, 'bf16_s': bf16.s_per_img if bf16 else None,
            'int8_s': int8.s_per_img if int8 else None,
            'speedup': int8.speedup if int8 else None,
            # against the same engine's bf16 (the rows' own column is against the best bf16)
            'speedup_vs_bf16': row_ratio(bf16, int8) if int8 and bf16 else None,
            'int8_ops': ops.int8_ops if ops else None,
            'quantizable_ops': ops.quantizable_ops if ops else None,
            'int8_conv_ops': ops.int8_conv_ops if ops else None,
            'conv_ops': ops.conv_ops if ops else None,
            'int8_matmul_ops': ops.int8_matmul_ops if ops else None,
            'matmul_ops': ops.matmul_ops if ops else None,
            'int8_profile_ms': res.int8_profile})
        gain = rep.gain()
        row.update(gain.to_json() if gain else dict.fromkeys(Gain.KEYS))
        row['ceiling'] = rep.ceiling_json() if rep.ceiling else None  # timed in its turns
        prof = res.gain_profile
        row.update(best_int8_profile_ms=prof.int8 if prof else None,
                   best_unquantized_profile_ms=prof.unquantized if prof else None,
                   attainable_gain=prof.attainable if prof else None,
                   gain_of_attainable=gain.gain / prof.attainable
                   if gain and prof and prof.attainable else None)
        row.update(rep.peers_json())
        row['agreement'] = {
            f'{r.backend}_{r.precision.value}' + (f'_{r.rest}_rest' if r.rest else ''):
            r.agreement for r in rep.ours if r.agreement is not None}
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
            'repeats': first.repeats, 'warmup': first.warmup,
            'ceiling': median_ceiling([res.report for res in results]),
            'geomean_gain': geomean('gain'), 'geomean_gain_of_ceiling':
            geomean('gain_of_ceiling'), 'worst_gain_of_ceiling': min(
                (r['gain_of_ceiling'] for r in rows if r.get('gain_of_ceiling')), default=None),
            'geomean_attainable_gain': geomean('attainable_gain'),
            'geomean_gain_of_attainable': geomean('gain_of_attainable'),
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


def median_ceiling(reports: List[BenchReport]) -> Dict[str, Any]:
    """The run's ceiling: each model's probe was timed in that model's own turns; per engine
    the median over the models of int8_x and bf16_x, the median of int8_vs_best_unquantized,
    and its lowest and highest ('int8_vs_best_unquantized_range')."""
    def median(values: List[Optional[float]]) -> Optional[float]:
        kept = [v for v in values if v]
        return float(np.median(kept)) if kept else None
    probes = [r.ceiling for r in reports if r.ceiling]
    out: Dict[str, Any] = {}
    for engine in dict.fromkeys(e for p in probes for e in p):
        ran = [p[engine] for p in probes if engine in p]
        out[engine] = {'int8_x': median([c.int8_x for c in ran]),
                       'bf16_x': median([c.bf16_x for c in ran])}
    gains = [g for g in (r.ceiling_gain for r in reports) if g]
    out['int8_vs_best_unquantized'] = median(list(gains))
    out['int8_vs_best_unquantized_range'] = [min(gains), max(gains)] if gains else None
    out['models'] = len(probes)
    return out


def summary_markdown(summ: Dict[str, Any]) -> str:
    """The head of docs/benchmark.md: what was measured how and the summary tables (from
    summary() alone)."""
    engines = ', '.join(['Paddle Inference'] + [
        name for name, key in (('OpenVINO', 'geomean_openvino_speedup'),
                               ('onnxruntime', 'geomean_onnxruntime_speedup')) if summ.get(key)])
    lines = [f'# Latency: FP32 vs bf16 vs INT8 on {engines}', '',
             'Written by `make bench` (`tools/bench_models.py`) on {}. CPU: {} ({}), {} threads, '
             'batch 1; median of {} turns after {} warm-up runs, all rows of a model in one '
             f'process: in each turn the engines one after another with a {SETTLE_S} s pause '
             'between them, each timed sample after an untimed run of the same model and the '
             f'mean of as many runs as fill {MIN_SAMPLE_S} s; every ratio (speed-ups, gains, '
             'ours against a peer) is the median of the per-turn ratios. Input '
             '1x3x512x1024 for the ResNet50_vd OS8 '
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
                  'Ceiling (segslim.bench.ceiling: compute-bound 3x3 convs, 256 channels, '
                  'timed in the same turns as each model\'s rows; median over {} models): '
                  .format(ceiling.get('models', '-')) + ', '.join(
                      f"{backend_label(b)} INT8 {ratio(c['int8_x'])}"
                      for b, c in ceiling.items() if isinstance(c, dict)) +
                  '; best INT8 over best unquantized {}{}.'.format(
                      ratio(ceiling['int8_vs_best_unquantized']),
                      ' (from {} to {} between models)'.format(
                          *map(ratio, ceiling['int8_vs_best_unquantized_range']))
                      if ceiling.get('int8_vs_best_unquantized_range') else ''), '',
                  'Each model\'s gain is a share of its own probe (the "ceiling" column).', '',
                  markdown_table(('Model', 'best INT8', 'best unquantized', 'gain',
                                  'ceiling', 'of ceiling'),
                                 ((r['model'], '{} {}'.format(
                                     backend_label(r['best_int8_engine'] or '-'),
                                     ms(r['best_int8_s'])),
                                   '{} {}'.format(backend_label(r['best_unquantized_engine'] or
                                                                '-'),
                                                  ms(r['best_unquantized_s'])),
                                   ratio(r['gain']),
                                   ratio((r.get('ceiling') or {}).get('int8_vs_best_unquantized')),
                                   f"{r['gain_of_ceiling']:.0%}"
                                   if r['gain_of_ceiling'] else '-')
                                  for r in summ['rows'])), '',
                  'Geometric mean gain {} = {} of the ceiling; worst model {}.'.format(
                      ratio(summ['geomean_gain']),
                      f"{summ['geomean_gain_of_ceiling']:.0%}"
                      if summ['geomean_gain_of_ceiling'] else '-',
                      f"{summ['worst_gain_of_ceiling']:.0%}"
                      if summ['worst_gain_of_ceiling'] else '-')]
    lines += attainable_markdown(summ)
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
        spread = (r.get('ours_vs_peers_range') or {}).get(name)
        if not secs:
            return '-'
        if not vs:
            return f'{secs * 1000:.1f} ms'
        return f'{secs * 1000:.1f} ms, ours {vs:.2f}x' + (
            ' ({:.2f}-{:.2f})'.format(*spread) if spread else '')
    table = markdown_table(['Model'] + [f'{PEER_LABELS[n]} ({backend_label(PEERS[n].engine)})'
                                        for n in names],
                           ([r['model']] + [cell(r, n) for n in names] for r in summ['rows']))
    geo, worst = summ.get('geomean_ours_vs_peers') or {}, summ.get('worst_ours_vs_peers') or {}
    return ['', '### Against the engines\' own quantizers (same FP32 export, same calibration '
            'images, same run)', '',
            'Each peer as its documentation shows it (segslim.bench.peers); "ours Nx" is the '
            'peer\'s time over our fastest INT8 row on the same engine (above 1: ours is '
            'faster), the median of the turns\' ratios, with the lowest and highest single '
            'turn in brackets.', '',
            table, '', 'Geometric mean of ours over each peer: ' + ', '.join(
                '{} {} (worst model {})'.format(
                    PEER_LABELS[n], f'{geo[n]:.2f}x' if geo.get(n) else '-',
                    f'{worst[n]:.2f}x' if worst.get(n) else '-') for n in names) + '.']


def attainable_markdown(summ: Dict[str, Any]) -> List[str]:
    """Where each model's fastest INT8 row spends its time and the gain its fastest
    unquantized row allows (deploy.profile.attainable_gain)."""
    rows = [r for r in summ['rows'] if r.get('best_int8_profile_ms')]
    if not rows:
        return []

    def share(v):
        return f'{v:.0%}'
    table = []
    for r in rows:
        shares = time_shares(r['best_int8_profile_ms'])
        table.append((r['model'], backend_label(r['best_int8_engine']),
                      *(share(shares[g]) for g in TIME_GROUPS),
                      f"{r['attainable_gain']:.2f}x" if r.get('attainable_gain') else '-',
                      f"{r['gain_of_attainable']:.0%}" if r.get('gain_of_attainable') else '-'))
    geo = summ.get('geomean_gain_of_attainable')
    return ['', '### What each model allows', '',
            'Where the fastest INT8 row spends its time (its engine\'s own per-layer times, in '
            'a separate run), and "attainable": the gain INT8 would have if every conv and '
            'matmul of the fastest unquantized row ran as much faster as the probe\'s convs '
            'and nothing else changed (time outside them stays).', '',
            markdown_table(('Model', 'INT8 row on', *TIME_GROUPS, 'attainable',
                            'gain of attainable'),
                           table), '',
            'Geometric mean: gain {} of attainable.'.format(f'{geo:.0%}' if geo else '-')]


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
