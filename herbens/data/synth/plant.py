"""One pressed plant: stem, leaves at their nodes, flowers, roots and mounting tape."""

from __future__ import annotations

import math

import numpy as np

from herbens.data.synth.canvas import Canvas, Pose, hsv
from herbens.data.synth.leaves import leaf_template
from herbens.data.synth.looks import SpeciesLook

def _leaf_colours(look: SpeciesLook, rng: np.random.Generator, d: float) -> np.ndarray:
    """The image's leaf colour: the species' HSV with per-specimen jitter and browning."""
    hue = look.hue + rng.normal(0, 3.0 * d)
    val = look.val * (1 + rng.normal(0, 0.05 * d))
    sat = look.sat * (1 + rng.normal(0, 0.06 * d))
    rgb = hsv(hue, float(np.clip(sat, 0.05, 1)), float(np.clip(val, 0.05, 0.95)))
    # Old or slowly dried specimens turn brown; kept small so the species' tint stays readable.
    browning = rng.uniform(0, 0.15 * d)
    return rgb * (1 - browning) + browning * np.array([115.0, 95.0, 60.0])


def _stem_points(look: SpeciesLook, rng: np.random.Generator, d: float, height: float) -> np.ndarray:
    """A gently curved stem from (0, 0) up to about (0, height)."""
    s = np.linspace(0.0, 1.0, 16)
    bend = rng.normal(0, 0.07 * d)
    sway = rng.normal(0, 0.04 * d)
    x = height * (bend * s ** 2 + sway * np.sin(np.pi * s))
    return np.stack([x, height * s], axis=1)


def _node_leaves(look: SpeciesLook, rng: np.random.Generator, d: float,
                 stem: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
    """(attachment point, direction in radians, relative size) of every leaf on the plant."""
    leaves = []
    if look.arrangement == "rosette":
        count = look.nodes + 3 + _node_jitter(rng, d)
        for a in np.linspace(-75, 75, count) + rng.normal(0, 6 * d, size=count):
            leaves.append((stem[0], math.radians(90 + a), 1.2 * (1 + rng.normal(0, 0.06 * d))))
        return leaves
    nodes = look.nodes + _node_jitter(rng, d)
    if look.arrangement == "whorled":
        nodes = max(2, (nodes + 1) // 2)
    fractions = np.linspace(0.14, 0.88, nodes) + rng.uniform(-0.02, 0.02, size=nodes) * d
    side = 1 if rng.random() < 0.5 else -1
    for f in fractions:
        i = min(int(f * (len(stem) - 1)), len(stem) - 2)
        tangent = stem[i + 1] - stem[i]
        up = math.atan2(tangent[1], tangent[0])
        point = stem[i] + (stem[i + 1] - stem[i]) * (f * (len(stem) - 1) - i)
        size = 1.0 - 0.3 * f  # leaves shrink towards the top, as on most real stems
        if look.arrangement == "alternate":
            angles = [side * look.leaf_angle]
            side = -side
        elif look.arrangement == "opposite":
            angles = [look.leaf_angle, -look.leaf_angle]
        else:
            angles = [look.leaf_angle, -look.leaf_angle, look.leaf_angle + 65, -look.leaf_angle - 65]
        for a in angles:
            a = a + rng.normal(0, 8 * d)
            leaves.append((point, up - math.radians(a), size * (1 + rng.normal(0, 0.07 * d))))
    return leaves


def _node_jitter(rng: np.random.Generator, d: float) -> int:
    """Sometimes one node more or fewer than the species' count (a broken or young shoot)."""
    if rng.random() < min(0.6, 0.25 * d):
        return int(rng.choice((-1, 1)))
    return 0


def _draw_leaf(canvas: Canvas, pose: Pose, look: SpeciesLook, rng: np.random.Generator,
               d: float, leaf: tuple, length: float, rgb: np.ndarray) -> None:
    point, direction, size = leaf
    outline, veins, slices = leaf_template(look.shape, look.aspect, look.margin, look.venation)
    length = length * size
    width = 1 + rng.normal(0, 0.06 * d)
    c, s = math.cos(direction), math.sin(direction)
    to_plant = length * np.array([[c, s], [-width * s, width * c]])
    base = np.asarray(point) + look.petiole * length * np.array([c, s])
    draw = canvas.draw
    if look.petiole > 0:
        draw.line(pose.apply(np.stack([point, base])), fill=canvas.tone(rgb * 0.8),
                  width=canvas.px(0.0025))
    shade = rgb * (1 + rng.normal(0, 0.06 * d))
    if rng.random() < 0.08 * d:  # a leaf pressed upside down shows its paler underside
        shade = shade * 0.6 + 0.4 * 200
    offset, linear = pose.compose(base, to_plant)
    draw.polygon((offset + outline @ linear).ravel().tolist(), fill=canvas.tone(shade),
                 outline=canvas.tone(shade * 0.7))
    vein = canvas.tone(shade * (1 + look.vein_contrast))
    flat = (offset + veins @ linear).ravel().tolist()
    midrib, thin = canvas.px(0.0022), canvas.px(0.0012)
    for i, (a, b) in enumerate(slices):
        draw.line(flat[a:b], fill=vein, width=midrib if i == 0 else thin)


def _draw_roots(canvas: Canvas, pose: Pose, rng: np.random.Generator) -> None:
    colour = canvas.tone((115, 90, 65))
    for _ in range(int(rng.integers(3, 6))):
        steps = rng.normal([0.0, -0.012], [0.008, 0.004], size=(7, 2))
        pts = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, axis=0)])
        canvas.draw.line(pose.apply(pts), fill=colour, width=canvas.px(0.0015))


def _draw_flowers(canvas: Canvas, pose: Pose, look: SpeciesLook, rng: np.random.Generator,
                  tip: np.ndarray) -> None:
    colour = canvas.tone(look.flower_rgb)
    edge = canvas.tone(np.asarray(look.flower_rgb) * 0.7)
    for _ in range(int(rng.integers(4, 8))):
        centre = tip + rng.normal(0, 0.015, size=2) + [0.0, 0.012]
        cx, cy = pose.apply(centre[None, :])
        r = 0.008 * canvas.unit
        canvas.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=edge)


def _draw_tape(canvas: Canvas, pose: Pose, rng: np.random.Generator, stem: np.ndarray) -> None:
    """Mounting tape strips across the stem."""
    colour = canvas.tone((246, 243, 233))
    for f in rng.uniform(0.2, 0.75, size=2):
        x, y = pose.apply(stem[int(f * (len(stem) - 1))][None, :])
        w, h = 0.025 * canvas.unit, 0.006 * canvas.unit
        canvas.draw.rectangle((x - w, y - h, x + w, y + h), fill=colour)


def draw_plant(canvas: Canvas, look: SpeciesLook, rng: np.random.Generator, d: float) -> None:
    """Stem, leaves, flowers and roots of one specimen, in a random pose."""
    centre_x = 0.30 + rng.uniform(-0.04, 0.04) * d
    base_y = (0.80 if look.arrangement == "rosette" else 0.87) + rng.uniform(-0.025, 0.02) * d
    pose = Pose((centre_x, base_y), rng.normal(0, 5 * d), 1 + rng.uniform(-0.06, 0.06) * d,
                 canvas.unit)
    height = look.stem_height * (0.75 if look.arrangement == "rosette" else 1.0)
    stem = _stem_points(look, rng, d, height)
    rgb = _leaf_colours(look, rng, d)
    leaves = _node_leaves(look, rng, d, stem)
    _draw_roots(canvas, pose, rng)
    stem_width = look.stem_width * (0.6 if look.arrangement == "rosette" else 1.0)
    canvas.draw.line(pose.apply(stem), fill=canvas.tone(look.stem_rgb), width=canvas.px(stem_width),
                     joint="curve")
    for leaf in leaves:
        if rng.random() < 0.05 * d:  # lost in collecting or pressing
            continue
        _draw_leaf(canvas, pose, look, rng, d, leaf, look.leaf_len, rgb)
    _draw_flowers(canvas, pose, look, rng, stem[-1])
    _draw_tape(canvas, pose, rng, stem)
