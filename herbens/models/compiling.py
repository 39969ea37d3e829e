"""``model.compile``: torch.compile the whole network or each block of its trunk, in place.

Both modes compile modules in place (``nn.Module.compile``), so the module tree, the
parameters and the state-dict keys stay exactly as they were: no ``_orig_mod.`` prefix reaches
a checkpoint or the final weights, and a deep copy (the EMA model) is an ordinary eager module.

``trunk`` is regional compilation (https://pytorch.org/tutorials/recipes/regional_compilation.html):
the trunk's repeated blocks are compiled one by one; blocks of one class and shape reuse one
compiled graph, so compiling takes a fraction of a whole-model compile, while the stem, the
pooling and the heads stay eager.
"""

from __future__ import annotations

from torch import nn
from torch._dynamo.utils import calculate_time_spent

from herbens.core.errors import HerbensError


def compile_model(model: nn.Module, mode: bool | str, backbone: str) -> int:
    """Compile ``model`` in place as the recipe's ``model.compile`` says.

    Args:
        model: a :class:`~herbens.models.net.HierarchicalNet` (its ``trunk`` is read for ``trunk``).
        mode: ``false`` (nothing), ``true`` (the whole model) or ``"trunk"`` (each trunk block).
        backbone: the model name, for error messages.

    Returns:
        How many modules were compiled (0, 1, or the number of trunk blocks).

    Raises:
        HerbensError: an unknown mode, or ``trunk`` for a trunk without repeated blocks.
    """
    if mode is False or mode is None:
        return 0
    if mode is True:
        model.compile()
        return 1
    if mode != "trunk":
        raise HerbensError(f"model.compile must be false, true or trunk, got {mode!r}")
    blocks = trunk_blocks(model.trunk)
    if not blocks:
        raise HerbensError(f"model.compile=trunk: timm model {backbone!r} exposes no repeated blocks "
                           f"to compile one by one; use model.compile=true (the whole model)")
    for block in blocks:
        block.compile()
    return len(blocks)


def trunk_blocks(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's blocks: the members of its innermost block sequences.

    timm keeps a trunk's blocks in ``nn.Sequential`` / ``nn.ModuleList`` containers whose members
    share one class (``blocks`` of a ViT, ``stages[i].blocks`` of a ConvNeXt, ``layers[i].blocks``
    of a Swin, ``layer1..4`` of a ResNet, ``blocks[i]`` of an EfficientNet). A container counts
    when its members are composite modules (not bare layers such as a ``Linear``); where such
    containers nest, the innermost ones are taken, so a stage list yields the blocks inside it.
    """
    inner = [block for child in trunk.children() for block in trunk_blocks(child)]
    if inner:
        return inner
    if _is_block_sequence(trunk):
        return list(trunk)
    return []


def _is_block_sequence(module: nn.Module) -> bool:
    members = list(module.children())
    return (isinstance(module, (nn.Sequential, nn.ModuleList)) and bool(members)
            and all(type(m) is type(members[0]) for m in members)
            and all(any(True for _ in m.children()) for m in members))


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (forward and backward graphs).

    Compilation is lazy (it happens at the first calls), so the trainer reads this counter
    before and after training; it is Dynamo's own timer, the figure ``torch._dynamo.utils``
    prints in its time report.
    """

    return float(calculate_time_spent().get("total_wall_time", 0.0))
