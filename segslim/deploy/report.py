"""The report a person looks at: the benchmark table (markdown), report.md with a latency
chart, an mIoU chart on a zero-based axis, and a gallery of the val images where INT8
differs most from FP32 (input, ground truth, both masks and a map of the changed pixels)."""
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from prettytable import PrettyTable, TableStyle

from segslim.data.datasets import SegDataset, read_image, read_label
from segslim.deploy.bench_report import PEER_LABELS, BenchReport
from segslim.deploy.engines import backend_label
from segslim.deploy.results import BenchRow, Precision
from segslim.fileio import atomic_write, write_bytes, write_json, write_text
from segslim.train.metrics import ConfusionMatrix

# Difference-map colours (RGB): changed pixels, split by what they do to the ground truth.
CHANGED = (255, 200, 0)     # INT8 != FP32, neither matches the ground truth (or it is ignored)
FIXED = (40, 180, 60)       # INT8 matches the ground truth where FP32 did not
BROKEN = (220, 40, 40)      # FP32 matched the ground truth, INT8 does not
PANEL_MIN_SIDE = 256        # small images are enlarged (nearest) up to this width
HEADER = 24                 # pixels above each panel for its title


def engine_name(row: BenchRow) -> str:
    return backend_label(row.backend)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (prettytable's MARKDOWN style)."""
    table = PrettyTable(list(header))
    table.set_style(TableStyle.MARKDOWN)
    table.align = 'l'
    for row in rows:
        table.add_row([str(v) for v in row])
    return table.get_string()


def format_report(report: BenchReport, name: Optional[str] = None) -> str:
    """The markdown report: header line, the main table (rows named by `name` when given,
    else by model folder), per-class IoU, notes on fallbacks and FP32 ops."""
    lines = ['Device: {} | CPU: {} | ISA: {} | threads: {} | input {} | median of {} runs, '
             'models interleaved'.format(report.device, report.cpu, report.isa,
                                         report.threads, 'x'.join(map(str, report.input_shape)),
                                         report.repeats)]
    if report.versions:
        lines.append('Stack: ' + ', '.join(f'{k} {v}' for k, v in report.versions.items()))
    if report.device == 'cpu' and not report.vnni:
        lines.append('WARNING: this CPU has no VNNI/AMX: INT8 gains less here than on VNNI '
                     'CPUs (its INT8 kernels take 7-bit weights, and some conv shapes have no '
                     'fast INT8 kernel); compare the rows before shipping INT8.')

    def f4(v: Optional[float]) -> str:
        return '-' if v is None else f'{v:.4f}'
    lines += ['', markdown_table(
        ('Model', 'Engine', 'Type', 'mIoU', 's/img', 'p90 s', 'speedup', 'vs best bf16',
         'vs its FP32 (of ceiling)', 'params MB', 'agreement', 'INT8 ops'),
        ((name or r.model_dir, engine_name(r), r.type_label, f4(r.miou), f'{r.s_per_img:.4f}',
          f'{r.p90_s:.4f}', f'{r.speedup:.2f}x',
          f'{r.speedup_vs_bf16:.2f}x' if r.speedup_vs_bf16 else '-', own_fp32_cell(r),
          f'{r.params_mb:.1f}',
          f'{r.agreement:.4%}' if r.agreement is not None else '-', r.ops.cell())
         for r in report.rows))]
    lines += ceiling_lines(report)
    lines += peer_lines(report)
    if any(r.accuracy for r in report.rows):
        lines += ['', markdown_table(
            ('Model', 'Engine', 'Type', 'per-class IoU'),
            ((name or r.model_dir, engine_name(r), r.type_label,
              ', '.join(f'{v:.4f}' for v in r.accuracy.class_iou) if r.accuracy else '-')
             for r in report.rows))]
    for r in report.rows:
        if r.fallback:
            lines.append(f'Note: {name or r.model_dir} ({engine_name(r)}, {r.type_label}): '
                         f'{r.fallback}')
        if r.int8 and r.ops.fp32_ops:
            lines.append('Note: {} on {} runs {} quantizable ops in FP32: {}'.format(
                name or r.model_dir, engine_name(r), len(r.ops.fp32_ops),
                ', '.join(r.ops.fp32_ops[:6])))
    lines += passes_notes(report.rows)
    return '\n'.join(lines)


def own_fp32_cell(row: BenchRow) -> str:
    """'1.69x (84 %)': an INT8 row over its engine's FP32, and that as a share of the
    engine's INT8 ceiling on this CPU."""
    if row.speedup_vs_engine_fp32 is None:
        return '-'
    share = f' ({row.of_ceiling:.0%})' if row.of_ceiling is not None else ''
    return f'{row.speedup_vs_engine_fp32:.2f}x{share}'


def ceiling_lines(report: BenchReport) -> List[str]:
    """What the CPU allows (the compute-bound probe per engine) and INT8 as a user sees it:
    the best INT8 row against the best unquantized row, as a share of the same ratio on the
    probe."""
    lines = []
    if report.ceiling:
        lines.append('CPU ceiling (segslim.bench.ceiling: compute-bound 3x3 convs, 256 channels, '
                     'same threads, timed in the same turns as the rows): ' + '; '.join(
                         '{} INT8 {} of FP32{} ({})'.format(
                             backend_label(c.backend),
                             f'{c.int8_x:.2f}x' if c.int8_x else 'not run',
                             f', bf16 {c.bf16_x:.2f}x' if c.bf16_x else '', c.ran)
                         for c in report.ceiling.values()) +
                     (f'; best INT8 over best unquantized {report.ceiling_gain:.2f}x.'
                      if report.ceiling_gain else '.'))
    gain = report.gain()
    if gain is not None:
        lines.append('Gain: best INT8 ({}, {} on {}, {:.1f} ms) over best unquantized ({} on '
                     '{}, {:.1f} ms): {:.2f}x{}.'.format(
                         short_name(gain.best_int8.model_dir), gain.best_int8.type_label,
                         engine_name(gain.best_int8), 1000 * gain.best_int8.s_per_img,
                         gain.best_unquantized.type_label, engine_name(gain.best_unquantized),
                         1000 * gain.best_unquantized.s_per_img, gain.gain,
                         f' = {gain.of_ceiling:.0%} of this CPU\'s {report.ceiling_gain:.2f}x'
                         if gain.of_ceiling is not None and report.ceiling_gain else ''))
    return lines


def peer_lines(report: BenchReport) -> List[str]:
    """Each engine's own quantizer (segslim.bench.peers) against our fastest INT8 row on its
    engine: both times, ours as a multiple of its speed, both agreements with the first row."""
    parts = []
    for peer in report.peers():
        label = PEER_LABELS.get(peer.name, peer.name)
        agree = '' if peer.row.agreement is None else ', agreement {:.2%}{}'.format(
            peer.row.agreement, '' if peer.ours is None or peer.ours.agreement is None
            else f' vs ours {peer.ours.agreement:.2%}')
        head = f'{label} on {engine_name(peer.row)} {1000 * peer.row.s_per_img:.1f} ms'
        if peer.ours is None:
            parts.append(f'{head} (no INT8 row of ours there){agree}')
        else:
            spread = peer.vs_ours_range
            turns = ' (single turns {:.2f}-{:.2f})'.format(*spread) if spread else ''
            parts.append(f'{head}, ours {1000 * peer.ours.s_per_img:.1f} ms: ours '
                         f'{peer.vs_ours or 0.0:.2f}x as fast{turns}{agree}')
    if not parts:
        return []
    return ['Peers (the engines\' own quantizers on the same FP32 export and calibration '
            'images): ' + '; '.join(parts) + '.']


def passes_notes(rows: Sequence[BenchRow]) -> List[str]:
    """'Passes: <engine> <types>: +appended, -deleted' for each distinct change of the
    engine's pass list, naming the rows (by engine and type) that ran with it."""
    groups: Dict[str, List[str]] = {}
    for r in rows:
        change = r.passes.describe() if r.passes else ''
        if change:
            label = f'{engine_name(r)} {r.type_label}'
            if label not in groups.setdefault(change, []):
                groups[change].append(label)
    return [f"Passes: {', '.join(labels)}: {change}" for change, labels in groups.items()]


def short_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir))


def row_labels(rows: Sequence[BenchRow]) -> List[str]:
    """'<model short name>\\n<precision>[ <engine>]': the engine is named when the report
    has more than one."""
    several = len({r.backend for r in rows}) > 1
    return ['{}\n{}{}'.format(short_name(r.model_dir), r.type_label,
                              ' ' + engine_name(r) if several else '') for r in rows]


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format='png'))
    pyplot().close(fig)


def latency_figure(report: BenchReport) -> Any:
    """One horizontal bar per row (first row on top), each annotated with ms and speedup;
    the figure grows with the row count so two-line labels never overlap."""
    plt = pyplot()
    rows = report.rows
    ms = [r.s_per_img * 1000 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.62 * len(rows)))
    y = np.arange(len(rows))[::-1]
    colors = ['#c0504d' if r.int8 else
              '#4f81bd' if r.precision is Precision.FP32 else '#9bbb59' for r in rows]
    ax.barh(y, ms, color=colors, height=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels(row_labels(rows), fontsize=8)
    for yi, v, r in zip(y, ms, rows):
        ax.text(v, yi, f' {v:.1f} ms  {r.speedup:.2f}x', va='center', fontsize=8)
    ax.set_xlim(0, max(ms) * 1.35)
    ax.set_xlabel(f'ms per image (median of {report.repeats} runs), speedup over the first row')
    ax.set_title('Latency, input {}, {} ({}), {} threads'.format(
        'x'.join(map(str, report.input_shape)), report.cpu, report.isa,
        report.threads), fontsize=9)
    fig.tight_layout()
    return fig


def miou_figure(report: BenchReport) -> Any:
    """mIoU per row on a 0..1 axis, beside per-class IoU as an annotated heat map (every row
    has its accuracy)."""
    plt = pyplot()
    rows = report.rows
    accs = [r.accuracy for r in rows if r.accuracy is not None]
    classes = len(accs[0].class_iou)
    fig, (ax, heat) = plt.subplots(
        1, 2, figsize=(8 + 0.35 * max(classes - 4, 0), 1.2 + 0.62 * len(rows)),
        gridspec_kw={'width_ratios': [1, max(1.0, classes / 4)]})
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [a.miou for a in accs], color='#6a9f58', height=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels(row_labels(rows), fontsize=8)
    ax.set_xlim(0, 1.18)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    for yi, a in zip(y, accs):
        ax.text(a.miou, yi, f' {a.miou:.4f}', va='center', fontsize=8)
    ax.set_xlabel('mIoU on the deployed engine (axis from 0)')
    values = np.array([a.class_iou for a in accs], dtype=np.float64)
    heat.imshow(values, vmin=0, vmax=1, cmap='viridis', aspect='auto')
    heat.set_yticks(np.arange(len(rows)))
    heat.set_yticklabels([])
    heat.set_xticks(np.arange(classes))
    heat.set_xlabel('per-class IoU (class id)')
    if classes <= 20:
        for i in range(len(rows)):
            for j in range(classes):
                heat.text(j, i, f'{values[i, j]:.3f}', ha='center', va='center',
                          fontsize=7, color='white' if values[i, j] < 0.6 else 'black')
    fig.tight_layout()
    return fig


def diff_map(fp32: np.ndarray, int8: np.ndarray, label: np.ndarray, ignore_index: int,
             background: np.ndarray) -> Tuple[np.ndarray, Dict[str, int]]:
    """RGB map: the dimmed grey `background` where INT8 == FP32, else CHANGED / FIXED /
    BROKEN; returns it with the pixel counts of each kind."""
    grey = cv2.cvtColor(background.astype(np.uint8), cv2.COLOR_RGB2GRAY) // 2 + 64
    out = np.repeat(grey[..., np.newaxis], 3, axis=2)
    changed = fp32 != int8
    valid = label != ignore_index
    fixed = changed & valid & (int8 == label)
    broken = changed & valid & (fp32 == label)
    other = changed & ~fixed & ~broken
    for mask, color in ((other, CHANGED), (fixed, FIXED), (broken, BROKEN)):
        out[mask] = color
    return out, {'changed': int(changed.sum()), 'fixed': int(fixed.sum()),
                 'broken': int(broken.sum())}


def image_iou(pred: np.ndarray, label: np.ndarray, num_classes: int,
              ignore_index: int) -> float:
    """Mean IoU over the classes present in the prediction or the label of one image."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, label)
    return cm.present_miou()


def color_mask(labels: np.ndarray) -> np.ndarray:
    """RGB image of a label map in paddleseg's colour map (the one infer.py's masks use)."""
    from segslim.deploy.infer import pseudo_color
    return np.asarray(pseudo_color(labels).convert('RGB'))


def _panel(img: np.ndarray, title: str, scale: int) -> np.ndarray:
    big = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale),
                     interpolation=cv2.INTER_NEAREST) if scale > 1 else img
    head = np.full((HEADER, big.shape[1], 3), 255, np.uint8)
    cv2.putText(head, title, (4, HEADER - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([head, big.astype(np.uint8)], axis=0)


def panel_scale(width: int) -> int:
    return max(1, math.ceil(PANEL_MIN_SIDE / max(width, 1)))


def gallery_image(image_rgb: np.ndarray, label: np.ndarray, fp32: np.ndarray,
                  int8: np.ndarray, ignore_index: int) -> Tuple[np.ndarray, Dict[str, int]]:
    """Five panels side by side (input, ground truth, FP32, INT8, difference), each with a
    title band; a white 4-pixel gap between panels."""
    diff, counts = diff_map(fp32, int8, label, ignore_index, image_rgb)
    gt = label.copy()
    gt[gt == ignore_index] = 0
    scale = panel_scale(label.shape[1])
    panels = [_panel(image_rgb, 'input', scale), _panel(color_mask(gt), 'ground truth', scale),
              _panel(color_mask(fp32), 'FP32', scale), _panel(color_mask(int8), 'INT8', scale),
              _panel(diff, 'INT8 vs FP32', scale)]
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1), counts


class GalleryPick:
    """Keeps, image by image, the `count` val images whose two label maps (rows `rows` of a
    benchmark) agree least, lowest first (ties: dataset order); images that agree fully are
    left out. Holds at most `count` pairs of label maps, whatever the dataset size."""

    def __init__(self, count: int, rows: Tuple[int, int] = (0, 1)):
        self.count = count
        self.rows = rows
        self.kept: List[Tuple[float, int, np.ndarray, np.ndarray]] = []

    def offer(self, index: int, fp32: np.ndarray, int8: np.ndarray) -> None:
        share = float((fp32 == int8).mean())
        if share >= 1.0 or self.count <= 0:
            return
        if len(self.kept) == self.count and (share, index) >= self.kept[-1][:2]:
            return
        dtype = np.uint8 if max(fp32.max(), int8.max()) < 256 else np.int32
        self.kept.append((share, index, fp32.astype(dtype), int8.astype(dtype)))
        self.kept.sort(key=lambda k: k[:2])
        del self.kept[self.count:]

    def indices(self) -> List[int]:
        return [k[1] for k in self.kept]


def write_gallery(gallery_dir: str, dataset: SegDataset, pick: GalleryPick,
                  engine: str) -> List[Dict[str, Any]]:
    """gallery/NN_<image>.png for the picked images and gallery/index.md; returns one
    record per picture (file, image, agreement, IoU of both, changed/fixed/broken)."""
    os.makedirs(gallery_dir, exist_ok=True)
    records = []
    for rank, (share, i, fp32, int8) in enumerate(pick.kept, 1):
        img_path, label_path = dataset.file_list[i]
        label = read_label(str(label_path))
        image = read_image(img_path).astype(np.uint8)[..., ::-1]
        if image.shape[:2] != label.shape:
            image = cv2.resize(image, (label.shape[1], label.shape[0]))
        picture, counts = gallery_image(image, label, fp32, int8, dataset.ignore_index)
        ious = [image_iou(p, label, dataset.num_classes, dataset.ignore_index)
                for p in (fp32, int8)]
        stem = os.path.splitext(os.path.basename(img_path))[0]
        name = '{:02d}_{}_agree{:.2f}_iou{:.3f}-{:.3f}.png'.format(rank, stem, 100 * share,
                                                                   *ious)
        ok, png = cv2.imencode('.png', np.ascontiguousarray(picture[..., ::-1]))
        write_bytes(os.path.join(gallery_dir, name), png.tobytes())
        records.append(dict(counts, file=name, image=img_path, agreement=share,
                            pixels=int(label.size), fp32_iou=ious[0], int8_iou=ious[1]))
    write_text(os.path.join(gallery_dir, 'index.md'), gallery_markdown(records, engine, '') +
               '\n')
    return records


def gallery_markdown(records: List[Dict[str, Any]], engine: str, prefix: str) -> str:
    """The gallery section: a legend, then each picture with its caption."""
    if not records:
        return f'INT8 ({engine}) and FP32 predict the same class on every pixel of every val ' \
               'image: no gallery.'
    lines = [f'Val images where the INT8 engine ({engine}) disagrees most with FP32, lowest '
             'agreement first. Panels: input, ground truth, FP32 mask, INT8 mask, difference '
             '(grey: same class; yellow: changed, neither matches the ground truth; green: '
             'INT8 fixes the ground truth; red: INT8 breaks it).', '']
    for r in records:
        lines += ['**{}**: agreement {:.2%} ({} of {} pixels changed: {} fixed, {} broken), '
                  'image mIoU FP32 {:.4f} -> INT8 {:.4f}'.format(
                      os.path.basename(r['image']), r['agreement'], r['changed'], r['pixels'],
                      r['fixed'], r['broken'], r['fp32_iou'], r['int8_iou']), '',
                  '![{}]({}{})'.format(r['file'], prefix, r['file']), '']
    return '\n'.join(lines).rstrip()


def write_report_dir(report: BenchReport, report_dir: str,
                     dataset: Optional[SegDataset] = None,
                     pick: Optional[GalleryPick] = None) -> str:
    """report.md, latency.png, miou.png (with a dataset) and gallery/ (first INT8 row against
    the first row), and report.json; returns the path of report.md."""
    os.makedirs(report_dir, exist_ok=True)
    rows = report.rows
    save_figure(latency_figure(report), os.path.join(report_dir, 'latency.png'))
    lines = ['# FP32 vs INT8 report', '', format_report(report), '',
             '## Latency', '', '![latency](latency.png)']
    if report.has_accuracy:
        save_figure(miou_figure(report), os.path.join(report_dir, 'miou.png'))
        lines += ['', '## Accuracy', '', '![mIoU and per-class IoU](miou.png)']
    int8 = report.first_int8()
    if dataset is not None and pick is not None and int8 is not None and pick.count > 0:
        records = write_gallery(os.path.join(report_dir, 'gallery'), dataset, pick,
                                engine_name(rows[int8]))
        report.gallery = records
        lines += ['', '## Where INT8 differs from FP32', '',
                  'INT8 row: {} on {}; FP32 row: {} on {} ([index](gallery/index.md)).'.format(  # noqa: UP032
                      short_name(rows[int8].model_dir), engine_name(rows[int8]),
                      short_name(rows[0].model_dir), engine_name(rows[0])), '',
                  gallery_markdown(records, engine_name(rows[int8]), 'gallery/')]
    path = os.path.join(report_dir, 'report.md')
    write_text(path, '\n'.join(lines) + '\n')
    write_json(os.path.join(report_dir, 'report.json'), report.to_json())
    return path
