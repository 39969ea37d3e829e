"""Drawing surfaces: an image in sheet units with a colour cast, and a plant pose."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

def hsv(hue: float, sat: float, val: float) -> np.ndarray:
    """HSV (hue in degrees) to an RGB vector in 0..255."""
    h = (hue % 360.0) / 60.0
    c = val * sat
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.array(rgb) + (val - c)) * 255.0


class Canvas:
    """An image, its draw handle, the sheet-unit scale and the per-image colour cast."""

    def __init__(self, width: int, height: int, paper: np.ndarray, cast: np.ndarray):
        self.cast = tuple(float(k) for k in cast)
        self.unit = float(height)  # pixels per sheet-height unit
        self.image = Image.new("RGB", (width, height), self.tone(paper))
        self.draw = ImageDraw.Draw(self.image)

    def tone(self, rgb) -> tuple:
        """A colour as photographed: multiplied by the institution's (jittered) cast."""
        return tuple(min(255, max(0, int(c * k))) for c, k in zip(rgb, self.cast))

    def px(self, value: float) -> int:
        """A line width in pixels for a length in sheet units (at least one pixel)."""
        return max(1, int(round(value * self.unit)))

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple:
        u = self.unit
        return (int(x0 * u), int(y0 * u), int(x1 * u), int(y1 * u))


class Pose:
    """Plant coordinates (x right, y up, sheet units, origin at the stem base) -> pixels."""

    def __init__(self, origin: tuple[float, float], angle_deg: float, scale: float, unit: float):
        a = math.radians(angle_deg)
        s = scale * unit
        self.origin = np.array(origin) * unit
        self.matrix = s * np.array([[math.cos(a), -math.sin(a)], [-math.sin(a), -math.cos(a)]])

    def apply(self, pts: np.ndarray) -> list:
        return (self.origin + pts @ self.matrix).ravel().tolist()

    def compose(self, offset: np.ndarray, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pixel affine map of ``p -> offset + p @ linear`` followed by this pose."""
        return self.origin + offset @ self.matrix, linear @ self.matrix
