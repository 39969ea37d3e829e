"""Every verb's argument parser, grouped by stage; light to import (see herbens.cli.options)."""

from herbens.cli.parsers import analysis, bundle, combine, data, training

# verb -> function adding its sub-parser, in the pipeline's order (as ``herbens --help`` lists them).
PARSERS = {**data.PARSERS, **training.PARSERS, **combine.PARSERS, **analysis.PARSERS, **bundle.PARSERS}
