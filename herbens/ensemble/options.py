"""What ``herbens ensemble`` fits and how it combines: the checked options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from herbens.core.errors import HerbensError


@dataclass
class EnsembleOptions:
    """What to fit and how to combine; see :func:`herbens.ensemble.pipeline.ensemble_runs`."""

    weights: str | tuple[float, ...] = "fit"
    weight_objective: str = "f1"
    calibrate: bool = True
    tau: str | float = "fit"
    hierarchy: str | tuple[float, float] = "fit"
    mode: str = "mean"
    vote_k: int = 5
    space: str = "logit"
    top_k: int = 0
    chunk_rows: int | None = None
    align_by_category: bool = False

    def check(self, num_runs: int) -> "EnsembleOptions":
        """Normalise and validate; returns self. Bad values raise HerbensError."""
        _one_of("mode", self.mode, ("mean", "vote"))
        _one_of("space", self.space, ("logit", "prob"))
        _one_of("weight objective", self.weight_objective, ("f1", "nll"))
        if isinstance(self.weights, str):
            _one_of("weights", self.weights, ("equal", "fit"))
        else:
            self.weights = _given_weights(self.weights, num_runs)
        self.tau = "none" if self.tau is None else self.tau
        if isinstance(self.tau, str):
            _one_of("tau", self.tau, ("fit", "none"))
        else:
            self.tau = _numbers("tau", [self.tau], 1)[0]
        self.hierarchy = "none" if self.hierarchy is None else self.hierarchy
        if isinstance(self.hierarchy, str):
            _one_of("hierarchy", self.hierarchy, ("fit", "none"))
        else:
            self.hierarchy = tuple(_numbers("hierarchy (alpha, beta)", self.hierarchy, 2))
        if self.vote_k < 1 or (self.chunk_rows is not None and self.chunk_rows < 1):
            raise HerbensError("vote-k and chunk-rows must be at least 1")
        if self.top_k < 0:
            raise HerbensError("top-k must be >= 0")
        return self

    @property
    def needs_val(self) -> bool:
        """Whether anything is fitted on validation (then every run needs labelled val logits)."""
        return (self.calibrate or self.weights == "fit" or self.tau == "fit" or self.hierarchy == "fit")


def _one_of(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise HerbensError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _numbers(name: str, values, count: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise HerbensError(f"{name} must be {count} number(s), not {values!r}") from None
    if len(out) != count or not np.isfinite(out).all():
        raise HerbensError(f"{name} must be {count} finite number(s), not {values!r}")
    return out


def _given_weights(weights, num_runs: int) -> tuple[float, ...]:
    try:
        values = np.asarray([float(w) for w in weights], dtype=np.float64)
    except (TypeError, ValueError):
        raise HerbensError(f"weights must be equal, fit or numbers, not {weights!r}") from None
    if len(values) != num_runs:
        raise HerbensError(f"{len(values)} weights given for {num_runs} runs")
    if (values < 0).any() or not np.isfinite(values).all() or values.sum() <= 0:
        raise HerbensError(f"weights must be finite, >= 0 and not all 0, got {values.tolist()}")
    return tuple((values / values.sum()).tolist())

