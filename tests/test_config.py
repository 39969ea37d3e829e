"""Recipe loading: defaults chains, overrides, unknown keys, dropped levels."""

import pytest
import yaml

from herbens.config import BASE_RECIPE, apply_overrides, load_config, parse_override
from herbens.errors import HerbensError


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_inherits_base_and_overrides_apply(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"defaults": str(BASE_RECIPE), "train": {"epochs": 3}})
    cfg = load_config(recipe, ["train.batch_size=7", "optimizer.lr=0.5", "input.size=[64,48]"])
    assert cfg["train"]["epochs"] == 3
    assert cfg["train"]["batch_size"] == 7
    assert cfg["optimizer"]["lr"] == 0.5
    assert cfg["input"]["size"] == [64, 48]
    assert cfg["name"] == "r"  # defaults to the recipe stem
    assert cfg["seed"] == yaml.safe_load(BASE_RECIPE.read_text())["seed"]


def test_chained_defaults_and_free_form_params(tmp_path):
    parent = write(tmp_path / "parent.yaml", {"defaults": str(BASE_RECIPE),
                                             "levels": {"species": {"loss": "seesaw", "loss_params": {"p": 0.5}}}})
    child = write(tmp_path / "child.yaml", {"defaults": "parent.yaml",
                                           "levels": {"species": {"loss_params": {"q": 1.0}}}})
    cfg = load_config(child)
    assert cfg["levels"]["species"]["loss"] == "seesaw"
    # Free-form blocks are replaced whole, not merged: a child states its loss's parameters.
    assert cfg["levels"]["species"]["loss_params"] == {"q": 1.0}


@pytest.mark.parametrize("data, key", [
    ({"train": {"epoch": 3}}, "train.epoch"),
    ({"modle": {}}, "modle"),
    ({"levels": {"species": {"haed": "linear"}}}, "levels.species.haed"),
])
def test_unknown_keys_in_recipe_are_errors(tmp_path, data, key):
    recipe = write(tmp_path / "r.yaml", {"defaults": str(BASE_RECIPE), **data})
    with pytest.raises(HerbensError, match=key.replace(".", r"\.")):
        load_config(recipe)


def test_unknown_override_is_an_error(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"defaults": str(BASE_RECIPE)})
    with pytest.raises(HerbensError, match=r"train\.epochz"):
        load_config(recipe, ["train.epochz=2"])
    with pytest.raises(HerbensError, match="key=value"):
        load_config(recipe, ["train.epochs"])


def test_level_can_be_dropped_but_species_is_required(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"defaults": str(BASE_RECIPE), "levels": {"family": None}})
    assert set(load_config(recipe)["levels"]) == {"species", "genus"}
    with pytest.raises(HerbensError, match="species"):
        load_config(recipe, ["levels.species=null"])


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(HerbensError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(HerbensError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.b=x"]) == {"a": {"b": "x"}}


def test_every_base_key_has_a_comment():
    # The base recipe is the documentation of every option: each key line carries a comment,
    # except mapping headers and the per-level blocks (documented once above them).
    for number, line in enumerate(BASE_RECIPE.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        if line.startswith("    ") and not line.startswith("      "):
            continue  # levels.<level>.* entries repeat the species block's documentation
        assert "#" in line, f"_base.yaml line {number} has no comment: {line!r}"
