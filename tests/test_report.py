"""benchmark.py --report_dir: report.md, readable charts and the INT8-vs-FP32 gallery."""
import itertools
import json
import re

import numpy as np
from conftest import INSTANT, data_opts, make_report, make_row, run_cli
from PIL import Image

from segslim.deploy import report as rep


def fake_report(n_rows, classes=2):
    return make_report([make_row(
        f'/runs/a_rather_long_model_folder_name_{i}_infer', ('fp32', 'bf16', 'int8')[i % 3],
        0.02 + 0.003 * i, backend=('paddle', 'openvino')[i % 2], speedup=1.0 + 0.1 * i,
        miou=0.9 - 0.001 * i,
        class_iou=[0.99, 0.8 - 0.001 * i][:classes] + [0.5] * (classes - 2))
        for i in range(n_rows)])


def label_boxes(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]


def test_twelve_row_charts_have_no_overlapping_labels():
    report = fake_report(12)
    for make in (rep.latency_figure, rep.miou_figure):
        fig = make(report)
        boxes = label_boxes(fig, fig.axes[0])
        assert len(boxes) == 12
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (make.__name__, a, b)
        rep.pyplot().close(fig)
    assert rep.row_labels(report.rows)[0].endswith('FP32 Paddle Inference')


def test_miou_axis_starts_at_zero():
    fig = rep.miou_figure(fake_report(3))
    assert fig.axes[0].get_xlim()[0] == 0
    rep.pyplot().close(fig)


def test_diff_map_counts_and_colours():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (40, 50))
    label[:3] = 255
    fp32 = label.copy()
    fp32[5:10] = (fp32[5:10] + 1) % 3          # FP32 wrong on rows 5-9
    int8 = fp32.copy()
    int8[5:8] = label[5:8]                      # INT8 fixes rows 5-7
    int8[20:22] = (label[20:22] + 1) % 3        # and breaks rows 20-21
    int8[0:2] = (fp32[0:2] + 1) % 3             # changes ignored pixels
    img = rng.integers(0, 255, (40, 50, 3)).astype(np.uint8)
    out, counts = rep.diff_map(fp32, int8, label, 255, img)
    assert counts == {'changed': int((fp32 != int8).sum()), 'fixed': 150, 'broken': 100}
    colored = (out[..., 0] != out[..., 1]) | (out[..., 1] != out[..., 2])
    assert colored.sum() == counts['changed']
    assert (out[20:22] == rep.BROKEN).all() and (out[5:8] == rep.FIXED).all()
    assert (out[0:2] == rep.CHANGED).all()


def test_gallery_picks_the_lowest_agreement_images():
    base = [np.zeros((10, 10), np.int64) for _ in range(5)]
    other = [b.copy() for b in base]
    for i, n in enumerate([3, 0, 7, 1, 5]):   # differing pixels per image
        other[i].flat[:n] = 1
    def pick(count):
        gallery = rep.GalleryPick(count)
        for i, (a, b) in enumerate(zip(base, other)):
            gallery.offer(i, a, b)
        return gallery.indices()
    assert pick(3) == [2, 4, 0]
    assert pick(10) == [2, 4, 0, 3]  # image 1 agrees fully
    kept = rep.GalleryPick(2)
    for i in range(200):  # holds two pairs of label maps, whatever the dataset size
        kept.offer(i, base[0], other[i % 5])
    assert len(kept.kept) == 2 and kept.indices() == [2, 7]


def test_report_dir_writes_report_charts_and_gallery(exported, tmp_path):
    out = tmp_path / 'report'
    proc = run_cli('deploy/python/benchmark.py', '--config', INSTANT, '--model_dirs',
                   exported['fp32'], exported['int8'], '--input_shape', 1, 3, 64, 64,
                   '--warmup', 1, '--repeats', 3, '--no_bf16', '--no_ceiling', '--report_dir', out,
                   '--gallery', 3, '--int8_layers', 'all', '--opts', *data_opts(exported['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out / 'report.md') in proc.stderr + proc.stdout
    text = (out / 'report.md').read_text()
    for link in re.findall(r'\]\(([^)]+)\)', text):
        assert (out / link).is_file(), link
    for chart in ('latency.png', 'miou.png'):
        w, h = Image.open(out / chart).size
        assert w >= 600 and h >= 200
    records = json.load(open(out / 'report.json'))['gallery']
    assert 1 <= len(records) <= 3
    shares = [r['agreement'] for r in records]
    assert shares == sorted(shares) and shares[0] < 1
    index = (out / 'gallery' / 'index.md').read_text()
    for r in records:
        assert r['file'] in index and '{:.2f}'.format(100 * r['agreement']) in r['file']
        picture = np.asarray(Image.open(out / 'gallery' / r['file']).convert('RGB'))
        side = 64 * rep.panel_scale(64)
        assert picture.shape == (rep.HEADER + side, 5 * side + 4 * 4, 3)
        diff = picture[rep.HEADER:, 4 * (side + 4):][::rep.panel_scale(64),
                                                     ::rep.panel_scale(64)]
        colored = ((diff[..., 0] != diff[..., 1]) | (diff[..., 1] != diff[..., 2])).sum()
        assert colored == r['changed'] == round((1 - r['agreement']) * r['pixels'])
