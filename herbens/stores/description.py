"""The description of a per-split store (its ``meta.json``) as a typed model.

Every store (logits, embeddings, sparse teacher targets) records the same facts: its ``kind``,
``format_version``, ``split``, the ``taxonomy_hash`` its columns follow, how many rows it was
written for and a digest of their ids, the model and the test-time ``views`` (and
``tta_space``) that produced it, whether ``labels.npy`` is present and which rows hold a
fallback for an unreadable image. Each kind adds the shapes of its matrices and says which
``.npy`` files they are (:meth:`StoreDescription.arrays`).

Keys a caller adds (the teacher's description, a pseudo-run's source, ...) are kept as they
are. Stores written before a field existed still read: a missing ``kind`` is the kind the
reader expects, a missing ``ids`` record skips that check, and a logits store with per-view
matrices that recorded their row names as ``views`` gets them back as ``view_rows``.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from herbens.data.taxonomy import LEVELS

FORMAT_VERSION = 1
FLOAT16 = np.dtype(np.float16)

#: Fallbacks for the rows of unreadable images (``infer.bad_images``): ``prior`` writes each
#: level's training log-prior (softmax = the class frequencies, argmax = the most frequent class).
UNREADABLE_FALLBACKS = ("prior",)

Shape = list[StrictInt]


class IdsRecord(BaseModel):
    """How many images a store was written for, and :func:`herbens.stores.kernel.ids_digest`."""

    model_config = ConfigDict(extra="forbid")
    count: StrictInt = Field(ge=0)
    sha256: StrictStr


class UnreadableRecord(BaseModel):
    """Rows whose image could not be decoded, and the fallback they hold instead."""

    model_config = ConfigDict(extra="forbid")
    ids: list[StrictStr]
    fallback: Literal[UNREADABLE_FALLBACKS]  # type: ignore[valid-type]


class StoreDescription(BaseModel):
    """The fields every store records; subclasses add their matrices' shapes."""

    model_config = ConfigDict(extra="allow")
    KIND: ClassVar[str]
    #: dtype the ``dtype`` field must name (None: the store has several and records none).
    DTYPE: ClassVar[Optional[np.dtype]] = FLOAT16

    kind: StrictStr
    format_version: StrictInt
    split: StrictStr
    taxonomy_hash: StrictStr
    dtype: Optional[StrictStr] = None
    num_rows: Optional[StrictInt] = None
    ids: Optional[IdsRecord] = None
    model: str = ""
    views: list[StrictStr] = []
    tta_space: Optional[Literal["logit", "prob"]] = None
    labels: bool = False
    unreadable: Optional[UnreadableRecord] = None

    def arrays(self, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """File stem -> (shape, dtype) of every matrix the store holds (``rows``: its id count)."""
        raise NotImplementedError

    def columns(self) -> dict[str, int]:
        """Level -> number of classes, for the stores whose columns follow the taxonomy."""
        return {}

    def label_bound(self) -> int | None:
        """Number of species the stored labels index (None: known only from a taxonomy)."""
        return None

    def as_meta(self) -> dict:
        """The JSON object written as ``meta.json`` (unset optional records left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def _check_shape(level: str, shape: list[int], ndim: int, key: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected {', '.join(LEVELS)}")
    if len(shape) != ndim or any(s < 0 for s in shape):
        raise ValueError(f"{key}.{level} = {shape!r} is not a {ndim}-d shape")


def view_names_of_rows(rows: list[str]) -> list[str]:
    """The view names behind per-view row names (``tencrop/0`` .. ``tencrop/9`` -> ``tencrop``)."""
    names: list[str] = []
    for row in rows:
        name = re.sub(r"/\d+$", "", row)
        if not names or names[-1] != name or name == row:
            names.append(name)
    return names


class LogitsDescription(StoreDescription):
    """``levels``: level -> ``[rows, classes]``; ``view_levels``: level -> ``[rows, V, classes]``
    for the per-view matrices, whose rows ``view_rows`` names (one name per view row)."""

    KIND: ClassVar[str] = "logits"
    levels: dict[str, Shape]
    view_levels: Optional[dict[str, Shape]] = None
    view_rows: Optional[list[StrictStr]] = None

    @model_validator(mode="before")
    @classmethod
    def _rows_recorded_as_views(cls, data):
        # Stores written before view_rows existed named the per-view rows in ``views``.
        if isinstance(data, dict) and data.get("view_levels") and "view_rows" not in data:
            rows = list(data.get("views") or [])
            data = {**data, "view_rows": rows, "views": view_names_of_rows(rows)}
        return data

    @model_validator(mode="after")
    def _shapes(self) -> "LogitsDescription":
        for level, shape in self.levels.items():
            _check_shape(level, shape, 2, "levels")
        if "species" not in self.levels:
            raise ValueError(f"no species logits (levels: {', '.join(self.levels)})")
        for level, shape in (self.view_levels or {}).items():
            _check_shape(level, shape, 3, "view_levels")
            if level not in self.levels:
                raise ValueError(f"per-view logits for level {level!r}, which has no logits")
            if shape[2] != self.levels[level][1]:
                raise ValueError(f"{level}.views.npy has {shape[2]} columns but {level}.npy has "
                                 f"{self.levels[level][1]}")
        return self

    def arrays(self, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        out = {lv: (tuple(shape), FLOAT16) for lv, shape in self._in_order(self.levels)}
        out.update({f"{lv}.views": (tuple(shape), FLOAT16) for lv, shape in self._in_order(self.view_levels or {})})
        return out

    def columns(self) -> dict[str, int]:
        return {lv: shape[1] for lv, shape in self._in_order(self.levels)}

    def label_bound(self) -> int | None:
        return self.levels["species"][1]

    @staticmethod
    def _in_order(shapes: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
        return [(lv, shapes[lv]) for lv in LEVELS if lv in shapes]


class EmbeddingsDescription(StoreDescription):
    """``shape``: ``[rows, dim]`` of the unit-norm ``embeddings.npy``."""

    KIND: ClassVar[str] = "embeddings"
    shape: Shape
    normalised: bool = True

    @field_validator("shape")
    @classmethod
    def _rows_by_dim(cls, shape: list[int]) -> list[int]:
        if len(shape) != 2 or shape[0] < 0 or shape[1] <= 0:
            raise ValueError(f"{shape!r} is not [rows, dim > 0]")
        return shape

    def arrays(self, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"embeddings": (tuple(self.shape), FLOAT16)}


class TargetLevel(BaseModel):
    """One level of sparse targets: ``k`` classes kept per row out of ``classes``."""

    model_config = ConfigDict(extra="forbid")
    k: StrictInt = Field(ge=1)
    classes: StrictInt = Field(ge=1)


#: The three matrices of one level of sparse targets and their dtypes.
TARGET_ARRAYS = {"classes": np.dtype(np.int32), "logp": np.dtype(np.float32), "rest": np.dtype(np.float32)}


class TargetsDescription(StoreDescription):
    """``levels``: level -> ``{"k", "classes"}``; per level ``classes``/``logp`` ``[rows, k]``
    and ``rest`` ``[rows]`` (:data:`TARGET_ARRAYS`)."""

    KIND: ClassVar[str] = "sparse_targets"
    DTYPE: ClassVar[Optional[np.dtype]] = None
    levels: dict[str, TargetLevel]

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, levels: dict[str, TargetLevel]) -> dict[str, TargetLevel]:
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown or not levels:
            raise ValueError(f"levels {list(levels)} must be some of {', '.join(LEVELS)}")
        return levels

    def arrays(self, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        out = {}
        for level in (lv for lv in LEVELS if lv in self.levels):
            for name, dtype in TARGET_ARRAYS.items():
                shape = (rows,) if name == "rest" else (rows, self.levels[level].k)
                out[f"{level}.{name}"] = (shape, dtype)
        return out

    def columns(self) -> dict[str, int]:
        return {lv: spec.classes for lv, spec in self.levels.items()}
