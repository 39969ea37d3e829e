"""The one exception type for bad user input."""


class HerbensError(Exception):
    """Bad input or configuration; the message names the file, key or id at fault.

    The command line prints it without a traceback and exits with status 2.
    """
