"""Is a pretrained trunk's download possible? Asked once, before timm asks the hub.

Offline, the hub client retries each download for about a minute ("Retrying in Ns") before
it gives up; a recipe that needs weights it cannot get should fail in seconds instead and say
what to do. Weights already in the local hub or torch cache need no network.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg

from herbens.core.errors import HerbensError

HUB_HOST = "huggingface.co"
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
PROBE_SECONDS = 5.0  # one connection attempt; not a retry loop
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def weight_source(backbone: str) -> tuple[str | None, str | None, str | None]:
    """``(hub repo, url, host)`` timm would download ``backbone``'s weights from (None: unknown)."""
    if backbone.startswith("hf-hub:"):
        return backbone[len("hf-hub:"):].split("@")[0], None, HUB_HOST
    cfg = get_pretrained_cfg(backbone)
    if cfg is None:
        return None, None, None
    if cfg.hf_hub_id:
        return cfg.hf_hub_id, None, HUB_HOST
    return None, cfg.url or None, (urlparse(cfg.url).hostname if cfg.url else None)


def is_cached(repo: str | None, url: str | None) -> bool:
    """Whether the weights are already in the hub cache (any usual file name) or torch's."""
    if repo is not None and any(isinstance(try_to_load_from_cache(repo, name), str) for name in HUB_FILES):
        return True
    return url is not None and (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()


def check_weights_reachable(backbone: str) -> None:
    """Raise at once when ``backbone``'s pretrained weights are neither cached nor reachable.

    Raises:
        HerbensError: naming the host and offering ``model.pretrained_file`` and
            ``model.pretrained=false``.
    """
    repo, url, host = weight_source(backbone)
    if host is None or is_cached(repo, url) or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return  # unknown source, cached, or behind a proxy this probe cannot judge: timm decides
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and repo is not None:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            socket.create_connection((host, 443), timeout=PROBE_SECONDS).close()
            return
        except OSError as exc:
            reason = f"{host} cannot be reached: {exc}"
    raise HerbensError(f"model.pretrained: the weights of {backbone!r} are not cached and {reason}. "
                       "Use a local copy with model.pretrained_file=PATH (.pth/.safetensors), or train "
                       "from scratch with model.pretrained=false")
