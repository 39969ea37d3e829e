"""The one exception type for bad user input."""

import re

# An exception raised in a DataLoader worker reaches the main process rebuilt by torch from one
# string: "Caught HerbensError in DataLoader worker process 0.\nOriginal Traceback ...", the
# worker's whole traceback ending in the original message.
_WORKER_WRAPPER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _original_message(text: str) -> str:
    """The worker's own message out of torch's wrapper text (any other text unchanged)."""
    if not _WORKER_WRAPPER.match(text):
        return text
    lines = text.rstrip("\n").splitlines()
    for i in range(len(lines) - 1, 0, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and not lines[i].startswith(" ") and head.endswith("Error"):
            return "\n".join([rest, *lines[i + 1:]])
    return text


class HerbensError(Exception):
    """Bad input or configuration; the message names the file, key or id at fault.

    The command line prints it without a traceback and exits with status 2. One raised inside a
    DataLoader worker keeps its own message, not the worker's traceback.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_original_message(args[0]),)
        super().__init__(*args)
