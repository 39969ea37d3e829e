"""One herbarium sheet: paper, blurred label, barcode, colour chart, packet, plant, noise."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from herbens.data.synth.canvas import Canvas
from herbens.data.synth.looks import InstitutionLook, SpeciesLook
from herbens.data.synth.plant import draw_plant

SHEET_ASPECT = 0.68  # width / height of a herbarium sheet (about 29 x 42 cm)

COLOUR_CHART = ((115, 82, 68), (194, 150, 130), (98, 122, 157), (87, 108, 67), (133, 128, 177),
                (103, 189, 170), (214, 126, 44), (80, 91, 166), (193, 90, 99), (94, 60, 108),
                (157, 188, 64), (224, 163, 46))


def _corner_origin(corner: str, w: float, h: float, margin: float = 0.025) -> tuple[float, float]:
    x = margin if corner[1] == "l" else SHEET_ASPECT - margin - w
    y = margin if corner[0] == "t" else 1.0 - margin - h
    return x, y


def _draw_label(canvas: Canvas, rng: np.random.Generator, inst: InstitutionLook,
                jitter: float) -> tuple:
    """A label with text lines, then blurred to grey smears as NAFlora obfuscates labels."""
    w, h = 0.25 + rng.uniform(-0.02, 0.02), 0.11 + rng.uniform(-0.015, 0.015)
    x, y = _corner_origin(inst.label_corner, w, h, 0.02 + jitter * rng.uniform(0, 0.015))
    draw = canvas.draw
    draw.rectangle(canvas.box(x, y, x + w, y + h), fill=canvas.tone((238, 236, 228)),
                   outline=canvas.tone((150, 150, 145)), width=canvas.px(0.0015))
    ink = canvas.tone((60, 60, 62))
    line_y = y + 0.015
    while line_y < y + h - 0.015:
        length = w * rng.uniform(0.35, 0.9)
        draw.rectangle(canvas.box(x + 0.012, line_y, x + 0.012 + length, line_y + 0.007), fill=ink)
        line_y += 0.015
    area = canvas.box(x - 0.01, y - 0.01, x + w + 0.01, y + h + 0.01)
    blurred = canvas.image.crop(area).filter(ImageFilter.GaussianBlur(0.006 * canvas.unit))
    canvas.image.paste(blurred, area[:2])
    return x, y, w, h


def _draw_barcode(canvas: Canvas, rng: np.random.Generator, label: tuple) -> None:
    x, y, w, _ = label
    top = y - 0.045
    if top < 0.02:
        return
    pos, end = x + 0.01, x + 0.01 + min(0.13, w * 0.6)
    ink = canvas.tone((25, 25, 25))
    while pos < end:
        bar = rng.uniform(0.001, 0.004)
        canvas.draw.rectangle(canvas.box(pos, top, pos + bar, top + 0.03), fill=ink)
        pos += bar + rng.uniform(0.001, 0.004)


def _draw_chart(canvas: Canvas, inst: InstitutionLook) -> None:
    """A 2 x 6 colour chart with a black/white scale bar beside it."""
    cell = 0.026
    w, h = 6 * cell + 0.008, 2 * cell + 0.008 + 0.022
    x, y = _corner_origin(inst.chart_corner, w, h)
    draw = canvas.draw
    draw.rectangle(canvas.box(x, y, x + w, y + 2 * cell + 0.008), fill=canvas.tone((30, 30, 30)))
    for i, colour in enumerate(COLOUR_CHART):
        cx, cy = x + 0.004 + (i % 6) * cell, y + 0.004 + (i // 6) * cell
        draw.rectangle(canvas.box(cx + 0.002, cy + 0.002, cx + cell - 0.002, cy + cell - 0.002),
                       fill=canvas.tone(colour))
    bar_y = y + 2 * cell + 0.016
    seg = w / 6
    for i in range(6):
        fill = canvas.tone((20, 20, 20) if i % 2 == 0 else (250, 250, 250))
        draw.rectangle(canvas.box(x + i * seg, bar_y, x + (i + 1) * seg, bar_y + 0.01), fill=fill,
                       outline=canvas.tone((20, 20, 20)))


def _draw_packet(canvas: Canvas, rng: np.random.Generator) -> None:
    """A fragment packet (folded paper envelope) glued to the right edge."""
    w, h = 0.11, 0.08
    x = SHEET_ASPECT - 0.03 - w
    y = rng.uniform(0.25, 0.45)
    edge = canvas.tone((170, 165, 150))
    canvas.draw.rectangle(canvas.box(x, y, x + w, y + h), fill=canvas.tone((232, 226, 208)),
                          outline=edge, width=canvas.px(0.0015))
    canvas.draw.line(canvas.box(x, y + h * 0.3, x + w, y + h * 0.3), fill=edge, width=canvas.px(0.001))


@lru_cache(maxsize=8)
def _noise_tile(width: int, height: int, difficulty: float) -> Image.Image:
    """Paper texture and sensor noise, centred on 128, a little larger than the image.

    Drawn once per process from a fixed seed; each image takes a crop at a random offset,
    which is far cheaper than drawing full-size noise per image.
    """
    rng = np.random.default_rng(12345)
    pad = 32
    h, w = height + pad, width + pad
    fine = rng.normal(0, 2.0 + 2.0 * difficulty, size=(h, w, 1)) + rng.normal(0, 1.0, size=(h, w, 3))
    coarse = rng.normal(0, 2.0, size=(max(2, h // 40), max(2, w // 40)))
    coarse = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((w, h), Image.BILINEAR))
    tile = np.clip(128 + fine + coarse[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(tile, "RGB")


def _add_noise(image: Image.Image, rng: np.random.Generator, difficulty: float) -> Image.Image:
    tile = _noise_tile(image.width, image.height, float(difficulty))
    x, y = (int(v) for v in rng.integers(0, 33, size=2))
    crop = tile.crop((x, y, x + image.width, y + image.height))
    return ImageChops.add(image, crop, scale=1.0, offset=-128)


def render_sheet(look: SpeciesLook, institution: InstitutionLook, rng: np.random.Generator,
                 long_edge: int = 1000, difficulty: float = 1.0) -> Image.Image:
    """Draw one herbarium sheet.

    Args:
        look: the species' fixed appearance.
        institution: paper, colour cast and layout of the contributing herbarium.
        rng: the image's own generator (all randomness of this image comes from it).
        long_edge: image height in pixels (sheets are portrait, width = 0.68 x height).
        difficulty: scale of the intra-class variation (see the module docstring).

    Returns:
        An RGB image, ``long_edge`` pixels high.
    """
    d = float(difficulty)
    height = int(long_edge)
    width = max(1, int(round(height * SHEET_ASPECT)))
    # Small images are drawn at twice the size and reduced: cheap anti-aliasing that keeps
    # thin veins and stems visible after downscaling.
    ss = 2 if height <= 400 else 1
    # Per-photograph white balance and exposure drift around the institution's cast.
    warm, green = rng.normal(0, 0.008 * d), rng.normal(0, 0.004 * d)
    cast = np.asarray(institution.cast) * np.array([1 + warm, 1 + green, 1 - warm]) \
        * (1 + rng.normal(0, 0.015 * d))
    canvas = Canvas(width * ss, height * ss, np.asarray(institution.paper), cast)
    label = _draw_label(canvas, rng, institution, d)
    if rng.random() < 0.3:
        _draw_packet(canvas, rng)
    draw_plant(canvas, look, rng, d)
    _draw_chart(canvas, institution)
    if institution.barcode:
        _draw_barcode(canvas, rng, label)
    image = canvas.image.reduce(ss) if ss > 1 else canvas.image
    return _add_noise(image, rng, d)
