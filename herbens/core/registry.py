"""One registration mechanism for the components a recipe names: losses, heads, necks, samplers.

A component is a class that registers itself with a decorator, as timm's ``register_model``::

    @register("loss")                      # under its ``name`` class attribute
    class FocalLoss(LevelLoss):
        name = "focal"
        supports_soft_targets = False      # what it needs, declared on the class ...

    @register("loss", "focal2", supports_soft_targets=False)   # ... or in the decorator

Its recipe parameters are its constructor's keywords (:mod:`herbens.config.components`), and
what it needs of the rest of the recipe (a head kind, class batches, hard labels) is read
from its class attributes by one check, :func:`herbens.config.rules.check_rules`. A
declaration in the decorator must name an attribute the class (or its base) already has, so
a misspelt need fails at import instead of being ignored.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from herbens.core.errors import HerbensError

KINDS = ("head", "loss", "neck", "sampler")

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


def _known_kind(kind: str) -> dict[str, type]:
    if kind not in _REGISTRY:
        raise HerbensError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
    return _REGISTRY[kind]


def register(kind: str, name: str | None = None, **declared) -> Callable[[type], type]:
    """Class decorator: make the class the ``kind`` component called ``name``.

    Args:
        kind: one of :data:`KINDS`.
        name: the name recipes use; default the class's ``name`` attribute. Stacking the
            decorator registers one class under several names (``sqrt`` and ``power``).
        **declared: needs of the component, set as class attributes (each must already exist
            on the class or its base, e.g. ``supports_soft_targets``, ``requires_head``).

    Raises:
        HerbensError: unknown kind, no name, a name taken by another class, or a declared
            need the class does not have.
    """
    entries = _known_kind(kind)

    def decorate(cls: type) -> type:
        key = name if name is not None else getattr(cls, "name", None)
        if not isinstance(key, str) or not key or key == "?":
            raise HerbensError(f"{cls.__qualname__}: a {kind} needs a name (register({kind!r}, 'NAME') "
                               "or a 'name' class attribute)")
        unknown = [attr for attr in declared if not hasattr(cls, attr)]
        if unknown:
            raise HerbensError(f"{kind} {key}: {cls.__qualname__} has no attribute(s) {', '.join(unknown)} "
                               "to declare")
        old = entries.get(key)
        # The same class again (its module imported twice, or reloaded) replaces itself.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise HerbensError(f"{kind} {key!r} is already registered by {old.__module__}.{old.__qualname__}")
        for attr, value in declared.items():
            setattr(cls, attr, value)
        entries[key] = cls
        return cls

    return decorate


def unregister(kind: str, name: str) -> None:
    """Remove a component (a test's own, once it is done); unknown names are ignored."""
    _known_kind(kind).pop(name, None)


def components(kind: str) -> Mapping[str, type]:
    """Name -> class of every registered ``kind`` component, in registration order (a live,
    read-only view: components registered later appear in it)."""
    return MappingProxyType(_known_kind(kind))
