"""``herbens evaluate`` end to end on tiny synthetic Kaggle files and fake run logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from herbens.analysis.evaluate import argmax_rows, evaluate_inputs, load_solution
from herbens.cli.main import main
from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError

# category_id -> (genus, family, training images)
CATEGORIES = {10: ("Acer", "Sapindaceae", 3), 11: ("Acer", "Sapindaceae", 6),
              20: ("Rhus", "Anacardiaceae", 12), 30: ("Elatine", "Elatinaceae", 25)}
SOLUTION = {"0": 10, "1": 10, "2": 11, "3": 11, "4": 20, "5": 20, "6": 30, "7": 30}
GOOD = {"0": 10, "1": 11, "2": 11, "3": 11, "4": 20, "5": 30, "6": 30, "7": 10}


def write_train_metadata(path: Path) -> Path:
    """A Kaggle 2022 ``train_metadata.json`` in the real layout."""
    genera = sorted({g for g, _, _ in CATEGORIES.values()})
    images, annotations = [], []
    for cid, (genus, _, count) in CATEGORIES.items():
        for j in range(count):
            image_id = f"{cid:05d}__{j:03d}"
            images.append({"image_id": image_id, "file_name": f"000/{cid}/{image_id}.jpg", "license": 0})
            annotations.append({"image_id": image_id, "category_id": cid,
                                "genus_id": genera.index(genus) + 1, "institution_id": 0})
    data = {
        "annotations": annotations,
        "categories": [{"category_id": cid, "scientificName": f"{g} sp{cid}", "authors": "L.",
                        "family": f, "genus": g, "species": f"sp{cid}"}
                       for cid, (g, f, _) in CATEGORIES.items()],
        "genera": [{"genus_id": i + 1, "genus": g} for i, g in enumerate(genera)],
        "distances": [], "images": images,
        "institutions": [{"institution_id": 0, "collectionCode": "X"}], "license": [],
    }
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, rows: dict, header: str = "Id,Predicted") -> Path:
    path.write_text(header + "\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    return path


@pytest.fixture()
def kaggle(tmp_path):
    """Metadata, solution (with Kaggle's Usage column) and a valid submission."""
    meta = write_train_metadata(tmp_path / "train_metadata.json")
    solution = tmp_path / "solution.csv"
    solution.write_text("Id,Predicted,Usage\n" + "".join(
        f"{k},{v},{'Public' if int(k) % 2 else 'Private'}\n" for k, v in SOLUTION.items()))
    good = write_csv(tmp_path / "good.csv", GOOD)
    return tmp_path, meta, solution, good


def test_submission_scores_match_sklearn(kaggle, capsys):
    tmp, meta, solution, good = kaggle
    perfect = write_csv(tmp / "perfect.csv", dict(reversed(list(SOLUTION.items()))))  # any row order
    out = tmp / "scores.json"
    rc = main(["evaluate", str(good), str(perfect), "--solution", str(solution),
               "--metadata", str(meta), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "good" in printed and "perfect" in printed and "Worst" in printed and "ANOVA" in printed
    results = json.loads(out.read_text())["inputs"]
    assert [r["name"] for r in results] == ["good", "perfect"]
    m = results[0]["metrics"]
    ids = list(SOLUTION)
    y_true = [SOLUTION[i] for i in ids]
    y_pred = [GOOD[i] for i in ids]
    assert m["species_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["species_accuracy"] == pytest.approx(5 / 8)
    family = {cid: f for cid, (_, f, _) in CATEGORIES.items()}
    assert m["family_macro_f1"] == pytest.approx(
        f1_score([family[c] for c in y_true], [family[c] for c in y_pred], average="macro"))
    assert m["n_images"] == 8
    assert results[1]["metrics"]["species_macro_f1"] == 1.0


def test_submission_training_counts_leave_the_split_out_and_say_so(kaggle, capsys):
    from herbens.data.splits import save_split

    tmp, meta, solution, good = kaggle
    split = tmp / "split.csv"
    save_split(split, ["00010__000", "00020__000", "00020__001"])  # 1 of sp10, 2 of sp20 held out
    plain = evaluate_inputs([good], solution, meta)[0]["metrics"]
    minus = evaluate_inputs([good], solution, meta, exclude_split=split)[0]["metrics"]
    assert plain["training_counts"] == "all labelled images in the metadata"
    assert minus["training_counts"] == f"metadata minus the validation split {split}"
    train = {r["name"]: r["train_images"] for r in minus["per_genus"]}
    assert train == {"Acer": 3 + 6 - 1, "Rhus": 12 - 2, "Elatine": 25}
    assert main(["evaluate", str(good), "--solution", str(solution), "--metadata", str(meta),
                 "--exclude-split", str(split)]) == 0
    assert f"counts: metadata minus the validation split {split}" in capsys.readouterr().out


@pytest.mark.parametrize("case, rows, header, expected", [
    ("unknown id", {**GOOD, "99": 10}, "Id,Predicted", "99"),
    ("missing id", {k: v for k, v in GOOD.items() if k != "5"}, "Id,Predicted", "5"),
    ("invalid category", {**GOOD, "3": 12345}, "Id,Predicted", "12345"),
    ("wrong header", GOOD, "image_id,category_id", "Id"),
])
def test_bad_submission_raises_naming_the_problem(kaggle, case, rows, header, expected):
    tmp, meta, solution, _ = kaggle
    bad = write_csv(tmp / "bad.csv", rows, header)
    with pytest.raises(HerbensError) as info:
        evaluate_inputs([bad], solution, meta)
    assert expected in str(info.value), case
    assert main(["evaluate", str(bad), "--solution", str(solution), "--metadata", str(meta)]) == 2


def test_duplicate_id_raises(kaggle):
    tmp, meta, solution, _ = kaggle
    bad = tmp / "dup.csv"
    bad.write_text("Id,Predicted\n" + "".join(f"{k},{v}\n" for k, v in GOOD.items()) + "3,11\n")
    with pytest.raises(HerbensError, match="3"):
        evaluate_inputs([bad], solution, meta)


def test_submission_needs_solution_and_metadata(kaggle):
    _, meta, _, good = kaggle
    with pytest.raises(HerbensError, match="--solution"):
        evaluate_inputs([good], None, meta)


def test_bad_solution_files(tmp_path):
    with pytest.raises(HerbensError, match="Id"):
        load_solution(write_csv(tmp_path / "s.csv", SOLUTION, "image,label"))
    with pytest.raises(HerbensError, match="duplicate"):
        (tmp_path / "d.csv").write_text("Id,Predicted\n1,10\n1,11\n")
        load_solution(tmp_path / "d.csv")
    with pytest.raises(HerbensError, match="not found"):
        load_solution(tmp_path / "absent.csv")


def test_solution_label_outside_metadata(kaggle):
    tmp, meta, _, good = kaggle
    solution = write_csv(tmp / "sol.csv", {**SOLUTION, "7": 77})
    with pytest.raises(HerbensError, match="77"):
        evaluate_inputs([good], solution, meta)


# ----- run directories --------------------------------------------------------------------------

def run_taxonomy() -> Taxonomy:
    return Taxonomy([10, 11, 20, 30], ["Acer a", "Acer b", "Rhus c", "Elatine d"],
                    ["Acer", "Elatine", "Rhus"], ["Anacardiaceae", "Elatinaceae", "Sapindaceae"],
                    [0, 0, 2, 1], [2, 2, 0, 1], [3, 6, 12, 25])


def fake_run(tmp_path: Path, labels, taxonomy_hash=None, store_labels=True) -> tuple[Path, np.ndarray]:
    """A run directory holding a real validation logits store with random scores."""
    from herbens.stores.logits import write_logits

    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    tax = run_taxonomy()
    tax.save(run_dir / "taxonomy.json")
    scores = np.random.default_rng(0).normal(size=(len(labels), 4))
    write_logits(run_dir, "val", [str(i) for i in range(len(labels))], {"species": scores},
                 {"taxonomy_hash": taxonomy_hash or tax.hash},
                 labels=np.asarray(labels) if store_labels else None)
    return run_dir, scores.astype(np.float16).astype(np.float32).argmax(axis=1)


def test_run_dir_evaluation_uses_argmax_and_skips_unlabelled(tmp_path):
    labels = [0, 1, 2, 3, 0, 1, 2, 3, -1, -1]
    run_dir, pred = fake_run(tmp_path, labels)
    (result,) = evaluate_inputs([run_dir])
    known = np.asarray(labels) >= 0
    m = result["metrics"]
    assert result["kind"] == "run" and result["name"] == "tiny" and m["n_images"] == 8
    assert m["species_macro_f1"] == pytest.approx(
        f1_score(np.asarray(labels)[known], pred[known], average="macro"))
    assert main(["evaluate", str(run_dir)]) == 0


def test_run_dir_errors(tmp_path):
    run_dir, _ = fake_run(tmp_path / "a", [-1, -1, -1])
    with pytest.raises(HerbensError, match="no labels"):
        evaluate_inputs([run_dir])
    run_dir, _ = fake_run(tmp_path / "b", [0, 1, 2], store_labels=False)  # not stored (test)
    with pytest.raises(HerbensError, match="no labels"):
        evaluate_inputs([run_dir])
    run_dir, _ = fake_run(tmp_path / "c", [0, 1], taxonomy_hash="0" * 16)
    with pytest.raises(HerbensError, match="taxonomy"):
        evaluate_inputs([run_dir])


def test_run_dir_with_real_logits_store(tmp_path):
    logits = pytest.importorskip("herbens.logits")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tax = run_taxonomy()
    tax.save(run_dir / "taxonomy.json")
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 3, 3, 2], dtype=np.int64)
    scores = {level: rng.normal(size=(6, tax.num_classes(level))).astype(np.float16)
              for level in ("species", "genus", "family")}
    logits.write_logits(run_dir, "val", [f"im{i}" for i in range(6)], scores,
                        {"taxonomy_hash": tax.hash, "views": ["center"], "model": "fake",
                         "split": "val"}, labels=labels)
    (result,) = evaluate_inputs([run_dir])
    pred = scores["species"].astype(np.float32).argmax(axis=1)
    assert result["metrics"]["species_macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))


def test_argmax_rows_in_chunks():
    matrix = np.random.default_rng(2).normal(size=(25, 7)).astype(np.float16)
    assert (argmax_rows(matrix, chunk=4) == matrix.astype(np.float32).argmax(axis=1)).all()
