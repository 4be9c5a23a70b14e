"""A synthetic many-class street scene in the Cityscapes layout: the 19 train classes in
perspective, with thin structures (poles, fences, bicycles), small objects (signs, lights,
people at a distance) and large regions (road, building, vegetation, sky), drawn with textures,
noise, lighting and blur. Deterministic for a seed (same seed, same bytes). The images are
made, not photographed: every report on this data says so."""
import os
from typing import Callable, List, Sequence, Tuple

import cv2
import numpy as np

from segslim.fileio import write_text

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

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
# classes every val image set must contain: image i of a split draws RARE[i % len(RARE)]
RARE = (TRAIN, BUS, TRUCK, MOTORCYCLE, RIDER, WALL, LIGHT)
# texture strength per class (multiplicative noise on the drawn colour)
TEXTURE = np.array([.06, .10, .12, .10, .05, .04, .04, .04, .30, .22, .04, .08, .08, .05, .06,
                    .05, .05, .06, .05], np.float32)

Point = Tuple[float, float]


class Scene:
    """An image (float BGR) and its label map, painted together from far to near."""

    def __init__(self, rng: np.random.RandomState, width: int, height: int):
        self.rng, self.w, self.h = rng, width, height
        self.img = np.zeros((height, width, 3), np.float32)
        self.lab = np.full((height, width), SKY, np.uint8)
        self.horizon = height * rng.uniform(0.36, 0.48)
        self.vx = width * rng.uniform(0.38, 0.62)

    # geometry ---------------------------------------------------------------------------
    def depth(self, y: float) -> float:
        """Scale of an object standing on ground row y: 0 at the horizon, 1 at the bottom."""
        return max(0.0, (y - self.horizon) / (self.h - self.horizon))

    def toward(self, x0: float, t: float) -> float:
        """x of the line from (x0, bottom) to the vanishing point, at depth fraction t
        (0 bottom, 1 horizon)."""
        return x0 + t * (self.vx - x0)

    def row(self, t: float) -> float:
        return self.h + t * (self.horizon - self.h)

    # painting ---------------------------------------------------------------------------
    def color(self, base: Sequence[float], spread: float = 25.0) -> Tuple[float, ...]:
        return tuple(float(np.clip(c + self.rng.uniform(-spread, spread), 0, 255)) for c in base)

    def poly(self, pts: Sequence[Point], cls: int, color: Sequence[float]) -> None:
        p = np.round(np.asarray(pts, np.float64) * 16).astype(np.int32)[None]
        cv2.fillPoly(self.img, p, tuple(color), lineType=cv2.LINE_8, shift=4)
        cv2.fillPoly(self.lab, p, cls, lineType=cv2.LINE_8, shift=4)

    def rect(self, x0: float, y0: float, x1: float, y1: float, cls: int,
             color: Sequence[float]) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], cls, color)

    def line(self, a: Point, b: Point, width: float, cls: int, color: Sequence[float]) -> None:
        t = max(1, int(round(width)))
        pa, pb = tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b)
        cv2.line(self.img, pa, pb, tuple(color), t)
        cv2.line(self.lab, pa, pb, cls, t)

    def circle(self, c: Point, r: float, cls: int, color: Sequence[float],
               width: int = -1) -> None:
        pc, rr = (int(round(c[0])), int(round(c[1]))), max(1, int(round(r)))
        cv2.circle(self.img, pc, rr, tuple(color), width)
        cv2.circle(self.lab, pc, rr, cls, width)

    def paint_only(self, pts: Sequence[Point], color: Sequence[float]) -> None:
        """Colour without a class change (windows, lane marks, shadows of the same class)."""
        p = np.round(np.asarray(pts, np.float64) * 16).astype(np.int32)[None]
        cv2.fillPoly(self.img, p, tuple(color), shift=4)


def _sky_and_ground(s: Scene) -> None:
    r = s.rng
    top, bottom = s.color((200, 160, 120), 40), s.color((235, 215, 200), 20)
    ramp = np.linspace(0, 1, s.h, dtype=np.float32)[:, None, None]
    s.img[:] = (1 - ramp) * np.array(top, np.float32) + ramp * np.array(bottom, np.float32)
    for _ in range(r.randint(0, 5)):  # clouds: sky with another colour
        c = (r.uniform(0, s.w), r.uniform(0, s.horizon * 0.8))
        cv2.ellipse(s.img, (int(c[0]), int(c[1])), (int(r.uniform(10, 60)), int(r.uniform(4, 14))),
                    0, 0, 360, s.color((235, 235, 235), 15), -1)
    s.rect(0, s.horizon, s.w, s.h, TERRAIN, s.color((90, 150, 120), 30))


def _roadside(s: Scene, side: int, x0: float) -> None:
    """Façades, walls, trees and grass along one side, far to near, beyond the sidewalk
    whose outer edge starts at (x0, bottom)."""
    r = s.rng
    t = 0.97
    while t > 0:
        t_near = max(0.0, t - r.uniform(0.08, 0.3))
        a, b = s.toward(x0, t), s.toward(x0, t_near)
        ya, yb = s.row(t), s.row(t_near)
        kinds = ['building'] * 4 + ['trees'] * 2 + ['wall', 'gap']
        kind = kinds[r.randint(len(kinds))]
        height = r.uniform(0.9, 3.2) * s.h
        if kind == 'building':
            ha, hb = height * (1 - t), height * (1 - t_near)
            col = s.color([(90, 90, 100), (120, 130, 150), (70, 80, 110), (150, 150, 140),
                           (60, 60, 60)][r.randint(5)], 30)
            s.poly([(a, ya), (b, yb), (b, yb - hb), (a, ya - ha)], BUILDING, col)
            rows, cols = r.randint(3, 9), r.randint(2, 6)
            win = s.color((50, 45, 40), 25) if r.rand() < 0.7 else s.color((180, 200, 210), 25)
            for i in range(cols):
                for j in range(1, rows):
                    u0, u1 = (i + 0.25) / cols, (i + 0.75) / cols
                    v0, v1 = j / rows, (j + 0.5) / rows
                    pts = []
                    for u, v in ((u0, v0), (u1, v0), (u1, v1), (u0, v1)):
                        x = a + u * (b - a)
                        y_base = ya + u * (yb - ya)
                        hh = ha + u * (hb - ha)
                        pts.append((x, y_base - v * hh))
                    s.paint_only(pts, win)
        elif kind == 'wall':
            ha, hb = 0.12 * s.h * (1 - t), 0.12 * s.h * (1 - t_near)
            s.poly([(a, ya), (b, yb), (b, yb - hb), (a, ya - ha)], WALL,
                   s.color((140, 130, 120), 30))
        if kind in ('trees', 'gap', 'wall'):
            for _ in range(r.randint(2, 7)):  # trees behind
                u = r.uniform(0, 1)
                x, y = a + u * (b - a), ya + u * (yb - ya)
                k = s.depth(y)
                trunk = max(1.0, 0.012 * s.w * k)
                top = y - r.uniform(0.25, 0.6) * s.h * k
                s.line((x, y), (x, top), trunk, VEGETATION, s.color((40, 60, 80), 15))
                for _ in range(r.randint(3, 7)):
                    s.circle((x + r.uniform(-1, 1) * 0.06 * s.w * k,
                              top + r.uniform(-1, 1) * 0.05 * s.h * k),
                             r.uniform(0.04, 0.09) * s.w * k + 1, VEGETATION,
                             s.color((40, 110, 60), 30))
        t = t_near
    del side


def _fence(s: Scene, x0: float, t0: float, t1: float) -> None:
    r = s.rng
    col = s.color((120, 140, 150), 30)
    h = r.uniform(0.06, 0.1) * s.h
    xa, xb, ya, yb = s.toward(x0, t0), s.toward(x0, t1), s.row(t0), s.row(t1)
    ka, kb = s.depth(ya), s.depth(yb)
    for v in (0.35, 0.95):  # rails
        s.line((xa, ya - v * h * ka), (xb, yb - v * h * kb), max(1.0, 2.5 * ka), FENCE, col)
    for i in range(r.randint(4, 14)):  # posts
        u = i / 13
        x, y = xa + u * (xb - xa), ya + u * (yb - ya)
        k = s.depth(y)
        s.line((x, y), (x, y - h * k), max(1.0, 2.5 * k), FENCE, col)


def _pole(s: Scene, x: float, y: float) -> None:
    r = s.rng
    k = s.depth(y)
    width = max(1.0, 0.01 * s.w * k)
    top = y - r.uniform(0.45, 0.75) * s.h * k
    s.line((x, y), (x, top), width, POLE, s.color((120, 120, 120), 40))
    kind = r.rand()
    if kind < 0.35:  # a traffic light on an arm
        arm = x + r.choice([-1, 1]) * 0.05 * s.w * k
        s.line((x, top), (arm, top), width, POLE, s.color((120, 120, 120), 30))
        lw, lh = 0.018 * s.w * k + 1, 0.09 * s.h * k + 2
        s.rect(arm - lw / 2, top, arm + lw / 2, top + lh, LIGHT, s.color((30, 40, 40), 15))
        lamp = [(40, 40, 230), (40, 200, 240), (60, 220, 60)][r.randint(3)]
        s.circle((arm, top + lh * r.choice([0.2, 0.5, 0.8])), lw * 0.35, LIGHT, lamp)
    elif kind < 0.75:  # a sign
        size = 0.03 * s.w * k + 1.5
        cy = top + size
        col = [(40, 40, 200), (200, 90, 30), (40, 200, 230), (230, 230, 230)][r.randint(4)]
        shape = r.randint(3)
        if shape == 0:
            s.circle((x, cy), size, SIGN, col)
        elif shape == 1:
            s.poly([(x - size, cy + size), (x + size, cy + size), (x, cy - size)], SIGN, col)
        else:
            s.rect(x - size, cy - size * 0.8, x + size, cy + size * 0.8, SIGN, col)
        s.circle((x, cy), size * 0.4, SIGN, s.color((240, 240, 240), 15))


def _person(s: Scene, x: float, y: float, cls: int = PERSON, on_bike: bool = False) -> None:
    r = s.rng
    k = s.depth(y)
    h = r.uniform(0.28, 0.36) * s.h * k + 3
    w = 0.3 * h
    cloth = s.color((r.uniform(20, 220), r.uniform(20, 220), r.uniform(20, 220)), 10)
    legs = 0.0 if on_bike else 0.45 * h
    if not on_bike:
        for dx in (-0.22, 0.22):
            s.line((x + dx * w, y), (x + dx * w * 0.5, y - legs), max(1.0, 0.22 * w), cls,
                   s.color((50, 50, 70), 20))
    s.rect(x - w / 2, y - legs - 0.42 * h, x + w / 2, y - legs, cls, cloth)
    s.circle((x, y - legs - 0.5 * h), 0.11 * h + 0.5, cls, s.color((120, 150, 200), 30))


def _bike(s: Scene, x: float, y: float, motor: bool) -> float:
    """A bicycle (thin rings and frame) or a motorcycle at ground (x, y); returns its top."""
    r = s.rng
    k = s.depth(y)
    rad = (0.035 if not motor else 0.04) * s.w * k + 1.5
    gap = 2.6 * rad
    cls = MOTORCYCLE if motor else BICYCLE
    col = s.color((r.uniform(20, 200), r.uniform(20, 200), r.uniform(20, 200)), 10)
    ring = max(1, int(round(0.25 * rad))) if not motor else -1
    for dx in (-gap / 2, gap / 2):
        s.circle((x + dx, y - rad), rad, cls, s.color((30, 30, 30), 10), ring)
    lw = max(1.0, 0.2 * rad)
    if motor:
        s.poly([(x - gap / 2, y - rad * 1.4), (x + gap / 2, y - rad * 1.6),
                (x + gap / 3, y - rad * 2.6), (x - gap / 3, y - rad * 2.2)], cls, col)
    else:
        seat, bar = (x - gap * 0.15, y - rad * 2.2), (x + gap * 0.35, y - rad * 2.4)
        for a, b in (((x - gap / 2, y - rad), seat), (seat, bar), ((x + gap / 2, y - rad), bar),
                     ((x - gap / 2, y - rad), (x + gap * 0.05, y - rad)),
                     ((x + gap * 0.05, y - rad), seat), ((x + gap * 0.05, y - rad), bar)):
            s.line(a, b, lw, cls, col)
    return y - rad * 2.2


def _vehicle(s: Scene, x: float, y: float, cls: int) -> None:
    r = s.rng
    k = s.depth(y)
    w = {CAR: 0.24, TRUCK: 0.3, BUS: 0.36, TRAIN: 0.5}[cls] * s.w * k + 3
    h = {CAR: 0.19, TRUCK: 0.42, BUS: 0.45, TRAIN: 0.5}[cls] * s.h * k + 3
    body = s.color({CAR: (r.uniform(20, 230), r.uniform(20, 230), r.uniform(20, 230)),
                    TRUCK: (190, 190, 190), BUS: (40, 140, 220), TRAIN: (60, 60, 200)}[cls], 40)
    glass = s.color((70, 60, 50), 20)
    wheel = s.color((25, 25, 25), 8)
    x0, x1 = x - w / 2, x + w / 2
    if cls == CAR:
        s.rect(x0, y - 0.6 * h, x1, y - 0.1 * h, cls, body)
        s.poly([(x0 + 0.15 * w, y - 0.6 * h), (x1 - 0.15 * w, y - 0.6 * h),
                (x1 - 0.25 * w, y - h), (x0 + 0.25 * w, y - h)], cls, body)
        s.paint_only([(x0 + 0.22 * w, y - 0.62 * h), (x1 - 0.22 * w, y - 0.62 * h),
                      (x1 - 0.28 * w, y - 0.93 * h), (x0 + 0.28 * w, y - 0.93 * h)], glass)
    elif cls == TRUCK:
        s.rect(x0, y - h, x0 + 0.7 * w, y - 0.15 * h, cls, body)
        s.rect(x0 + 0.72 * w, y - 0.6 * h, x1, y - 0.15 * h, cls, s.color((60, 60, 160), 40))
        s.paint_only([(x0 + 0.78 * w, y - 0.55 * h), (x1 - 0.04 * w, y - 0.55 * h),
                      (x1 - 0.04 * w, y - 0.4 * h), (x0 + 0.78 * w, y - 0.4 * h)], glass)
    else:
        s.rect(x0, y - h, x1, y - 0.1 * h, cls, body)
        for i in range(6 if cls == BUS else 9):
            n = 6 if cls == BUS else 9
            s.paint_only([(x0 + (i + 0.15) * w / n, y - 0.85 * h),
                          (x0 + (i + 0.85) * w / n, y - 0.85 * h),
                          (x0 + (i + 0.85) * w / n, y - 0.6 * h),
                          (x0 + (i + 0.15) * w / n, y - 0.6 * h)], glass)
        if cls == TRAIN:  # the pantograph wire of a tram
            s.line((x, y - h), (x, y - 1.2 * h), max(1.0, 0.01 * w), cls, wheel)
    wr = 0.09 * w if cls != TRAIN else 0.04 * w
    for u in ((0.18, 0.82) if cls != TRAIN else (0.1, 0.3, 0.7, 0.9)):
        s.circle((x0 + u * w, y - wr), wr, cls, wheel)


def _objects(s: Scene, left: float, right: float, side_l: float, side_r: float,
             must: int) -> None:
    """Everything standing on the ground, far to near: (t, draw) sorted by depth."""
    r = s.rng
    todo: List[Tuple[float, Callable[[], object]]] = []

    def on_road(t: float, lane: float) -> Tuple[float, float]:
        a, b = s.toward(left, t), s.toward(right, t)
        return a + lane * (b - a), s.row(t)

    def on_walk(t: float, side: int, u: float) -> Tuple[float, float]:
        if side < 0:
            a, b = s.toward(side_l, t), s.toward(left, t)
        else:
            a, b = s.toward(right, t), s.toward(side_r, t)
        return a + u * (b - a), s.row(t)

    def later(t: float, fn: Callable[..., object], *args: object) -> None:
        todo.append((t, lambda: fn(*args)))

    vehicles = [CAR] * r.randint(2, 8)
    for cls in (TRUCK, BUS, TRAIN):
        if r.rand() < {TRUCK: 0.3, BUS: 0.2, TRAIN: 0.06}[cls] or must == cls:
            vehicles.append(cls)
    for cls in vehicles:
        t = r.uniform(0.1, 0.85)
        later(t, _vehicle, s, *on_road(t, r.uniform(0.2, 0.8)), cls)
    for _ in range(r.randint(0, 2) + (must in (RIDER, MOTORCYCLE))):
        t = r.uniform(0.05, 0.8)
        x, y = on_road(t, r.choice([0.12, 0.88]))
        motor = r.rand() < 0.4 or (must == MOTORCYCLE)

        def rider(x: float = x, y: float = y, motor: bool = motor) -> None:
            top = _bike(s, x, y, motor)
            _person(s, x, top + 0.02 * s.h * s.depth(y), RIDER, on_bike=True)
        todo.append((t, rider))
    for _ in range(r.randint(1, 7)):
        t = r.uniform(0.0, 0.85)
        later(t, _person, s, *on_walk(t, r.choice([-1, 1]), r.uniform(0.2, 0.8)))
    for _ in range(r.randint(0, 3)):
        t = r.uniform(0.0, 0.8)
        later(t, _bike, s, *on_walk(t, r.choice([-1, 1]), r.uniform(0.6, 0.9)), False)
    for side in (-1, 1):
        for t in np.arange(r.uniform(0.02, 0.2), 0.9, r.uniform(0.12, 0.3)):
            later(float(t), _pole, s, *on_walk(float(t), side, 0.92 if side < 0 else 0.08))
        if r.rand() < 0.6:
            t0 = r.uniform(0.0, 0.4)
            later(t0, _fence, s, side_l if side < 0 else side_r, t0, min(0.95, t0 + 0.5))
    if must == LIGHT:
        later(0.3, _pole, s, *on_walk(0.3, 1, 0.08))
    for _, draw in sorted(todo, key=lambda item: -item[0]):
        draw()


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
    _sky_and_ground(s)
    left, right = s.w * r.uniform(-0.15, 0.2), s.w * r.uniform(0.8, 1.15)
    side_l, side_r = left - s.w * r.uniform(0.15, 0.4), right + s.w * r.uniform(0.15, 0.4)
    _roadside(s, -1, side_l - s.w * r.uniform(0, 0.3))
    _roadside(s, 1, side_r + s.w * r.uniform(0, 0.3))
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
    _objects(s, left, right, side_l, side_r, must)
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
            for rel, array in zip(paths, (img, lab)):
                full = os.path.join(save_dir, rel)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                if not cv2.imwrite(full, array):
                    raise OSError(f'cannot write {full}')
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
