"""What the bundle says about its ONNX graphs: the extra they need (checked before any work)
and the model card's description of each graph (input, outputs, preprocessing, what is not in it)."""

from __future__ import annotations

import importlib.util

from herbens.core.errors import HerbensError

ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")  # setup.cfg's onnx extra


def check_onnx_extra() -> None:
    """Refuse ``--onnx`` before any work when its extra is not installed."""
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise HerbensError(f"--onnx needs {', '.join(missing)} (the onnx extra): pip install -e '.[onnx]' in a "
                           "herbens clone, or pip install 'herbens[onnx]'")


def onnx_section(members: list[dict]) -> list[str]:
    """Model-card lines describing each member's ONNX graph (none when exported without)."""
    graphs = [(m, m["onnx"]) for m in members if m.get("onnx")]
    if not graphs:
        return []
    lines = ["## ONNX graphs", "",
             "Each `members/<member>/model.onnx` is one member's network alone. Input `images`: float32 "
             "`[batch, 3, H, W]`, RGB resized with the member's interpolation, centre-cropped by its crop_pct, "
             "scaled to [0, 1] and normalised with its mean and std (`data_config.json`). Outputs: one logits "
             "tensor per level, `[batch, classes]`, columns in the order of `taxonomy.json` (the trained rows "
             "of `names.csv`).", "",
             "| member | exporter | input | outputs | interpolation | crop_pct | mean | std |",
             "|---|---|---|---|---|---|---|---|"]
    for m, g in graphs:
        lines.append(f"| {m['name']} | {g['exporter']} | 3x{m['input_size'][1]}x{m['input_size'][2]} | "
                     f"{', '.join(g['outputs'])} | {g['interpolation']} | {g['crop_pct']} | "
                     f"{', '.join(f'{v:.3f}' for v in g['mean'])} | {', '.join(f'{v:.3f}' for v in g['std'])} |")
    lines += ["", "Not in the graphs: the test-time views and their averaging, the combination of members "
              "(weights, temperatures, prior correction, genus/family terms), enrolled species' prototypes "
              "and every threshold (back-off, OOD). `herbens predict` applies them; a graph alone gives one "
              "member's raw logits.", ""]
    return lines
