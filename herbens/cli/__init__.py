"""The `herbens` command line: one module per verb; the only package that knows argparse."""
