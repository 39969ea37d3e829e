"""``herbens recipes``: the shipped recipes at a glance, with each model's size and cost.

For every recipe in ``recipes/`` (files starting with ``_`` are shared parents, not recipes):
its backbone, input size, the resolution its weights were pre-trained at (timm's pretrained
config of the backbone tag), parameters, forward GFLOPs at that size, and the loss of each level.
Models are built on PyTorch's ``meta`` device (shapes only: no memory, no weights, no
download), about a second per recipe. Parameters and FLOPs include the heads at the Herbarium
2022 class counts (:data:`HERBARIUM_2022_CLASSES`), since that is what a recipe trains. Nothing
is cached on disk.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import timm
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from herbens.config import load_config, recipes_dir
from herbens.core.errors import HerbensError
from herbens.models.fused_swinv2 import fused_attention_count
from herbens.models.net import build_model

# Class counts of the home benchmark (Kaggle Herbarium 2022 / NAFlora-1M), used only to size the
# heads for this table; training always takes its counts from the data.
HERBARIUM_2022_CLASSES = {"species": 15501, "genus": 2564, "family": 272}

# A multiply-add counts as 2 FLOPs (the header says so: some papers report MACs as "FLOPs").
COLUMNS = ("name", "backbone", "input (HxW)", "pre-trained at", "params (M)", "fwd GFLOPs (MAC=2)", "losses",
           "speed")


class ClassCounts:
    """A stand-in taxonomy that only knows its class counts (all :func:`build_model` reads).

    Args:
        counts: classes per level, e.g. :data:`HERBARIUM_2022_CLASSES`.
    """

    def __init__(self, counts: dict[str, int]):
        self.counts = dict(counts)

    def num_classes(self, level: str) -> int:
        return int(self.counts[level])


def recipe_paths(folder: Path | None = None) -> list[Path]:
    """Recipe files of ``folder`` (default: the recipe folder, :func:`herbens.config.recipes_dir`),
    sorted by name, without the ``_``-prefixed shared parents."""
    return sorted(p for p in (folder or recipes_dir()).glob("*.yaml") if not p.name.startswith("_"))


def offline_config(cfg: dict) -> dict:
    """A copy of ``cfg`` whose model builds without weights (no download, no local file)."""
    cfg = copy.deepcopy(cfg)
    cfg["model"].update(pretrained=False, pretrained_file=None, compile=False)
    return cfg


def pretrained_hw(backbone: str) -> tuple[int, int] | None:
    """The input ``(height, width)`` the backbone's weights were trained at, from timm's pretrained
    config of its tag (the default tag for a bare name); None when timm has no config (hub names)."""
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(backbone)
    except (RuntimeError, ValueError):
        return None
    if pretrained_cfg is None or not pretrained_cfg.input_size:
        return None
    return int(pretrained_cfg.input_size[1]), int(pretrained_cfg.input_size[2])


def input_hw(cfg: dict) -> tuple[int, int]:
    """The resolved recipe's input ``(height, width)``."""
    height, width = cfg["input"]["size"]
    return height, width


# In-place functions that weight initialisation uses (tensor methods, torch.nn.init, timm's
# trunc_normal_): each returns its first argument with new values and the same shape. On meta
# tensors they change nothing, yet run through slow Python decompositions: skipping them makes a
# meta build 2-6x faster. Shape- or flag-changing in-place methods (resize_, requires_grad_, ...)
# are not in this list and still run.
_META_INIT_METHODS = frozenset({
    "normal_", "uniform_", "fill_", "zero_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_",
    "mul_", "add_", "sub_", "div_", "copy_", "exponential_", "log_normal_", "bernoulli_",
    "random_", "abs_", "sqrt_", "fmod_", "exp_", "log_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_",
    "constant_", "ones_", "zeros_", "orthogonal_", "eye_", "dirac_", "sparse_"})


class _SkipMetaInit(TorchFunctionMode):
    """Turn the data-only in-place methods of ``_META_INIT_METHODS`` into no-ops on meta tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _META_INIT_METHODS:
            # torch.nn.init passes its tensor by keyword.
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build_meta_model(cfg: dict, taxonomy) -> torch.nn.Module:
    """The recipe's :class:`HierarchicalNet` on the meta device (no storage, no weights).

    Args:
        cfg: a resolved recipe; its model is built with ``pretrained`` off.
        taxonomy: anything with ``num_classes(level)`` (a Taxonomy or :class:`ClassCounts`).
    """

    with torch.device("meta"), _SkipMetaInit():
        return build_model(offline_config(cfg), taxonomy)


def count_params(model: torch.nn.Module) -> int:
    """All parameters, trainable or not (meta tensors know their sizes)."""
    return sum(p.numel() for p in model.parameters())


def run_on_zeros(module: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, object]:
    """Run ``module`` on zeros of ``shape`` and count its FLOPs (a multiply-add counts as 2).

    On the meta device first (no storage). A module that cannot run there (an operator with
    no meta kernel) is moved to the CPU with
    uninitialised storage (``to_empty``: no init, no weights) and run for real; only shapes
    and FLOPs are read, so its values do not matter. The module is changed in place (eval
    mode, no gradients, maybe moved to the CPU): pass a throwaway one.

    ``FlopCounterMode`` counts matrix products, convolutions and attention, which dominate;
    element-wise work is not counted (the usual convention of published GFLOPs).

    Returns:
        ``(flops, output)``.

    Raises:
        Exception: whatever the module raises on the CPU too.
    """
    # Gradients off: FlopCounterMode's module tracker hooks every input that requires grad.
    module.eval().requires_grad_(False)
    try:
        return _count(module, torch.zeros(shape, device="meta"))
    except Exception:  # noqa: BLE001 - any meta-device gap: run it for real instead
        module.to_empty(device="cpu")
        return _count(module, torch.zeros(shape))


def _count(module: torch.nn.Module, inputs: torch.Tensor) -> tuple[int, object]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        output = module(inputs)
    return int(counter.get_total_flops()), output


def forward_cost(model: torch.nn.Module, height: int, width: int, trunk_cache: dict | None = None,
                 trunk_key: object = None) -> tuple[int | None, dict[str, int] | None]:
    """FLOPs of one forward pass of one image, and the size of each output.

    The model runs in its parts (trunk, neck, each head) so that one head unable to run on
    the meta device does not force the whole trunk onto the CPU, and so that recipes sharing a
    trunk at the same input size (``trunk_key`` in ``trunk_cache``) count it once.

    Args:
        model: a :class:`HierarchicalNet` (changed in place, see :func:`run_on_zeros`).
        trunk_cache: optional dict reused across calls: ``trunk_key -> (flops, feature shape)``.

    Returns:
        ``(flops, {"embedding": D, "<level>": C_level})``, or ``(None, None)`` if a part fails.
    """
    try:
        if trunk_cache is not None and trunk_key in trunk_cache:
            trunk_flops, feature_shape = trunk_cache[trunk_key]
        else:
            trunk_flops, features = run_on_zeros(model.trunk, (1, 3, height, width))
            feature_shape = tuple(features.shape)
            if trunk_cache is not None:
                trunk_cache[trunk_key] = (trunk_flops, feature_shape)
        total, (embedding, head_in) = run_on_zeros(model.neck, feature_shape)
        sizes = {"embedding": int(embedding.shape[-1])}
        for level, head in model.heads.items():
            flops, logits = run_on_zeros(head, tuple(head_in.shape))
            total += flops
            sizes[level] = int(logits.shape[-1])
    except Exception:  # noqa: BLE001 - the table shows n/a rather than failing
        return None, None
    return trunk_flops + total, sizes


def header_lines(path: Path) -> list[str]:
    """The text of each line of the recipe's leading comment."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def header_comment(path: Path) -> str:
    """The recipe's leading comment without its launch-command line (what it reproduces)."""
    return " ".join(text for text in header_lines(path) if not text.startswith(("accelerate launch", "herbens train")))


# A recipe whose header comment has a line starting with this is listed as experimental; the
# rest of that line says why (what measurement it has not passed).
EXPERIMENTAL = "EXPERIMENTAL:"


def experimental_reason(path: Path) -> str | None:
    """Why the recipe is experimental (its header comment's ``EXPERIMENTAL:`` line), or None."""
    marked = [text for text in header_lines(path) if text.startswith(EXPERIMENTAL)]
    return marked[0][len(EXPERIMENTAL):].strip() if marked else None


def describe_recipe(path: Path, flops: bool = True, classes: dict[str, int] = HERBARIUM_2022_CLASSES,
                    trunk_cache: dict | None = None) -> dict:
    """One row of the table for the recipe at ``path``.

    Args:
        flops: run the counting forward pass (FLOPs and output sizes); False: parameters only.
        classes: classes per level to size the heads.
        trunk_cache: shared across rows so a trunk at a given input size is counted once.

    Returns:
        ``name, file, backbone, input_size [h, w], pretrained_size [h, w] (or None), params,
        params_m, trunk_params, gflops, outputs {"embedding": D, level: C}, levels {level: {head,
        loss, weight}} (``head``: its name; ``loss``: the loss names joined by ``+``),
        fused_attention (the model runs fused SwinV2 attention), compile (model.compile),
        description, experimental`` (why the recipe is experimental, or None); ``gflops`` and
        ``outputs`` are None when not computed.
    """

    cfg = load_config(path)
    model = build_meta_model(cfg, ClassCounts(classes))
    fused = fused_attention_count(model) > 0  # read off the built model: what training will run
    height, width = input_hw(cfg)
    total = count_params(model)
    trunk_params = count_params(model.trunk)
    pretrained = pretrained_hw(cfg["model"]["backbone"])
    flop_count, outputs = None, None
    if flops:
        key = (cfg["model"]["backbone"], json.dumps(cfg["model"]["model_kwargs"], sort_keys=True), height, width)
        flop_count, outputs = forward_cost(model, height, width, trunk_cache, key)
    return {
        "name": cfg["name"],
        "file": str(path),
        "backbone": cfg["model"]["backbone"],
        "input_size": [height, width],
        "pretrained_size": list(pretrained) if pretrained else None,
        "params": total,
        "params_m": round(total / 1e6, 2),
        "trunk_params": trunk_params,
        "gflops": None if flop_count is None else round(flop_count / 1e9, 4),
        "outputs": outputs,
        "levels": {level: {"head": spec["head"]["name"], "loss": loss_names(spec), "weight": spec["weight"]}
                   for level, spec in cfg["levels"].items()},
        "fused_attention": fused,
        "compile": cfg["model"]["compile"],
        "description": header_comment(path),
        "experimental": experimental_reason(path),
    }


def list_recipes(names: list[str] | None = None, flops: bool = True,
                 folder: Path | None = None) -> list[dict]:
    """Rows of :func:`describe_recipe` for every shipped recipe (or only ``names``).

    Raises:
        HerbensError: an unknown name in ``names``, or a recipe that does not load.
    """
    paths = recipe_paths(folder)
    if names:
        by_name = {p.stem: p for p in paths}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise HerbensError(f"unknown recipe(s) {', '.join(unknown)}; shipped: {', '.join(by_name)}")
        paths = [by_name[n] for n in names]
    trunk_cache: dict = {}
    return [describe_recipe(p, flops=flops, trunk_cache=trunk_cache) for p in paths]


def loss_names(level_spec: dict) -> str:
    """A resolved level's losses as ``subcenter_arcface+ce``."""
    return "+".join(node["name"] for node in level_spec["loss"])


def losses_text(levels: dict) -> str:
    """``species=ce genus=ce family=ce`` style summary of :func:`describe_recipe`'s levels."""
    return " ".join(f"{level}={spec['loss']}" for level, spec in levels.items())


def speed_text(row: dict) -> str:
    """``fused-attn compile=trunk`` style summary of the speed options a recipe trains with."""
    parts = (["fused-attn"] if row["fused_attention"] else []) + \
        ([f"compile={'trunk' if row['compile'] == 'trunk' else 'model'}"] if row["compile"] else [])
    return " ".join(parts) or "-"


def gflops_text(gflops: float | None) -> str:
    """GFLOPs with one decimal, more for the tiny demo models, ``n/a`` when unknown."""
    if gflops is None:
        return "n/a"
    return f"{gflops:.1f}" if gflops >= 1 else f"{gflops:.3g}"


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per recipe, columns padded to their widest cell."""
    cells = [COLUMNS]
    for row in rows:
        height, width = row["input_size"]
        pretrained = "x".join(map(str, row["pretrained_size"])) if row["pretrained_size"] else "-"
        name = f"{row['name']} (experimental)" if row["experimental"] else row["name"]
        cells.append((
            name, row["backbone"], f"{height}x{width}", pretrained, f"{row['params_m']:.1f}",
            gflops_text(row["gflops"]), losses_text(row["levels"]), speed_text(row)))
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    numeric = {4, 5}  # right-align the numbers
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    return "\n".join(lines)


def experimental_lines(rows: list[dict]) -> list[str]:
    """One line per experimental recipe of ``rows``: its name and why."""
    return [f"{row['name']} is experimental: {row['experimental']}" for row in rows if row["experimental"]]


def table_note() -> str:
    """The line under the table: what the size and cost columns count."""
    plural = {"species": "species", "genus": "genera", "family": "families"}
    counts = ", ".join(f"{n:,} {plural[level]}" for level, n in HERBARIUM_2022_CLASSES.items())
    return (f"params and GFLOPs include the heads at Herbarium 2022 sizes ({counts}); GFLOPs: one "
            f"forward pass of one image at the input size, a multiply-add counted as 2 FLOPs; pre-trained "
            f"at: the input size of the backbone tag's weights (timm's pretrained config); speed: "
            f"fused-attn = SwinV2 window attention through fused SDPA (model.fused_attention), "
            f"compile = torch.compile of the model or of each trunk block (model.compile).")
