"""Component nodes: a head, loss, neck or sampler written as ``{name: ..., **params}``.

A component's parameters, their types and their defaults are declared once, by its own
constructor: this module reads them from the constructor's signature (through a pydantic
model built from it), so a recipe can only name parameters the component takes, with values of
the right type, and every parameter it leaves out is filled with the component's own default.
A cheap probe construction (a few classes, tiny sizes) then runs the constructor's own range
checks at load time, long before the real model is built.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from functools import lru_cache
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import PydanticCustomError

import herbens.data.samplers  # noqa: F401 (registers the samplers)
import herbens.losses  # noqa: F401 (registers the losses)
import herbens.models.net  # noqa: F401 (registers the heads and necks)
from herbens.core.errors import HerbensError
from herbens.core.registry import components

# Constructor arguments the trainer supplies (sizes, labels, rank), not the recipe.
_SUPPLIED = {
    "head": ("self", "in_dim", "num_classes"),
    "loss": ("self", "level", "num_classes", "counts"),
    "neck": ("self", "in_dim"),
    "sampler": ("self", "labels", "seed", "num_replicas", "rank", "num_samples", "num_batches"),
}


def registry(kind: str):
    """Name -> class of the registered components of ``kind`` (:func:`herbens.core.registry.register`);
    the built-in ones are registered by the imports above."""
    return components(kind)


def params_model(kind: str, name: str) -> type[BaseModel]:
    """A pydantic model of the parameters of component ``name``, from its constructor."""
    return _params_model(kind, registry(kind)[name])


@lru_cache(maxsize=None)
def _params_model(kind: str, cls: type) -> type[BaseModel]:
    # Cached per class, not per name: a name registered again (a test's toy loss) is read afresh.
    name = cls.__name__
    hints = typing.get_type_hints(cls.__init__)
    fields = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in _SUPPLIED[kind] or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    return create_model(f"{kind}_{name}", __config__=ConfigDict(extra="forbid"), **fields)


def node_error(subpath: str, message: str) -> PydanticCustomError:
    """An error pydantic reports at the node's key path, ``subpath`` (``.p``, ``[1]``) appended."""
    return PydanticCustomError("herbens_node", "{message}", {"message": message, "subpath": subpath})


def suggestion(name: str, known) -> str:
    """``" (did you mean X?)"`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def resolve_node(kind: str, value: Any, subpath: str = "", weighted: bool = False) -> dict:
    """``name`` or ``{name, **params}`` -> ``{name, [weight,] **every parameter}``.

    Raises:
        PydanticCustomError: unknown name or parameter, a parameter of the wrong type, or a
            value the component's constructor refuses; the message says which.
    """
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise node_error(subpath, f"must be a {kind} name or a mapping with a 'name' key, got {value!r}")
    known = registry(kind)
    name = value["name"]
    if name not in known:
        raise node_error(subpath + ".name", f"unknown {kind} {name!r}{suggestion(name, known)}; "
                                            f"known: {', '.join(known)}")
    params = {k: v for k, v in value.items() if k != "name" and not (weighted and k == "weight")}
    try:
        checked = params_model(kind, name)(**params).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        accepted = ", ".join(params_model(kind, name).model_fields) or "none"
        message = (f"{kind} {name} takes no parameter {where!r} (accepted: {accepted})"
                   if first["type"] == "extra_forbidden" else
                   with_value(lowercase(first["msg"]), first.get("input")))
        raise node_error(f"{subpath}.{where}", message) from None
    _probe(kind, name, checked, subpath)
    node = {"name": name}
    if weighted:
        weight = value.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise node_error(subpath + ".weight", f"must be a number >= 0, got {weight!r}")
        node["weight"] = float(weight)
    return {**node, **checked}


def resolve_losses(value: Any) -> list[dict]:
    """One loss node or a list of weighted ones -> always a list of full nodes."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise node_error("", "needs at least one loss")
    return [resolve_node("loss", item, f"[{i}]" if isinstance(value, list) else "", weighted=True)
            for i, item in enumerate(items)]


def _probe(kind: str, name: str, params: dict, subpath: str) -> None:
    """Build the component at tiny sizes so its constructor's own range checks run now."""
    cls = registry(kind)[name]
    try:
        if kind == "head":
            cls(4, 3, **params)
        elif kind == "loss":
            cls(level="species", num_classes=3, counts=[1, 2, 3], **params)
        elif kind == "neck":
            cls(4, **params)
        else:  # a sampler needs labels: as many classes as a P x K batch asks for
            classes = params.get("classes_per_batch", 1)
            cls(np.arange(max(1, classes)), 0, **params)
    except (HerbensError, ValueError, TypeError) as exc:
        raise node_error(subpath, f"{kind} {name}: {exc}") from None


def lowercase(message: str) -> str:
    """pydantic's ``Input should be ...`` as ``must be ...``."""
    for prefix, repl in (("Input should be", "must be"), ("Value error, ", "")):
        if message.startswith(prefix):
            message = repl + message[len(prefix):]
    return message[:1].lower() + message[1:]


def with_value(message: str, value: Any) -> str:
    """``message, got VALUE``; ``message (VALUE)`` when pydantic's message already says what it
    got (``must be a valid integer, got a number with a fractional part``)."""
    return f"{message} ({value!r})" if ", got " in message else f"{message}, got {value!r}"
