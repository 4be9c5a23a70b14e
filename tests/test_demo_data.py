import filecmp
import os

import numpy as np
from PIL import Image

from segslim.data.demo import make_demo_dataset


def test_same_seed_same_bytes_and_layout(tmp_path):
    a = make_demo_dataset(str(tmp_path / 'a'), 3, 2, 1, 64, seed=5)
    b = make_demo_dataset(str(tmp_path / 'b'), 3, 2, 1, 64, seed=5)
    c = make_demo_dataset(str(tmp_path / 'c'), 3, 2, 1, 64, seed=6)
    for split, n in (('train', 3), ('val', 2), ('test', 1)):
        lines = open(os.path.join(a, split + '_list.txt')).read().splitlines()
        assert len(lines) == n
        for line in lines:
            img, lab = line.split()
            assert filecmp.cmp(os.path.join(a, img), os.path.join(b, img), shallow=False)
            assert filecmp.cmp(os.path.join(a, lab), os.path.join(b, lab), shallow=False)
    first = open(os.path.join(a, 'train_list.txt')).readline().split()[0]
    assert not filecmp.cmp(os.path.join(a, first), os.path.join(c, first), shallow=False)


def test_labels_are_binary_discs_that_vary(tmp_path):
    root = make_demo_dataset(str(tmp_path / 'd'), 6, 1, 0, 96, seed=0)
    areas, centres = [], []
    for line in open(os.path.join(root, 'train_list.txt')):
        img, lab = line.split()
        mask = np.asarray(Image.open(os.path.join(root, lab)))
        image = np.asarray(Image.open(os.path.join(root, img)))
        assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
        assert set(np.unique(mask)) == {0, 1}
        ys, xs = np.nonzero(mask)
        areas.append(len(ys))
        centres.append((ys.mean(), xs.mean()))
        # the disc is brighter than the rest of the fundus
        assert image[mask == 1].mean() > image[(mask == 0) & (image.sum(-1) > 0)].mean()
    assert np.std(areas) > 0 and len({(round(y), round(x)) for y, x in centres}) == 6


def test_offline_probe_sends_nothing_and_answers_fast(monkeypatch):
    import socket
    import time

    from segslim.data.datasets import can_reach

    attempts = []  # recorded, not raised: the probe runs in a thread that swallows errors

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError('refused')
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setenv('SEGSLIM_OFFLINE', '1')
    tic = time.time()
    assert can_reach(('example.invalid', 443)) is False
    assert time.time() - tic < 1
    assert attempts == []
    monkeypatch.delenv('SEGSLIM_OFFLINE')  # the same probe online does try to connect
    assert can_reach(('example.invalid', 443), timeout=0.5) is False
    assert attempts
