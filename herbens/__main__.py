"""``python -m herbens VERB ...`` (and ``accelerate launch -m herbens VERB ...``): the command line."""

import sys

from herbens.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
