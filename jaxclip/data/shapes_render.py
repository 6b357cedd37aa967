"""Rendering of shapes-world scenes (jaxclip/data/shapes.py): image, class mask and depth.

Pure numpy; a scene renders identically in any process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxclip.data.shapes import Scene

# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------
# Inside-tests take local coordinates u (right) and v (down), scaled so the object's
# bounding circle has radius 1, and return a boolean array.

_SQRT3 = float(np.sqrt(3.0))
# Star: fold the angle into one of 10 half-spikes and test against the edge running from
# the outer tip (radius 1, angle 0) to the inner corner (radius 0.45, angle pi/5).
_STAR_INNER = 0.45
_STAR_TIP = np.array([1.0, 0.0])
_STAR_CORNER = _STAR_INNER * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    theta = np.arctan2(u, -v)  # 0 points up, so the star stands on two legs
    a = np.abs((theta + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)
    px, py = r * np.cos(a), r * np.sin(a)
    ex, ey = _STAR_CORNER - _STAR_TIP
    # Inside when the point is on the origin's side of the tip-corner edge.
    return (px - _STAR_TIP[0]) * ey - py * ex <= 0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.1 * u, -1.1 * v + 0.12
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


_INSIDE: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u * u + v * v <= 1.0,  # circle
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,  # square
    # triangle: apex (0, -0.95), base corners (+-0.95, 0.75)
    lambda u, v: (v <= 0.75) & (np.abs(u) <= 0.95 * (v + 0.95) / 1.7),
    _star,
    lambda u, v: (
        ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95))  # cross
        | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    ),
    lambda u, v: np.abs(u) + np.abs(v) <= 1.0,  # diamond
    # hexagon with flat top and bottom, circumradius 1
    lambda u, v: (np.abs(v) <= _SQRT3 / 2) & (_SQRT3 * np.abs(u) + np.abs(v) <= _SQRT3),
    _heart,
)
assert len(_INSIDE) == 8  # one inside-test per entry of shapes.SHAPES, in order

# Background depth runs from far (top) to near (bottom), like a floor seen from above;
# every object depth (< 2) is nearer than any background depth.
_BG_DEPTH_TOP, _BG_DEPTH_BOTTOM = 4.0, 2.0


def render(
    scene: Scene, image_size: int, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``(image uint8 (S,S,3), mask uint8 (S,S), depth float32 (S,S))``.

    Objects are tested on a ``supersample``x finer grid inside their bounding box only, then
    box-averaged, which anti-aliases edges at little cost.
    """
    s = image_size
    t = (np.arange(s, dtype=np.float32) + 0.5) / s
    top, bottom = np.asarray(scene.bg_top, np.float32), np.asarray(scene.bg_bottom, np.float32)
    image = np.empty((s, s, 3), np.float32)
    image[:] = (top + (bottom - top) * t[:, None])[:, None, :]
    noise = np.random.default_rng(scene.texture_seed).standard_normal((s, s, 3), np.float32)
    image += 3.0 * noise
    mask = np.zeros((s, s), np.uint8)
    # Linear in inverse depth, as on a real floor plane.
    inv = 1 / _BG_DEPTH_TOP + (1 / _BG_DEPTH_BOTTOM - 1 / _BG_DEPTH_TOP) * t
    depth = np.repeat((1 / inv)[:, None], s, axis=1).astype(np.float32)

    ss = supersample
    # Far to near, so nearer objects (ending with the main one) are painted over.
    for obj in sorted(scene.objects, key=lambda o: -o.depth):
        r = obj.extent * s / 2
        cx, cy = obj.x * s, obj.y * s
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)), s)
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)), s)
        if x1 <= x0 or y1 <= y0:
            continue
        u = ((np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss + x0 - cx) / r
        v = ((np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss + y0 - cy) / r
        inside = _INSIDE[obj.shape](u[None, :], v[:, None])
        cover = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)
        region = image[y0:y1, x0:x1]
        region += (np.asarray(obj.rgb, np.float32) - region) * cover[..., None]
        solid = cover >= 0.5
        mask[y0:y1, x0:x1][solid] = obj.shape + 1
        depth[y0:y1, x0:x1][solid] = obj.depth

    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask, depth
