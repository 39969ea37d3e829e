"""Progress bars, drawn in one place: a redrawn bar on a terminal, plain lines in a log.

tqdm turns itself off when stderr is not a terminal (``disable=None``) or redraws one line with
carriage returns, which a log file or a CI console shows as one endless line. Off a terminal,
:func:`progress_bar` writes one plain line at start, at most every ``LOG_INTERVAL_S`` seconds,
and one at the end, so a long ``predict`` or ``check`` in a pipeline still says how far it got.
"""

from __future__ import annotations

import sys
from typing import IO, Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 10.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A stream that writes each tqdm redraw as a plain line of its own."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():  # tqdm clears a line by writing spaces
                self.stream.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, leave: bool = False, initial: int = 0, stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand); nothing at all when not ``enabled``.

    Args:
        leave: keep the finished bar on a terminal (a log always keeps its last line).
        stream: where to draw (default: stderr, read at call time so tests can capture it).
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream,
                    dynamic_ncols=True)
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=True, file=_Lines(stream),
                mininterval=LOG_INTERVAL_S, miniters=1, bar_format=LOG_FORMAT)
