"""Test-time views as one value: ``infer.tta`` and ``infer.tta_space`` parsed once.

The recipe schema checks ``infer.tta`` with :func:`parse_view`; a run, a bundle member or a
command-line override becomes a :class:`Views` once and is passed down to the transforms
(:func:`herbens.data.transforms.build_tta_views`), the decode size, the prediction loop
(:mod:`herbens.infer.loop`) and the stores' descriptions.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Iterable

from herbens.core.errors import HerbensError

VIEW_KINDS = ("center", "hflip", "vflip", "full", "letterbox", "fivecrop", "tencrop", "rrcN")
TTA_SPACES = ("logit", "prob")
_MULTI_CROP_ROWS = {"fivecrop": 5, "tencrop": 10}


def parse_view(name: str) -> tuple[str, float | None, int | None]:
    """``kind[@scale]`` or ``rrcN`` -> ``(kind, scale or None, count or None)``.

    The one parser of test-time view names (the recipe schema checks ``infer.tta`` with it).

    Raises:
        HerbensError: an unknown kind (with the closest known one), a bad or non-positive
            scale, or ``rrc`` without its count.
    """
    kind, _, scale = str(name).partition("@")
    count = None
    if kind.startswith("rrc") and kind[3:].isdigit() and int(kind[3:]) > 0:
        kind, count = "rrc", int(kind[3:])
    elif kind not in VIEW_KINDS[:-1]:
        close = difflib.get_close_matches(kind, VIEW_KINDS, n=1, cutoff=0.5)
        hint = (" (rrc needs its number of crops, e.g. rrc8)" if kind.startswith("rrc") else
                f" (did you mean {close[0]}?)" if close else "")
        raise HerbensError(f"unknown test-time view {name!r}{hint}; known: {', '.join(VIEW_KINDS)}, "
                           f"each optionally @SCALE")
    try:
        value = float(scale) if scale else None
    except ValueError:
        value = -1.0
    if value is not None and not value > 0:
        raise HerbensError(f"test-time view {name!r}: the scale after '@' must be a positive number")
    return kind, value, count


@dataclass(frozen=True)
class View:
    """One parsed view name: ``kind``, the resize ``scale`` after ``@`` and the ``count`` of rrcN."""

    name: str
    kind: str
    scale: float | None = None
    count: int | None = None

    @property
    def row_names(self) -> list[str]:
        """The rows this view gives per image: ``fivecrop`` gives ``fivecrop/0`` .. ``fivecrop/4``."""
        rows = self.count if self.kind == "rrc" else _MULTI_CROP_ROWS.get(self.kind, 1)
        return [self.name] if rows == 1 else [f"{self.name}/{i}" for i in range(rows)]


@dataclass(frozen=True)
class Views:
    """The test-time views of a run or bundle member and how their logits are averaged."""

    items: tuple[View, ...]
    space: str = "logit"

    @classmethod
    def parse(cls, names: Iterable[str], space: str = "logit") -> "Views":
        """Parse view names (``infer.tta``) and ``space`` (``infer.tta_space``).

        Raises:
            HerbensError: no view, an unknown view (:func:`parse_view`) or an unknown space.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise HerbensError("infer.tta: at least one test-time view is needed")
        if space not in TTA_SPACES:
            raise HerbensError(f"infer.tta_space must be logit or prob, got {space!r}")
        return cls(tuple(View(str(name), *parse_view(name)) for name in names), space)

    @classmethod
    def of_recipe(cls, cfg: dict) -> "Views":
        """The views of a validated recipe's ``infer`` section."""
        return cls.parse(cfg["infer"]["tta"], cfg["infer"]["tta_space"])

    @classmethod
    def of(cls, views: "Views | Iterable[str]") -> "Views":
        """``views`` itself when already parsed, else the parsed names (space ``logit``)."""
        return views if isinstance(views, Views) else cls.parse(views)

    @property
    def names(self) -> list[str]:
        return [view.name for view in self.items]

    @property
    def row_names(self) -> list[str]:
        """One name per row the views produce per image (what ``keep_views`` stores)."""
        return [row for view in self.items for row in view.row_names]

    @property
    def num_views(self) -> int:
        """Rows per image the model predicts (a ten-crop counts ten)."""
        return len(self.row_names)

    def with_names(self, names: Iterable[str] | None) -> "Views":
        """These views replaced by ``names`` (a command-line ``--tta``), same space; None keeps them."""
        return self if names is None else Views.parse(names, self.space)

    def with_space(self, space: str | None) -> "Views":
        """The same views averaged in ``space``; None keeps it."""
        if space is None:
            return self
        if space not in TTA_SPACES:
            raise HerbensError(f"infer.tta_space must be logit or prob, got {space!r}")
        return replace(self, space=space)


def view_row_names(names: Views | Iterable[str]) -> list[str]:
    """One name per row the views produce: ``fivecrop`` gives ``fivecrop/0`` .. ``fivecrop/4``."""
    return Views.of(names).row_names
