"""Deterministic fundus-like images in the optic-disc dataset layout.

The pictures imitate what makes the real task non-trivial: a circular field with
vignetting, dark vessel curves that run through the disc, bright lesion-like spots
that are not the disc, and a disc whose position, size, brightness and blur vary.
The same seed gives the same bytes (for a given OpenCV build).
"""
import os
from typing import Tuple

import cv2
import numpy as np

from segslim.fileio import write_bytes

SPLITS = ('train', 'val', 'test')


def _vessels(canvas: np.ndarray, rng: np.random.Generator, center: Tuple[float, float],
             size: int) -> None:
    """Draws dark quadratic curves that fan out from the disc."""
    for _ in range(rng.integers(5, 9)):
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.35, 0.8) * size
        bend = rng.uniform(-0.5, 0.5)
        t = np.linspace(0.0, 1.0, 40)[:, None]
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        points = (np.array(center) + t * length * direction +
                  (t * (1 - t)) * bend * length * normal)
        width = max(1, int(round(rng.uniform(0.006, 0.016) * size)))
        shade = rng.uniform(0.45, 0.7)
        cv2.polylines(canvas, [np.round(points).astype(np.int32)], False,
                      color=float(shade), thickness=width, lineType=cv2.LINE_AA)


def make_sample(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Returns one (BGR uint8 image, uint8 0/1 mask) pair of `size` x `size`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    field_r = size * rng.uniform(0.44, 0.49)
    r = np.sqrt((xx - c) ** 2 + (yy - c) ** 2)
    field = (r < field_r).astype(np.float32)
    vignette = np.clip(1.0 - 0.55 * (r / field_r) ** 2, 0.0, 1.0)

    base = np.array([rng.uniform(0.10, 0.22), rng.uniform(0.22, 0.38),
                     rng.uniform(0.55, 0.80)], np.float32)  # BGR: reddish-orange
    img = base[None, None, :] * vignette[..., None]

    # Disc centre somewhere off the middle of the field, like left/right eyes.
    offset_r = rng.uniform(0.12, 0.30) * size
    offset_a = rng.uniform(0, 2 * np.pi)
    dcx, dcy = c + offset_r * np.cos(offset_a), c + offset_r * np.sin(offset_a)
    ax = rng.uniform(0.06, 0.12) * size
    ay = ax * rng.uniform(0.8, 1.2)
    tilt = rng.uniform(0, 180)

    shade = np.ones((size, size), np.float32)
    _vessels(shade, rng, (dcx, dcy), size)
    img *= shade[..., None]

    # Lesion-like bright spots that must not be taken for the disc.
    for _ in range(rng.integers(0, 4)):
        sr = rng.uniform(0.01, 0.035) * size
        sa, sd = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.8) * field_r
        spot = np.zeros((size, size), np.float32)
        cv2.circle(spot, (int(c + sd * np.cos(sa)), int(c + sd * np.sin(sa))),
                   int(max(1, sr)), 1.0, -1, lineType=cv2.LINE_AA)
        spot = cv2.GaussianBlur(spot, (0, 0), max(0.5, sr / 3))
        img += spot[..., None] * np.array([0.25, 0.45, 0.35], np.float32) * rng.uniform(0.5, 1.0)

    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (int(round(dcx)), int(round(dcy))), (int(round(ax)), int(round(ay))),
                tilt, 0, 360, 1, -1)
    glow = mask.astype(np.float32)
    blur = rng.uniform(0.02, 0.25) * ax
    glow = cv2.GaussianBlur(glow, (0, 0), max(0.5, blur))
    brightness = rng.uniform(0.35, 0.75)
    img += glow[..., None] * np.array([0.55, 0.75, 0.45], np.float32) * brightness
    img *= rng.uniform(0.75, 1.15)  # exposure
    img += rng.normal(0.0, rng.uniform(0.01, 0.035), img.shape).astype(np.float32)
    img *= field[..., None]
    img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    mask[field == 0] = 0
    return img, mask


def make_demo_dataset(save_dir: str, num_train: int = 60, num_val: int = 20,
                      num_test: int = 10, size: int = 128, seed: int = 0) -> str:
    """Writes images/*.jpg, annotations/*.png and the three list files; returns save_dir."""
    counts = dict(train=num_train, val=num_val, test=num_test)
    for sub in ('JPEGImages', 'Annotations'):
        os.makedirs(os.path.join(save_dir, sub), exist_ok=True)
    index = 0
    for split in SPLITS:
        lines = []
        for _ in range(counts[split]):
            rng = np.random.default_rng([seed, index])
            img, mask = make_sample(rng, size)
            name = 'N{:04d}'.format(index)
            img_rel = 'JPEGImages/{}.jpg'.format(name)
            lab_rel = 'Annotations/{}.png'.format(name)
            ok_img, jpg = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            ok_lab, png = cv2.imencode('.png', mask)
            assert ok_img and ok_lab
            write_bytes(os.path.join(save_dir, img_rel), jpg.tobytes())
            write_bytes(os.path.join(save_dir, lab_rel), png.tobytes())
            lines.append('{} {}\n'.format(img_rel, lab_rel))
            index += 1
        write_bytes(os.path.join(save_dir, '{}_list.txt'.format(split)),
                     ''.join(lines).encode())
    return save_dir
