"""A synthetic many-class street scene in the Cityscapes layout: the 19 train classes in
perspective, with thin structures (poles, fences, bicycles), small objects (signs, lights,
people at a distance) and large regions (road, building, vegetation, sky), drawn with textures,
noise, lighting and blur. Deterministic for a seed (same seed, same bytes). The images are
made, not photographed: every report on this data says so."""
import os
from typing import Tuple

import cv2
import numpy as np

from segslim.data.street_draw import (
    BUS,
    LIGHT,
    MOTORCYCLE,
    RIDER,
    ROAD,
    SIDEWALK,
    TRAIN,
    TRUCK,
    WALL,
    Scene,
    draw_objects,
    draw_roadside,
    draw_sky_and_ground,
)
from segslim.fileio import write_bytes, write_text

CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
           'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
           'bus', 'train', 'motorcycle', 'bicycle')
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
           (0, 80, 100), (0, 0, 230), (119, 11, 32))
# the thin structures INT8 errors show first on, reported on their own
THIN_CLASSES = ('fence', 'pole', 'traffic light', 'traffic sign', 'bicycle')
IGNORE = 255
TRAIN_CITIES = ('alder', 'birch', 'cedar')
VAL_CITIES = ('dune',)
SYNTHETIC_NOTE = ('synthetic street scenes drawn by tools/make_street_dataset.py (seed {seed}), '
                  'not photographs: figures on them compare methods, not real-world accuracy')

# classes every val image set must contain: image i of a split draws RARE[i % len(RARE)]
RARE = (TRAIN, BUS, TRUCK, MOTORCYCLE, RIDER, WALL, LIGHT)
# texture strength per class (multiplicative noise on the drawn colour)
TEXTURE = np.array([.06, .10, .12, .10, .05, .04, .04, .04, .30, .22, .04, .08, .08, .05, .06,
                    .05, .05, .06, .05], np.float32)


def _look(s: Scene) -> None:
    """Texture, lighting, noise and blur on the painted image."""
    r = s.rng
    lab = s.lab
    field = cv2.GaussianBlur(r.randn(s.h, s.w).astype(np.float32), (0, 0), r.uniform(0.7, 1.6))
    field /= field.std() + 1e-6
    amp = TEXTURE[np.minimum(lab, len(CLASSES) - 1)]
    img = s.img * (1 + amp * field)[..., None]
    yy, xx = np.mgrid[0:s.h, 0:s.w].astype(np.float32)
    angle = r.uniform(0, np.pi)
    shade = np.cos(angle) * xx / s.w + np.sin(angle) * yy / s.h
    img *= (r.uniform(0.6, 1.25) + r.uniform(-0.25, 0.25) * shade)[..., None]
    img *= np.array([r.uniform(0.85, 1.15) for _ in range(3)], np.float32)
    img += r.randn(s.h, s.w, 3).astype(np.float32) * r.uniform(2, 9)
    sigma = r.uniform(0.0, 1.0)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    s.img = np.clip(img, 0, 255)


def street_scene(seed: int, width: int, height: int, must: int = -1
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (HxWx3 uint8 BGR image, HxW uint8 train-id labels)."""
    s = Scene(np.random.RandomState(seed % (2 ** 32)), width, height)
    r = s.rng
    draw_sky_and_ground(s)
    left, right = s.w * r.uniform(-0.15, 0.2), s.w * r.uniform(0.8, 1.15)
    side_l, side_r = left - s.w * r.uniform(0.15, 0.4), right + s.w * r.uniform(0.15, 0.4)
    draw_roadside(s, side_l - s.w * r.uniform(0, 0.3))
    draw_roadside(s, side_r + s.w * r.uniform(0, 0.3))
    hz, vx = s.horizon, s.vx
    walk = s.color((150, 150, 160), 30)
    s.poly([(side_l, s.h), (left, s.h), (vx - 1, hz), (vx - 2, hz)], SIDEWALK, walk)
    s.poly([(right, s.h), (side_r, s.h), (vx + 2, hz), (vx + 1, hz)], SIDEWALK, walk)
    s.poly([(left, s.h), (right, s.h), (vx + 1, hz), (vx - 1, hz)], ROAD,
           s.color((110, 105, 105), 25))
    for lane in (0.5,) if r.rand() < 0.7 else (0.33, 0.67):  # dashed lane marks
        x0 = left + lane * (right - left)
        for t in np.arange(0.0, 0.9, 0.12):
            a, b = t, t + 0.05
            wa, wb = 0.012 * s.w * (1 - a), 0.012 * s.w * (1 - b)
            xa, xb = s.toward(x0, a), s.toward(x0, b)
            s.paint_only([(xa - wa, s.row(a)), (xa + wa, s.row(a)), (xb + wb, s.row(b)),
                          (xb - wb, s.row(b))], (220, 220, 220))
    draw_objects(s, left, right, side_l, side_r, must)
    if r.rand() < 0.3:  # the hood of the recording car: ignored, as in Cityscapes
        top = s.h * r.uniform(0.9, 0.96)
        s.rect(0, top, s.w, s.h, IGNORE, s.color((40, 40, 40), 15))
    _look(s)
    return np.round(s.img).astype(np.uint8), s.lab


def make_street_dataset(save_dir: str, num_train: int, num_val: int, width: int = 512,
                        height: int = 256, seed: int = 0) -> str:
    """Writes leftImg8bit/{train,val}/<city>/*_leftImg8bit.png,
    gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png, train.txt and val.txt (image and
    label per line) and README.txt; returns save_dir."""
    lists = {}
    for split, count, cities, offset in (('train', num_train, TRAIN_CITIES, 0),
                                         ('val', num_val, VAL_CITIES, 1_000_000)):
        lines = []
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f'{city}_{i:06d}_000019'
            img, lab = street_scene(seed * 10_000_019 + offset + i, width, height,
                                    must=RARE[i % len(RARE)])
            paths = (os.path.join('leftImg8bit', split, city, stem + '_leftImg8bit.png'),
                     os.path.join('gtFine', split, city, stem + '_gtFine_labelTrainIds.png'))
            for rel, array in zip(paths, (img, lab)):  # each file whole or not at all
                os.makedirs(os.path.dirname(os.path.join(save_dir, rel)), exist_ok=True)
                write_bytes(os.path.join(save_dir, rel), cv2.imencode('.png', array)[1].tobytes())
            lines.append(' '.join(paths))
        lists[split] = lines
    for split, lines in lists.items():
        write_text(os.path.join(save_dir, f'{split}.txt'), '\n'.join(lines) + '\n')
    write_text(os.path.join(save_dir, 'README.txt'), '\n'.join([
        SYNTHETIC_NOTE.format(seed=seed) + '.',
        f'{num_train} train / {num_val} val images of {width}x{height}; 19 Cityscapes train '
        'classes (labelTrainIds, 255 = ignore).',
        'classes: ' + ', '.join(f'{i} {c}' for i, c in enumerate(CLASSES))]) + '\n')
    return save_dir
