"""Launch facts and precision: what every process needs to know about where it runs.

Shared by training, inference and prediction (several processes on GPUs or CPUs alike).
"""


from __future__ import annotations

import contextlib
import os

import torch
from accelerate import PartialState

from herbens.core.errors import HerbensError


def launched_on_cpus_only() -> bool:
    """Whether this process is one of several started without any GPU (torchrun on CPUs).

    Accelerate forms a multi-CPU (gloo) process group only when it is told ``cpu=True``;
    ``accelerate launch --cpu`` says so through ACCELERATE_USE_CPU, but plain ``torchrun`` does
    not, and every rank would then train alone, all writing the same run directory.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world_size > 1 and not torch.cuda.is_available()


def check_precision(precision: str, cpu: bool) -> None:
    """Refuse ``train.precision=fp16`` on a CPU, where Accelerate would silently train in fp32.

    Asked of Accelerate's process state before the Accelerator exists, whose mixed precision
    cannot change once set in a process.
    """

    if precision == "fp16" and PartialState(cpu=cpu).device.type == "cpu":
        raise HerbensError("train.precision=fp16 needs a GPU: this process runs on the CPU, where Accelerate "
                           "ignores fp16 and trains in fp32; set train.precision=bf16 (CPU autocast) or no")

def autocast_off(device_type: str):
    """A region computed in fp32 even inside an autocast block.

    Devices without autocast support (the meta device, used to size models without
    allocating them) get a plain context instead of an error.
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
