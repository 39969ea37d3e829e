"""Mixed-precision helpers shared by heads and losses."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str):
    """A region computed in fp32 even inside an autocast block.

    Devices without autocast support (the meta device, used to size models without
    allocating them) get a plain context instead of an error.
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
