"""CLIP-family trunks (OpenAI CLIP, open_clip, BioCLIP): heads initialised from class names.

The image tower is an ordinary timm ViT (``vit_*_clip_*``): timm's own ``checkpoint_filter_fn``
converts an open_clip / OpenAI checkpoint's ``visual.*`` keys (``model.pretrained_file``), so
nothing here loads image weights. With ``model.clip_embed_dim`` set, the trunk keeps CLIP's image
projection as timm's ``head`` (a ``Linear`` whose bias timm's conversion sets to zero), so the
trunk outputs CLIP's joint image embedding, the space the text tower's embeddings live in.

What timm lacks is the text tower. :func:`init_text_heads` builds the open_clip model of the
same checkpoint (``model.open_clip_model`` names its architecture), encodes one prompt per class
(``text_heads.template`` filled with the class's taxonomic names) and copies the normalised
text embeddings into cosine heads with ``scale = exp(logit_scale)``: such a head's logits are
exactly CLIP's zero-shot logits, ``exp(logit_scale) * cos(image, text)``.
"""

from __future__ import annotations

import copy
import string

import torch
from torch import nn

from herbens.core.errors import HerbensError
from herbens.core.progress import progress_bar


def load_open_clip(model_name: str, checkpoint: str | None):
    """The open_clip model (both towers) and tokenizer of a local checkpoint, offline.

    Args:
        model_name: an open_clip architecture (``ViT-B-16``, ``ViT-L-14``, or one registered
            with ``open_clip.add_model_config``) or ``local-dir:/folder`` holding
            ``open_clip_config.json`` and the weights (a downloaded BioCLIP hub repository).
        checkpoint: the weights file for an architecture name (ignored for ``local-dir:``).
    """
    try:
        import open_clip  # the clip extra: lazy so herbens imports without it
    except ImportError:
        raise HerbensError("text_heads needs open-clip-torch: pip install open-clip-torch") from None
    pretrained = None if model_name.startswith("local-dir:") else checkpoint
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise HerbensError(f"could not build open_clip model {model_name!r} from {checkpoint}: {exc}") from exc
    return model.eval(), tokenizer


# The fields a prompt template may use for each level's classes: its own name and those above it.
PROMPT_FIELDS = {"species": ("name", "species", "genus", "family"), "genus": ("name", "genus", "family"),
                 "family": ("name", "family")}


def template_error(template: str, level: str) -> str | None:
    """Why ``template`` cannot be filled for the classes of ``level``, or None when it can."""
    known = PROMPT_FIELDS[level]
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        return f"malformed ({exc})"
    for field in fields:
        if field not in known:  # also a positional {} and attribute or index access
            return f"field {field!r} is not known for {level} (known: {', '.join(known)})"
    return None


def class_prompts(taxonomy, level: str, template: str) -> list[str]:
    """One prompt per class of ``level``, in the taxonomy's class order.

    ``template`` is a ``str.format`` pattern with ``{name}`` (the class's own name: the
    scientific name of a species, the genus, the family; also as ``{species}``, ``{genus}`` or
    ``{family}``) and the names above it: ``{genus}`` and ``{family}`` for species,
    ``{family}`` for genera.
    """
    error = template_error(template, level)
    if error:
        raise HerbensError(f"text_heads.template {template!r}: {error}")
    names = taxonomy.level_names(level)
    fields = [{"name": name, level: name} for name in names]
    if level in ("species", "genus"):
        # The family (and genus) of each class, read through its first species.
        species_of = {}
        for species, index in enumerate(taxonomy.level_map(level)):
            species_of.setdefault(int(index), species)
        genus_of, family_of = taxonomy.level_map("genus"), taxonomy.level_map("family")
        for index, row in enumerate(fields):
            species = species_of[index]
            row["family"] = taxonomy.family_names[family_of[species]]
            if level == "species":
                row["genus"] = taxonomy.genus_names[genus_of[species]]
    return [template.format(**row) for row in fields]


@torch.no_grad()
def text_embeddings(clip_model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text-tower embeddings ``[len(prompts), D]`` (fp32, CPU)."""
    out = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc="encode class names", unit="batch"):
        tokens = tokenizer(prompts[start:start + batch_size])
        out.append(clip_model.encode_text(tokens, normalize=True).float())
    return torch.cat(out)


def init_text_heads(net: nn.Module, cfg: dict, taxonomy) -> dict[str, float]:
    """Initialise the heads of ``text_heads.levels`` from the text tower of the trunk's checkpoint.

    Each head must be a cosine head on the trunk's projected output (neck ``none``): its weight
    rows become the normalised text embeddings of the class prompts and its scale becomes
    ``exp(logit_scale)``, so before training its logits equal CLIP's zero-shot logits.

    Returns:
        ``{level: scale}``, the scale given to each head (to be kept in the run's config, since
        a cosine head's scale is a constructor argument, not a saved weight).
    """
    spec = cfg["text_heads"]
    if not spec["levels"]:
        return {}
    # The recipe's rules (herbens.config.rules) already require cosine heads, neck none,
    # clip_embed_dim, open_clip_model and the checkpoint.
    model_cfg = cfg["model"]
    clip_model, tokenizer = load_open_clip(model_cfg["open_clip_model"], model_cfg["pretrained_file"])
    scale = float(clip_model.logit_scale.detach().exp().reshape(-1)[0])
    scales = {}
    for level in spec["levels"]:
        head = net.heads[level]
        emb = text_embeddings(clip_model, tokenizer, class_prompts(taxonomy, level, spec["template"]),
                              int(spec["batch_size"]))
        if emb.shape != head.weight.shape:
            raise HerbensError(f"text_heads: the text tower gives {emb.shape[1]}-d embeddings but levels.{level}'s "
                               f"head expects {head.weight.shape[1]} (model.clip_embed_dim)")
        with torch.no_grad():
            head.weight.copy_(emb.to(head.weight))
        head.scale = scale
        scales[level] = scale
    return scales


def with_text_head_scales(cfg: dict, scales: dict[str, float]) -> dict:
    """A copy of ``cfg`` whose text-initialised heads carry their scale in their head node
    (``levels.<level>.head.scale``), so a model rebuilt from the run's config (inference,
    export) gives the same logits."""
    cfg = copy.deepcopy(cfg)
    for level, scale in scales.items():
        cfg["levels"][level]["head"]["scale"] = float(scale)
    return cfg


def text_head_scales(cfg: dict) -> dict[str, float]:
    """``{level: head scale}`` of the text-initialised levels of a resolved config."""
    return {level: cfg["levels"][level]["head"]["scale"] for level in cfg["text_heads"]["levels"]
            if level in cfg["levels"]}
