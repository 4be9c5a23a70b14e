"""Drawing of the street scenes (segslim.data.street): a canvas that paints an image and its
train-id label map together, and the things a street holds, far to near and in perspective."""
from typing import Callable, List, Sequence, Tuple

import cv2
import numpy as np

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)

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


def draw_sky_and_ground(s: Scene) -> None:
    r = s.rng
    top, bottom = s.color((200, 160, 120), 40), s.color((235, 215, 200), 20)
    ramp = np.linspace(0, 1, s.h, dtype=np.float32)[:, None, None]
    s.img[:] = (1 - ramp) * np.array(top, np.float32) + ramp * np.array(bottom, np.float32)
    for _ in range(r.randint(0, 5)):  # clouds: sky with another colour
        c = (r.uniform(0, s.w), r.uniform(0, s.horizon * 0.8))
        cv2.ellipse(s.img, (int(c[0]), int(c[1])), (int(r.uniform(10, 60)), int(r.uniform(4, 14))),
                    0, 0, 360, s.color((235, 235, 235), 15), -1)
    s.rect(0, s.horizon, s.w, s.h, TERRAIN, s.color((90, 150, 120), 30))


def draw_roadside(s: Scene, x0: float) -> None:
    """Façades, walls, trees and grass along one side, far to near, beyond the sidewalk
    whose outer edge starts at (x0, bottom)."""
    r = s.rng
    t = 0.97
    while t > 0:
        t_near = max(0.0, t - r.uniform(0.08, 0.3))
        a, b = s.toward(x0, t), s.toward(x0, t_near)
        ya, yb = s.row(t), s.row(t_near)
        kinds = ['building'] * 4 + ['trees'] * 2 + ['wall'] * 2 + ['gap']
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
        elif kind == 'wall':  # brick or concrete, lower than a façade, with courses
            wall_h = r.uniform(0.15, 0.3) * s.h
            ha, hb = wall_h * (1 - t), wall_h * (1 - t_near)
            s.poly([(a, ya), (b, yb), (b, yb - hb), (a, ya - ha)], WALL,
                   s.color([(60, 80, 150), (150, 150, 145), (90, 110, 130)][r.randint(3)], 25))
            mortar = s.color((185, 185, 180), 20)
            for v in np.arange(0.2, 1.0, 0.25):
                s.paint_only([(a, ya - v * ha), (b, yb - v * hb), (b, yb - (v + 0.05) * hb),
                              (a, ya - (v + 0.05) * ha)], mortar)
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


def _fence(s: Scene, x0: float, t0: float, t1: float) -> None:
    r = s.rng
    col = s.color((120, 140, 150), 30)
    h = r.uniform(0.06, 0.1) * s.h
    xa, xb, ya, yb = s.toward(x0, t0), s.toward(x0, t1), s.row(t0), s.row(t1)
    ka, kb = s.depth(ya), s.depth(yb)
    for v in (0.35, 0.95):  # rails
        s.line((xa, ya - v * h * ka), (xb, yb - v * h * kb), max(2.0, 2.5 * ka), FENCE, col)
    for i in range(r.randint(4, 14)):  # posts
        u = i / 13
        x, y = xa + u * (xb - xa), ya + u * (yb - ya)
        k = s.depth(y)
        s.line((x, y), (x, y - h * k), max(2.0, 2.5 * k), FENCE, col)


def _pole(s: Scene, x: float, y: float) -> None:
    r = s.rng
    k = s.depth(y)
    width = max(2.0, 0.012 * s.w * k)
    top = y - r.uniform(0.45, 0.75) * s.h * k
    s.line((x, y), (x, top), width, POLE, s.color((120, 120, 120), 40))
    kind = r.rand()
    if kind < 0.35:  # a traffic light on an arm
        arm = x + r.choice([-1, 1]) * 0.05 * s.w * k
        s.line((x, top), (arm, top), width, POLE, s.color((120, 120, 120), 30))
        lw, lh = 0.025 * s.w * k + 2, 0.1 * s.h * k + 3
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
        n = 6 if cls == BUS else 9
        for i in range(n):
            s.paint_only([(x0 + (i + 0.15) * w / n, y - 0.85 * h),
                          (x0 + (i + 0.85) * w / n, y - 0.85 * h),
                          (x0 + (i + 0.85) * w / n, y - 0.6 * h),
                          (x0 + (i + 0.15) * w / n, y - 0.6 * h)], glass)
        if cls == TRAIN:  # the pantograph wire of a tram
            s.line((x, y - h), (x, y - 1.2 * h), max(1.0, 0.01 * w), cls, wheel)
    wr = 0.09 * w if cls != TRAIN else 0.04 * w
    for u in ((0.18, 0.82) if cls != TRAIN else (0.1, 0.3, 0.7, 0.9)):
        s.circle((x0 + u * w, y - wr), wr, cls, wheel)


def draw_objects(s: Scene, left: float, right: float, side_l: float, side_r: float,
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
