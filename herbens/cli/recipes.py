"""``herbens recipes [NAME ...]``: the shipped recipes with model size, cost and losses."""

from __future__ import annotations

import argparse
import json

from herbens.config.catalogue import experimental_lines, format_table, list_recipes, table_note


def run(args: argparse.Namespace) -> int:
    rows = list_recipes(args.names or None, flops=not args.no_flops)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print(table_note())
        for line in experimental_lines(rows):
            print(line)
    return 0
