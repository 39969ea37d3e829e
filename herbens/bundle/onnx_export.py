"""One ONNX graph per bundle member, checked against PyTorch with onnxruntime.

``torch.onnx.export`` has two exporters: the dynamo one (``dynamo=True``, torch.export based)
and the TorchScript one. The dynamo exporter is tried first; a backbone it cannot trace falls
back to TorchScript. Either way the graph is run with onnxruntime on a few inputs and refused
unless its logits match PyTorch's.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from herbens.core.errors import HerbensError

ATOL = 1e-3
RTOL = 1e-3


class LevelLogits(torch.nn.Module):
    """The network with one output tensor per level (a graph has no dict outputs)."""

    def __init__(self, model, levels):
        super().__init__()
        self.net = model
        self.levels = tuple(levels)

    def forward(self, images):
        out = self.net(images)
        return tuple(out[level] for level in self.levels)


def check_inputs(data_config: dict, count: int = 3, seed: int = 0):
    """A few normalised image-like inputs ``[count, 3, H, W]`` (seeded)."""
    _, height, width = data_config["input_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, height, width, generator=generator)


def export_onnx(model, levels: list[str], data_config: dict, path: Path) -> str:
    """Write ``path`` and check it; returns the exporter used (``dynamo`` or ``torchscript``).

    Raises:
        HerbensError: when neither exporter produces a graph whose outputs match PyTorch.
    """
    wrapper = LevelLogits(model, levels).eval()
    sample = check_inputs(data_config)
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            _export(wrapper, sample, levels, path, exporter)
            check_onnx(path, wrapper, sample, levels)
            return exporter
        except HerbensError:
            raise
        except Exception as exc:  # noqa: BLE001 - an exporter failing is expected; try the other
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            path.unlink(missing_ok=True)
            for extra in path.parent.glob(path.name + ".data"):
                extra.unlink()
    raise HerbensError(f"{path}: no ONNX exporter handled the model ({'; '.join(errors)})")


def _export(wrapper, sample, levels, path: Path, exporter: str) -> None:
    names = {"input_names": ["images"], "output_names": list(levels)}
    # The exporters print progress ("[torch.onnx] Obtain model graph ...") per member: kept out
    # of herbens' output; a failure still raises with its own message.
    chatter = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(chatter), \
            contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(wrapper, (sample,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"images": {0: batch}}, **names)
        else:
            axes = {name: {0: "batch"} for name in ["images", *levels]}
            torch.onnx.export(wrapper, (sample,), str(path), dynamo=False, dynamic_axes=axes, **names)


def run_onnx(path: Path, images: np.ndarray) -> list[np.ndarray]:
    """Outputs of the graph (one per level) for float32 images ``[n, 3, H, W]``."""
    import onnxruntime  # the onnx extra: lazy so bundles load without it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.astype(np.float32)})


def check_onnx(path: Path, wrapper, sample, levels) -> None:
    """Refuse the graph unless onnxruntime reproduces PyTorch's logits on ``sample``."""
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(sample)]
    got = run_onnx(path, sample.numpy())
    for level, a, b in zip(levels, expected, got):
        if a.shape != b.shape or not np.allclose(a, b, atol=ATOL, rtol=RTOL):
            diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
            raise HerbensError(f"{path}: ONNX {level} logits differ from PyTorch (max |diff| {diff:.3g})")
