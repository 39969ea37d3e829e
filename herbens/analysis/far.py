"""Far unknowns: images that are not herbarium sheets at all, and how often a bundle flags them.

Held-out species (``herbens openset``) are *near* unknowns. A user also feeds a bundle blank
scans, noise, a page of text, a colour chart or a ruler photographed alone, and any photograph;
those are *far* unknowns. :func:`write_far_images` draws ``per_kind`` seeded images of each
kind in :data:`FAR_KINDS` and :func:`package_samples` adds the sample images installed packages
ship (matplotlib's sample data; skimage's when installed; nothing is downloaded).
:func:`far_report` scores them and known sheets with a bundle and reports, per OOD score, the
AUROC (known vs far) and the share of each flagged at the bundle's threshold for that score.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from herbens.analysis.openset import auroc
from herbens.bundle import thresholds as th
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.bundle.predict import block_probabilities
from herbens.core.errors import HerbensError
from herbens.core.fileio import write_json
from herbens.stores.logits import read_logits

FAR_KINDS = ("blank", "noise", "text", "colour_chart", "ruler")
SIZE = (256, 384)  # width, height: a portrait sheet's shape
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _blank(rng) -> Image.Image:
    shade = rng.integers(170, 256)
    tint = rng.integers(-12, 13, size=3)
    return Image.new("RGB", SIZE, tuple(int(np.clip(shade + t, 0, 255)) for t in tint))


def _noise(rng) -> Image.Image:
    if rng.random() < 0.5:
        pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], 3))
    else:  # grey-level gaussian noise around a paper colour
        pixels = np.clip(rng.normal(rng.integers(90, 200), rng.integers(10, 60), (SIZE[1], SIZE[0], 1)), 0, 255)
        pixels = np.repeat(pixels, 3, axis=2)
    return Image.fromarray(pixels.astype(np.uint8))


def _text(rng) -> Image.Image:
    image = Image.new("RGB", SIZE, (250, 250, 245))
    draw = ImageDraw.Draw(image)
    letters = np.array(list(string.ascii_letters + "     "))
    for y in range(12, SIZE[1] - 12, int(rng.integers(12, 20))):
        line = "".join(rng.choice(letters, int(rng.integers(20, 40))))
        draw.text((10, y), line, fill=(20, 20, 20))
    return image


def _colour_chart(rng) -> Image.Image:
    image = Image.new("RGB", SIZE, (30, 30, 30))
    draw = ImageDraw.Draw(image)
    cols, rows = int(rng.integers(3, 7)), int(rng.integers(4, 9))
    w, h = SIZE[0] // cols, SIZE[1] // rows
    for r in range(rows):
        for c in range(cols):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.rectangle([c * w + 3, r * h + 3, (c + 1) * w - 3, (r + 1) * h - 3], fill=colour)
    return image


def _ruler(rng) -> Image.Image:
    image = Image.new("RGB", SIZE, tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    step = int(rng.integers(6, 14))
    for i, y in enumerate(range(0, SIZE[1], step)):
        length = SIZE[0] // (2 if i % 10 == 0 else 4 if i % 5 == 0 else 8)
        draw.line([(0, y), (length, y)], fill=(0, 0, 0), width=2)
        if i % 10 == 0:
            draw.text((length + 4, y - 5), str(i // 10), fill=(0, 0, 0))
    return image


DRAW = {"blank": _blank, "noise": _noise, "text": _text, "colour_chart": _colour_chart, "ruler": _ruler}


def write_far_images(out: Path, per_kind: int = 10, seed: int = 0) -> list[tuple[str, str]]:
    """Draw ``per_kind`` images of every far kind under ``out``; returns ``(path, kind)``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for kind in FAR_KINDS:
        for i in range(per_kind):
            path = out / f"{kind}_{i:02d}.png"
            DRAW[kind](rng).save(path)
            written.append((str(path), kind))
    return written


def package_samples() -> list[tuple[str, str]]:
    """``(path, "sample")`` of the images installed packages ship (no download)."""
    folders = []
    for package, sub in (("matplotlib", "mpl-data/sample_data"), ("skimage", "data")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            folders.append(Path(spec.origin).parent / sub)
    return [(str(p), "sample") for folder in folders if folder.is_dir()
            for p in sorted(folder.rglob("*")) if p.suffix.lower() in SAMPLE_SUFFIXES]


def ood_scores(bundle, paths: list[str], **predict) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every OOD score the bundle can give (higher = more familiar) of the readable ``paths``,
    and their indices."""
    scores, kept = {}, []
    for start, good, probs, _, _ in block_probabilities(bundle, paths, progress=False, **predict):
        if probs is None:
            continue
        kept += [start + int(i) for i in good]
        kinds = [k for k in th.SOFTMAX_OOD_SCORES] + (["knn"] if probs.distance is not None else [])
        for kind in kinds:
            value = -probs.distance if kind == "knn" else th.ood_score(probs.scores, probs.species, kind)
            scores.setdefault(kind, []).append(np.asarray(value, dtype=np.float64))
    return {k: np.concatenate(v) for k, v in scores.items()}, kept


def far_report(bundle, known: list[str], far: list[tuple[str, str]], **predict) -> dict:
    """Per OOD score: AUROC (known vs far), and the share of known, far and each far kind
    flagged at the bundle's threshold for that score."""
    known_scores, _ = ood_scores(bundle, known, **predict)
    far_scores, kept = ood_scores(bundle, [p for p, _ in far], **predict)
    if not known_scores or not far_scores:
        raise HerbensError("far-unknown report: no known or no far image could be read")
    kinds = np.array([far[i][1] for i in kept])
    thresholds = dict(bundle.record["thresholds"].get("ood_thresholds") or {})
    thresholds[bundle.ood_score] = bundle.thresholds["ood"]
    report = {"bundle": str(bundle.path), "decision_score": bundle.ood_score, "known_images": len(known),
              "far_images": len(kept), "far_kinds": {k: int((kinds == k).sum()) for k in dict.fromkeys(kinds)},
              "scores": {}}
    for score, values in far_scores.items():
        threshold = thresholds.get(score)
        entry = {"auroc": auroc(known_scores[score], values), "threshold": threshold}
        if threshold is not None:
            entry["known_flagged"] = float((known_scores[score] < threshold).mean())
            entry["far_flagged"] = float((values < threshold).mean())
            entry["far_flagged_by_kind"] = {k: float((values[kinds == k] < threshold).mean())
                                            for k in report["far_kinds"]}
        report["scores"][score] = entry
    return report


def open_set_far(report: dict, workdir: Path, per_kind: int = 10, seed: int = 0, log=print) -> dict:
    """``herbens openset``'s far unknowns beside its near ones: the open-set run exported as a
    bundle (``workdir/far/bundle``, OOD thresholds fitted on its known validation images) scores
    its known validation sheets and the far set (``workdir/far/images`` and the package samples).
    The known share is in sample (the thresholds' own images). Adds ``far`` to the report and
    to ``<run>/openset.json``."""
    run_dir = Path(report["run"])
    bundle = load_bundle(export_bundle(run_dir, workdir / "far" / "bundle", overwrite=True, log=lambda _: None))
    meta = pd.read_csv(workdir / "data" / "train_metadata.csv", dtype={"image_id": str})
    path_of = dict(zip(meta["image_id"], meta["file_name"]))
    known = [path_of[i] for i in read_logits(run_dir, "val").image_ids]
    far = write_far_images(workdir / "far" / "images", per_kind, seed) + package_samples()
    report = {**report, "far": far_report(bundle, known, far)}
    write_json(run_dir / "openset.json", report)
    log(format_far(report["far"]))
    return report


def format_far(report: dict) -> str:
    """The printed table: one row per OOD score."""
    kinds = ", ".join(f"{n} {k}" for k, n in report["far_kinds"].items())
    lines = [f"far unknowns ({report['far_images']} images: {kinds}) vs {report['known_images']} known sheets; "
             f"the bundle decides with {report['decision_score']}",
             f"{'score':<8}{'AUROC':>7}{'far flagged':>13}{'known flagged':>15}   worst far kind"]
    for score, e in report["scores"].items():
        if e["threshold"] is None:
            lines.append(f"{score:<8}{e['auroc']:>7.3f}{'-':>13}{'-':>15}   (no stored threshold)")
            continue
        worst = min(e["far_flagged_by_kind"].items(), key=lambda kv: kv[1])
        lines.append(f"{score:<8}{e['auroc']:>7.3f}{100 * e['far_flagged']:>12.1f}%{100 * e['known_flagged']:>14.1f}%"
                     f"   {worst[0]} {100 * worst[1]:.0f} %")
    return "\n".join(lines)
