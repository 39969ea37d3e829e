"""Few-shot enrolment into bundles: a held-out species enrolled from a few images is named by
``herbens predict``; enrol + unenrol is a byte-identical round trip; the manifest covers the
enrolled files; refusals name what is wrong; nothing enrolled changes no prediction."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import train_tiny
from herbens.analysis.openset import write_open_set_data
from herbens.bundle.enrolment import ENROLLED, enrol_species, unenrol_species
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.cli.main import main
from herbens.config import load_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import lock_path

SHOTS = 3


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A run trained without one species of a tiny synthetic herbarium (with embeddings), its
    bundle, and the held-out species' images. Returns ``(run, bundle, held_images, herbarium)``.

    The planted, easy case: low within-species variation (``difficulty=0.3``), so that even a
    tiny model trained for seconds embeds a species' sheets close together.
    """
    from herbens.data.synth import synthesize

    work = tmp_path_factory.mktemp("enrol")
    herbarium = work / "herbarium"
    synthesize(herbarium, species=6, seed=3, long_edge=64, min_images=8, max_images=14, test_per_species=2,
               progress=False, difficulty=0.3)
    cfg = load_config("demo_ce", [f"data.root={herbarium}"])
    split = write_open_set_data(cfg, work / "data", share=0.2, seed=1)
    assert len(split["held_out_category_ids"]) == 1
    assert train_tiny(work / "data", work / "runs", extra=["name=held", "data.format=csv", "infer.embeddings=true",
                                                           "train.epochs=3"]) == 0
    run = work / "runs" / "held"
    bundle = export_bundle(run, work / "bundles" / "b", log=lambda _: None)
    held = pd.read_csv(work / "data" / "test_metadata.csv")["file_name"].tolist()
    return run, bundle, held, herbarium


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def _shots(images: list[str], folder: Path) -> Path:
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / Path(path).name)
    return folder


def test_enrolled_held_out_species_is_named_by_predict(held_out, tmp_path):
    _, source, held, _ = held_out
    bundle = _copy(source, tmp_path)
    shots = _shots(held[:SHOTS], tmp_path / "shots")
    assert main(["enrol", str(bundle), "--images", str(shots), "--name", "Novum enrolmentum",
                 "--authors", "Test & Al.", "--family", "Novaceae"]) == 0
    loaded = load_bundle(bundle)
    new_id = int(loaded.names.category_id.iloc[-1])
    assert loaded.names.scientific_name.iloc[-1] == "Novum enrolmentum"
    assert new_id == int(loaded.taxonomy.category_ids.max()) + 1
    rest = tmp_path / "rest.txt"
    rest.write_text("\n".join(held[SHOTS:]) + "\n")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(bundle), str(rest), "-o", str(out), "--no-progress"]) == 0
    pred = pd.read_csv(out, keep_default_na=False)
    assert len(pred) == len(held) - SHOTS
    named = pred["category_id_1"] == new_id
    chance = 1 / loaded.names.shape[0]
    assert named.mean() >= max(0.6, 3 * chance), pred[["category_id_1", "probability_1"]]
    row = pred[named].iloc[0]
    assert row["scientific_name_1"] == "Novum enrolmentum" and row["authors_1"] == "Test & Al."
    # The new genus holds only the new species, so it is the top genus wherever the species is;
    # its new family is a column of the family level too (another family's species may outweigh it).
    assert set(pred.loc[named, "genus"]) == {"Novum"}
    assert loaded.level_names("family")[-1] == "Novaceae" and set(pred["family"]) <= set(loaded.level_names("family"))
    assert set(pred["decision"]) <= {"species", "genus", "family", "unknown"}
    # Probabilities over trained + enrolled species sum to one: the top-k of six columns covers them all.
    probs = pred[[f"probability_{j}" for j in range(1, 6)]].to_numpy().sum(axis=1)
    assert (probs <= 1 + 1e-4).all()


def test_enrol_then_unenrol_leaves_the_bundle_byte_identical(held_out, tmp_path):
    _, source, held, _ = held_out
    bundle = _copy(source, tmp_path)
    before = _files(bundle)
    enrol_species(bundle, _shots(held[:1], tmp_path / "one"), "Carex una", family="Cyperaceae", log=lambda _: None)
    enrol_species(bundle, _shots(held[1:3], tmp_path / "two"), "Carex duo", authors="L.", log=lambda _: None)
    middle = _files(bundle)
    assert middle != before and f"{ENROLLED}/species.json" in middle
    assert [e["genus"] for e in load_bundle(bundle).enrolment.species] == ["Carex", "Carex"]
    unenrol_species(bundle, name="Carex una", log=lambda _: None)
    assert [e["scientific_name"] for e in load_bundle(bundle).enrolment.species] == ["Carex duo"]
    assert main(["unenrol", str(bundle), "--name", "Carex duo"]) == 0
    assert _files(bundle) == before
    # No temporaries left (the lock file beside the bundle stays: removing it would race a waiter).
    assert not any(p.name.startswith(".") and p != lock_path(bundle) for p in bundle.parent.iterdir())


def test_manifest_refuses_a_tampered_or_unlisted_enrolled_prototype(held_out, tmp_path):
    _, source, held, _ = held_out
    bundle = _copy(source, tmp_path)
    enrol_species(bundle, _shots(held[:2], tmp_path / "s"), "Carex nova", family="Cyperaceae", log=lambda _: None)
    member = load_bundle(bundle).members[0].name
    path = bundle / ENROLLED / f"{member}.npy"
    original = path.read_bytes()
    vectors = np.load(path)
    np.save(path, -vectors)
    with pytest.raises(HerbensError, match=f"file {ENROLLED}/{member}.npy was altered"):
        load_bundle(bundle)
    path.write_bytes(original)
    (bundle / ENROLLED / "extra.npy").write_bytes(original)
    with pytest.raises(HerbensError, match=f"{ENROLLED}/extra.npy is not in the manifest"):
        load_bundle(bundle)


def test_refusals_name_the_problem(held_out, tmp_path, capsys):
    _, source, held, _ = held_out
    bundle = _copy(source, tmp_path)
    shots = _shots(held[:1], tmp_path / "s")
    trained = load_bundle(bundle).names
    existing = trained.scientific_name.iloc[0]
    with pytest.raises(HerbensError, match=f"{existing} already names category_id {trained.category_id.iloc[0]}"):
        enrol_species(bundle, shots, existing, log=lambda _: None)
    with pytest.raises(HerbensError, match=f"category_id {trained.category_id.iloc[1]} is already taken"):
        enrol_species(bundle, shots, "Carex nova", family="Cyperaceae", category_id=int(trained.category_id.iloc[1]),
                      log=lambda _: None)
    with pytest.raises(HerbensError, match="genus Nogenus is new to it; give its family with --family"):
        enrol_species(bundle, shots, "Nogenus novus", log=lambda _: None)
    genus = load_bundle(bundle).taxonomy.genus_names[0]
    wrong = "Otheraceae"
    genus_family = trained.family[trained.genus == genus].iloc[0]
    with pytest.raises(HerbensError, match=f"genus {genus} belongs to family {genus_family}, not {wrong}"):
        enrol_species(bundle, shots, f"{genus} novus", family=wrong, log=lambda _: None)
    enrol_species(bundle, shots, "Carex nova", family="Cyperaceae", log=lambda _: None)
    with pytest.raises(HerbensError, match="Carex nova already names category_id"):
        enrol_species(bundle, shots, "Carex nova", family="Cyperaceae", log=lambda _: None)
    assert main(["unenrol", str(bundle), "--name", "Carex ignota"]) == 2
    err = capsys.readouterr().err
    assert "scientific_name 'Carex ignota' is not enrolled; enrolled species: Carex nova (" in err
    assert main(["unenrol", str(bundle), "--name", existing]) == 2
    assert "a trained species, which only retraining removes" in capsys.readouterr().err
    assert main(["unenrol", str(bundle), "--category-id", "999999"]) == 2
    assert "category_id 999999 is not enrolled" in capsys.readouterr().err


def test_bundle_without_prototypes_refuses_to_enrol(held_out, tmp_path):
    run, _, held, _ = held_out
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "embeddings")
    bundle = export_bundle(copy, tmp_path / "plain", log=lambda _: None)
    with pytest.raises(HerbensError, match="exported without prototypes.*herbens infer RUN --embeddings"):
        enrol_species(bundle, _shots(held[:1], tmp_path / "s"), "Carex nova", family="Cyperaceae", log=lambda _: None)


def test_nothing_enrolled_predicts_bit_identically(held_out, tmp_path):
    """A bundle with prototypes but nothing enrolled (also after enrol + unenrol) predicts exactly
    what the same run's bundle without prototypes predicts (both msp: without embeddings, the
    plain bundle cannot have the knn score the fixture's bundle has by default)."""
    run, _, held, herbarium = held_out
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "embeddings")
    plain = export_bundle(copy, tmp_path / "plain", log=lambda _: None)
    bundle = export_bundle(run, tmp_path / "bundle", ood_score="msp", log=lambda _: None)
    images = herbarium / "test_images"
    outputs = {}
    for name, target in (("plain", plain), ("prototypes", bundle)):
        outputs[name] = tmp_path / f"{name}.csv"
        assert main(["predict", str(target), str(images), "-o", str(outputs[name]), "--no-progress"]) == 0
    enrol_species(bundle, _shots(held[:1], tmp_path / "s"), "Carex nova", family="Cyperaceae", log=lambda _: None)
    unenrol_species(bundle, name="Carex nova", log=lambda _: None)
    outputs["round_trip"] = tmp_path / "round_trip.csv"
    assert main(["predict", str(bundle), str(images), "-o", str(outputs["round_trip"]), "--no-progress"]) == 0
    data = {name: path.read_bytes() for name, path in outputs.items()}
    assert data["plain"] == data["prototypes"] == data["round_trip"]


def test_ensemble_bundle_enrols_per_member(held_out, tmp_path):
    """Each member of an ensemble bundle gets its own prototype of the enrolled species."""
    from herbens.ensemble.pipeline import ensemble_runs

    run, _, held, _ = held_out
    runs = [tmp_path / "runs" / name for name in ("a", "b")]
    for target in runs:
        shutil.copytree(run, target)
    submission = tmp_path / "ens.csv"
    ensemble_runs(runs, submission, progress=False, log=lambda _: None)
    bundle = export_bundle(submission.with_suffix(".json"), tmp_path / "ens", log=lambda _: None)
    enrol_species(bundle, _shots(held[:SHOTS], tmp_path / "s"), "Novum enrolmentum", family="Novaceae",
                  category_id=5000, log=lambda _: None)
    loaded = load_bundle(bundle)
    assert len(loaded.members) == 2
    assert sorted(p.name for p in (bundle / ENROLLED).iterdir()) == sorted(
        ["species.json"] + [f"{m.name}{suffix}" for m in loaded.members
                            for suffix in (".npy", ".ood_bank.npy", ".ood_bank_owners.npy")])  # OOD banks grow too
    assert [len(p.owners) - len(p.owners[p.owners < loaded.enrolment.num_known]) for p in loaded.enrolment.prototypes] == [1, 1]
    from herbens.bundle.predict import predict_paths

    pred = predict_paths(loaded, held[SHOTS:], progress=False)
    named = loaded.names.category_id.to_numpy()[pred.top_species[:, 0]] == 5000
    assert named.mean() >= 0.6


def test_energy_bundle_refuses_to_enrol(held_out, tmp_path):
    run, _, held, _ = held_out
    bundle = export_bundle(run, tmp_path / "energy", ood_score="energy", log=lambda _: None)
    with pytest.raises(HerbensError, match="enrolment needs the msp or knn OOD score"):
        enrol_species(bundle, _shots(held[:1], tmp_path / "s"), "Carex nova", family="Cyperaceae", log=lambda _: None)


def test_export_cross_fits_the_enrolment_temperatures_and_reports_both(held_out, tmp_path):
    """The head temperature's out-of-fold log-loss is every validation row's loss under the
    temperature fitted without its fold (recomputed here from the combined scores); each
    member's prototype temperature is reported the same way, and the log says which is which."""
    import json
    import math

    from herbens.bundle.export import combined_chunks, resolve_source
    from herbens.core.numerics import stratified_folds

    run = held_out[0]
    lines = []
    bundle = export_bundle(run, tmp_path / "b", log=lines.append)
    setup = json.loads((bundle / "bundle.json").read_text())["enrolment"]
    head = setup["fit"]["head_temperature"]
    assert head["temperature"] == setup["head_temperature"] and head["folds"] >= 2
    [member] = setup["fit"]["prototype_temperatures"].values()
    assert member["temperature"] == next(iter(setup["prototype_temperatures"].values()))
    assert set(member["log_loss"]) == {"in_sample", "out_of_fold"} and member["log_loss"]["out_of_fold"] is not None
    assert any(line.startswith("enrolment: head temperature") and "out-of-fold" in line for line in lines)
    run_dirs, params, _ = resolve_source(run)
    scores, labels = zip(*[(p.scores.astype(np.float64), y) for p, y in combined_chunks(run_dirs, params, "val")])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    fold = stratified_folds(labels).fold

    def loss(row, label, t):
        z = [v / t for v in row]
        return max(z) + math.log(sum(math.exp(v - max(z)) for v in z)) - z[label]

    oof = [loss(scores[r], labels[r], head["fold_choices"][fold[r]]["temperature"]) for r in range(len(labels))]
    ins = [loss(scores[r], labels[r], head["temperature"]) for r in range(len(labels))]
    assert head["log_loss"]["out_of_fold"] == pytest.approx(np.mean(oof), rel=1e-5)
    assert head["log_loss"]["in_sample"] == pytest.approx(np.mean(ins), rel=1e-5)
