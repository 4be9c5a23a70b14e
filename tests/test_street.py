"""The synthetic street scenes: deterministic, in the layout the zoo's Cityscapes configs
read, every class of the 19 in a small val set."""
import os

import numpy as np
from conftest import tree_digest
from PIL import Image

from segslim.builder import build_dataset
from segslim.config import load_config
from segslim.data.street import CLASSES, IGNORE, THIN_CLASSES, make_street_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_seed_same_bytes_another_seed_other_images(tmp_path):
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        make_street_dataset(str(tmp_path / name), 2, 2, 96, 48, seed)
    a, b, c = (tree_digest(tmp_path / n) for n in 'abc')
    assert a == b and len(a) == 2 * 4 + 3  # images, labels, two lists, README.txt
    images = [k for k in a if k.endswith('_leftImg8bit.png')]
    assert all(a[k] != c[k] for k in images)
    assert 'synthetic' in (tmp_path / 'a' / 'README.txt').read_text()


def test_the_zoo_cityscapes_configs_read_it_and_every_class_is_in_val(tmp_path):
    root = str(tmp_path / 'street')
    make_street_dataset(root, 3, 14, 128, 64, 0)
    opts = [f'{k}.dataset_root={root}' for k in ('train_dataset', 'val_dataset')]
    for config in ('configs/segformer/segformer_b0_cityscapes_1024x1024_160k.yml',
                   'configs/street/bisenetv2_street_256x128.yml'):
        cfg = load_config(os.path.join(ROOT, config), opts=opts)
        assert len(build_dataset(cfg, 'train_dataset')) == 3
        val = build_dataset(cfg, 'val_dataset')
        assert len(val) == 14 and val.num_classes == len(CLASSES) == 19
    seen = np.zeros(256, bool)
    for _, label in val.file_list:
        seen[np.unique(np.asarray(Image.open(label)))] = True
    assert seen[:19].all() and not seen[19:IGNORE].any()
    assert set(THIN_CLASSES) <= set(CLASSES)
    lines = open(os.path.join(root, 'val.txt')).read().split('\n')
    assert lines[0].split() == [os.path.relpath(p, root) for p in val.file_list[0]]
