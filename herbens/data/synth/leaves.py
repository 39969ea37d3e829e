"""Leaf geometry in leaf coordinates (u from base to tip, v across): outlines and veins."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

TEETH_BY_MARGIN = (0, 8, 14)

PALMATE_LOBES_BY_MARGIN = (3, 5, 7)

PINNATIFID_LOBES_BY_MARGIN = (2, 3, 5)

_T_GRID = np.linspace(0.0, 1.0, 41)  # positions along a leaf where its half-width is tabulated


def _halfwidth(shape: str, t: np.ndarray) -> np.ndarray:
    """Leaf half-width profile from base (t=0) to tip (t=1), unnormalised."""
    if shape in ("elliptic", "round"):
        return np.sqrt(t * (1 - t))
    if shape in ("ovate", "pinnatifid"):
        return t ** 0.6 * (1 - t) ** 1.2
    if shape == "obovate":
        return t ** 1.2 * (1 - t) ** 0.6
    if shape == "lanceolate":
        return t ** 0.45 * (1 - t) ** 1.4
    if shape == "linear":
        return np.sqrt(np.clip(np.minimum(t / 0.06, (1 - t) / 0.3), 0, 1))
    if shape == "deltoid":
        return (1 - t) * np.sqrt(np.clip(t / 0.1, 0, 1))
    if shape == "spatulate":
        return t ** 2.2 * (1 - t) ** 0.5
    raise ValueError(shape)


def _profile_outline(shape: str, aspect: float, margin: int) -> np.ndarray:
    """Closed outline (u along the leaf, v across) of a leaf given by a half-width profile."""
    teeth = TEETH_BY_MARGIN[margin] if shape != "pinnatifid" else 0
    t = np.linspace(0.0, 1.0, 48 + 6 * teeth)
    w = _halfwidth(shape, t)
    w = w / w.max()
    if shape == "pinnatifid":
        lobes = PINNATIFID_LOBES_BY_MARGIN[margin]
        w = w * (0.35 + 0.65 * np.abs(np.sin(np.pi * lobes * t)) ** 0.6)
    if teeth:
        # A sawtooth: the edge creeps outwards then drops back, i.e. teeth pointing to the tip.
        w = w * (0.9 + 0.14 * np.mod(t * teeth, 1.0))
    half = 0.5 * aspect * w
    upper = np.stack([t, half], axis=1)
    lower = np.stack([t[::-1], -half[::-1]], axis=1)
    return np.concatenate([upper, lower[1:-1]])


def _polar_outline(shape: str, aspect: float, margin: int) -> np.ndarray:
    """Closed outline of a heart-shaped (cordate) or palmately lobed leaf."""
    phi = np.linspace(0.0, 2 * np.pi, 120, endpoint=False)
    if shape == "cordate":
        x = 16 * np.sin(phi) ** 3
        y = 13 * np.cos(phi) - 5 * np.cos(2 * phi) - 2 * np.cos(3 * phi) - np.cos(4 * phi)
        # The notch (phi=0, y=5) is the leaf base at u=0; the tip (phi=pi, y=-17) is u=1.
        pts = np.stack([(5 - y) / 22, x / 22 * aspect / 1.45], axis=1)
        teeth = TEETH_BY_MARGIN[margin]
        if teeth:
            centre = np.array([0.45, 0.0])
            saw = np.mod(phi / (2 * np.pi) * teeth * 2, 1.0)
            pts = centre + (pts - centre) * (0.95 + 0.08 * saw)[:, None]
        return pts
    lobes = PALMATE_LOBES_BY_MARGIN[margin]
    theta = phi - np.pi  # 0 points to the tip, +-pi to the petiole
    spread = min(0.78 * np.pi, 0.25 * np.pi * (lobes - 1))
    centres = np.linspace(-spread, spread, lobes)
    width = spread / (lobes - 1) * 0.6
    bump = np.exp(-(((theta[:, None] - centres[None, :]) / width) ** 2)).max(axis=1)
    r = 0.5 * (0.5 + 0.5 * bump)
    return np.stack([0.5 + r * np.cos(theta), aspect * r * np.sin(theta)], axis=1)


@lru_cache(maxsize=4096)
def leaf_template(shape: str, aspect: float, margin: int,
                   venation: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A leaf in leaf coordinates: outline, all vein points stacked, and each vein's slice.

    Cached per species look, so a sheet only transforms two arrays per leaf.
    """
    if shape in ("cordate", "palmate"):
        pts = _polar_outline(shape, aspect, margin)
    else:
        pts = _profile_outline(shape, aspect, margin)
    near = np.abs(pts[None, :, 0] - _T_GRID[:, None]) <= 0.035
    half = np.where(near, np.abs(pts[None, :, 1]), 0.0).max(axis=1)
    # Veins of a palmately lobed leaf start where the blade starts, past the basal sinus.
    start = float(pts[np.abs(pts[:, 1]) < 0.02, 0].clip(min=0).min()) if shape == "palmate" else 0.0
    lines = _vein_lines(venation, half, start)
    ends = np.cumsum([0] + [len(line) for line in lines])
    # Slices are in units of flat (x, y) lists, as PIL takes them.
    slices = tuple((2 * int(a), 2 * int(b)) for a, b in zip(ends[:-1], ends[1:]))
    return pts, np.concatenate(lines), slices


def _vein_lines(venation: str, half: np.ndarray, start: float) -> list[np.ndarray]:
    """Vein polylines in leaf coordinates; the midrib first."""
    def hw(t):
        return np.interp(t, _T_GRID, half)

    lines = [np.array([[start, 0.0], [0.96, 0.0]])]
    if venation == "pinnate":
        for t in np.linspace(start + 0.15, 0.8, 5):
            end = t + 0.14
            for side in (1, -1):
                lines.append(np.array([[t, 0.0], [end, side * 0.82 * hw(end)]]))
    elif venation == "palmate":
        for t in (0.35, 0.55, 0.75):
            for side in (1, -1):
                lines.append(np.array([[start + 0.02, 0.0], [t, side * 0.8 * hw(t)]]))
    elif venation == "parallel":
        t = np.linspace(start + 0.03, 0.95, 10)
        for f in (-0.65, -0.33, 0.33, 0.65):
            lines.append(np.stack([t, f * hw(t)], axis=1))
    else:  # arcuate: laterals that curve towards the tip
        s = np.linspace(0.0, 1.0, 5)
        for t in np.linspace(start + 0.18, 0.7, 4):
            u = t + 0.3 * s
            for side in (1, -1):
                lines.append(np.stack([u, side * 0.8 * hw(u) * np.sqrt(s)], axis=1))
    return lines
