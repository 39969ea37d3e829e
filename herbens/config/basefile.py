"""``recipes/_base.yaml`` rendered from the schema, so the documented defaults cannot drift.

Regenerate after changing the schema:  python -m herbens.config.basefile > recipes/_base.yaml
(tests/test_config.py fails while the file and the schema differ).
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from herbens.config.schema import Recipe, section_class

HEADER = """\
# Every recipe key with its default and meaning, GENERATED from herbens/config/schema.py
# (python -m herbens.config.basefile > recipes/_base.yaml); do not edit by hand. A recipe names
# this file in `defaults:` and holds only its differences; unknown keys are errors. Override any
# key on the command line:
#   accelerate launch herbens/train.py recipes/X.yaml data.root=/data/h22 train.epochs=2
# Components are nodes: `loss: seesaw` or `loss: {name: seesaw, p: 0.8}` (every parameter the
# node leaves out takes the component's own default), or a list of weighted losses. An override
# that changes a node's name (levels.species.loss=seesaw) starts from that component's defaults;
# levels.species.loss.p=0.5 edits the node. Set a whole level to null to drop it (levels.family=null).
"""

COMMENT_COLUMN = 27


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("\n...").removesuffix("...").strip()


def _render(model: type[BaseModel], overlay: dict, indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    for key, field in model.model_fields.items():
        section = section_class(field.annotation)
        if section is not None:
            if indent == 0:
                lines.append("")
            lines.append(f"{pad}# {field.description}")
            lines.append(f"{pad}{key}:")
            lines += _render(section, {**field.default, **overlay.get(key, {})}, indent + 2)
            continue
        value = overlay.get(key, field.default)
        if indent == 0 and lines and lines[-1].startswith(" "):
            lines.append("")  # a top-level key after a section
        text = f"{pad}{key}: {_flow(value)}"
        lines.append(f"{text.ljust(COMMENT_COLUMN - 1)} # {field.description}")
    return lines


def render_base_yaml() -> str:
    """The text of ``recipes/_base.yaml``: every key of :class:`Recipe`, default and comment."""
    return HEADER + "\n".join(_render(Recipe, {}, 0)) + "\n"


if __name__ == "__main__":
    print(render_base_yaml(), end="")
