"""Training through ``main(argv)`` writes a complete, consistent run directory."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import train_tiny
from herbens.cli.main import main as cli_main
from herbens.config import load_run_config
from herbens.data.metadata import load_test_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.stores.logits import read_logits


def test_run_directory_is_complete(tiny_run):
    for name in ("config.yaml", "taxonomy.json", "split.csv", "metrics.json", "history.jsonl",
                 "model.pt", "checkpoints/latest.json"):
        assert (tiny_run / name).exists(), name
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["name"] == "tiny"
    assert load_run_config(tiny_run) == cfg  # the run's config is a valid, complete recipe
    assert set(json.loads((tiny_run / "provenance.json").read_text())) == {"git_revision", "herbens_version"}
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert {"val_species_macro_f1", "val_genus_macro_f1", "val_family_macro_f1"} <= set(history[-1])
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["species_macro_f1"] <= 1.0
    assert metrics["cost"]["device_type"] == "cpu" and metrics["cost"]["device_count"] == 1
    assert metrics["cost"]["compile_time_s"] == 0.0  # model.compile is false


def test_logits_cover_every_val_and_test_image_once(tiny_run, tiny_herbarium):
    taxonomy = Taxonomy.load(tiny_run / "taxonomy.json")
    val_ids = pd.read_csv(tiny_run / "split.csv", dtype=str)["image_id"].tolist()
    val = read_logits(tiny_run, "val")
    assert sorted(val.image_ids) == sorted(val_ids)
    assert (np.asarray(val.labels) >= 0).all()
    test = read_logits(tiny_run, "test")
    expected = load_test_metadata(tiny_herbarium / "test_metadata.json")["image_id"].tolist()
    assert sorted(test.image_ids) == sorted(expected)
    for split in (val, test):
        assert split.meta["taxonomy_hash"] == taxonomy.hash
        for level in ("species", "genus", "family"):
            scores = np.asarray(split.level(level))
            assert scores.shape == (len(split.image_ids), taxonomy.num_classes(level))
            assert scores.dtype == np.float16 and np.isfinite(scores).all()


def test_split_is_reproducible_and_shared_by_runs_with_other_seeds(tiny_run, tiny_herbarium, tmp_path):
    # Runs to be ensembled differ in their training seed but must hold out the same images.
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=again", "train.epochs=1", "seed=5"]) == 0
    first = pd.read_csv(tiny_run / "split.csv", dtype=str)
    second = pd.read_csv(tmp_path / "again" / "split.csv", dtype=str)
    assert first.equals(second)


def test_existing_run_needs_resume_or_overwrite(tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"], flags=["--overwrite"]) == 0


def test_resume_continues_to_more_epochs(tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 0
    # Another loss is not a resumable change: refused before anything runs, naming the key.
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=2", "levels.species.loss=seesaw"],
                      flags=["--resume"]) == 2
    err = capsys.readouterr().err
    assert "levels.species.loss[0].name: run has 'ce', command line has 'seesaw'" in err and "train.epochs:" not in err
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=2"], flags=["--resume"]) == 0
    history = (tmp_path / "r" / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["epoch"] for h in history] == [1, 2]


def test_infer_rewrites_logits_with_other_views(tiny_run):
    before = np.asarray(read_logits(tiny_run, "val").level("species")).copy()
    assert cli_main(["infer", str(tiny_run), "--split", "val", "--tta", "center"]) == 0
    after = read_logits(tiny_run, "val")
    assert after.meta["views"] == ["center"]
    assert after.level("species").shape == before.shape
    assert not np.array_equal(np.asarray(after.level("species")), before)  # hflip no longer averaged in


def test_bad_recipe_key_is_a_clear_error(tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["train.epochz=1"]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert train_tiny(tmp_path / "nowhere", tmp_path) == 2
    assert "nowhere" in capsys.readouterr().err


def test_final_weights_reload_into_the_model(tiny_run):
    from herbens.infer.run import load_run_model

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    model = load_run_model(tiny_run, cfg, Taxonomy.load(tiny_run / "taxonomy.json"))
    out = model.eval()(torch.zeros(1, 3, 48, 32))
    assert out["species"].shape[-1] == Taxonomy.load(tiny_run / "taxonomy.json").num_classes("species")


def _copy(run, tmp_path):
    """A copy of the session's run: rewriting one split with other views must not leave the shared
    run with val and test logits of different views (which the ensembler refuses)."""
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def test_infer_keeps_per_view_logits_and_averages_them(tiny_run, tmp_path):
    tiny_run = _copy(tiny_run, tmp_path)
    assert cli_main(["infer", str(tiny_run), "--split", "val", "--tta", "center", "hflip", "fivecrop",
                     "--keep-views"]) == 0
    val = read_logits(tiny_run, "val")
    views = np.asarray(val.views("species"), dtype=np.float32)
    assert views.shape[1] == 7  # centre + flip + five crops, one row each
    mean = np.asarray(val.level("species"), dtype=np.float32)
    np.testing.assert_allclose(mean, views.mean(axis=1), atol=2e-2)


def test_infer_in_probability_space(tiny_run, tmp_path):
    tiny_run = _copy(tiny_run, tmp_path)
    assert cli_main(["infer", str(tiny_run), "--split", "test", "--tta", "center", "hflip",
                     "--tta-space", "prob", "--no-keep-views"]) == 0
    test = read_logits(tiny_run, "test")
    assert test.meta["tta_space"] == "prob"
    # log of averaged probabilities: each row's exponentials sum to one.
    sums = np.exp(np.asarray(test.level("species"), dtype=np.float64)).sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-2)
    # Kept views are the raw per-view logits; the stored average follows tta_space.
    assert cli_main(["infer", str(tiny_run), "--split", "test", "--tta", "center", "hflip",
                     "--tta-space", "prob", "--keep-views"]) == 0
    kept = read_logits(tiny_run, "test")
    views = torch.as_tensor(np.asarray(kept.views("species"), dtype=np.float32))
    expected = torch.logsumexp(torch.log_softmax(views, -1), dim=1) - np.log(2)
    np.testing.assert_allclose(np.asarray(kept.level("species"), dtype=np.float32), expected.numpy(), atol=2e-2)


def test_consecutive_runs_split_shuffled_gathers_into_contiguous_blocks():
    from herbens.infer.splits import _consecutive_runs

    assert _consecutive_runs(np.array([0, 1, 2, 5, 6, 9])) == [(0, 3), (3, 5), (5, 6)]
    assert _consecutive_runs(np.array([4])) == [(0, 1)]


# ----- end-of-run fixes: schedule length, partial windows, compiled weights, layer decay -----

class _ToyNet(torch.nn.Module):
    """One linear layer with the trainer's model interface (``targets=`` and a dict out)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, images, targets=None):
        return {"species": self.fc(images)}


class _ToyLoss(torch.nn.Module):
    def forward(self, outputs, targets):
        return {"loss": torch.nn.functional.cross_entropy(outputs["species"], targets["species"])}


def test_each_accumulation_window_averages_its_own_micro_batches():
    # 7 micro-batches with grad_accum=3: windows of 3, 3 and a last partial window of 1, which
    # Accelerate also steps. Plain SGD with lr=1 moves the weights by minus the window's gradient.
    from accelerate import Accelerator

    from herbens.training.engine import TrainParts, TrainState, train_one_epoch
    from herbens.optim.schedules import epoch_updates

    torch.manual_seed(0)
    batches = [{"image": torch.randn(4, 3), "species": torch.randint(0, 2, (4,))} for _ in range(7)]
    model, reference = _ToyNet(), _ToyNet()
    reference.load_state_dict(model.state_dict())
    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer, loader = acc.prepare(model, optimizer, torch.utils.data.DataLoader(batches, batch_size=None))
    steps = []

    class Recorder:
        def step(self, num_updates):
            steps.append([p.detach().clone() for p in model.parameters()])

    parts = TrainParts(acc, model, _ToyLoss(), optimizer, Recorder(), ("species",))
    state = TrainState()
    train_one_epoch(parts, loader, state, len(loader))
    assert state.step == len(steps) == epoch_updates(7, 3) == 3

    for window, after in zip(([0, 1, 2], [3, 4, 5], [6]), steps):
        grads = []
        for i in window:  # the obviously correct reference: the mean loss over the window
            reference.zero_grad()
            torch.nn.functional.cross_entropy(reference(batches[i]["image"])["species"], batches[i]["species"]).backward()
            grads.append([p.grad.clone() for p in reference.parameters()])
        with torch.no_grad():
            for p, *g in zip(reference.parameters(), *grads):
                p -= torch.stack(g).mean(0)
        for mine, ref in zip(after, reference.parameters()):
            torch.testing.assert_close(mine, ref.detach())


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_grad_accum_run_completes_with_the_schedule_at_its_end(tiny_herbarium, tmp_path, scheduler):
    extra = ["name=acc", "train.epochs=3", "train.grad_accum=3", "train.batch_size=4", f"scheduler.name={scheduler}",
             "scheduler.warmup_epochs=0", "infer.splits=[val]"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=extra) == 0
    run = tmp_path / "acc"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    images = len(json.loads((tiny_herbarium / "train_metadata.json").read_text())["images"])
    batches = (images - len(pd.read_csv(run / "split.csv"))) // 4
    assert batches % 3 != 0  # the case under test: a last, partial window every epoch
    peak = cfg["optimizer"]["lr"]
    final = peak / cfg["scheduler"]["div_factor"] ** 2 if scheduler == "onecycle" else cfg["scheduler"]["min_lr"]
    assert history[-1]["step"] == 3 * -(-batches // 3)  # ceil(batches / 3) updates per epoch
    assert history[-1]["lr"] == pytest.approx(final, rel=1e-6)


def _lr_after(scheduler_cfg: dict, epochs: int, updates_per_epoch: int, lr: float, steps: list[int]) -> list[float]:
    """The learning rate after each of ``steps`` updates of an uninterrupted schedule (the reference)."""
    from herbens.optim.schedules import build_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = build_schedule(optimizer, scheduler_cfg, epochs, updates_per_epoch, lr)
    rates = {}
    for step in range(1, max(steps) + 1):
        schedule.step(step)
        rates[step] = optimizer.param_groups[0]["lr"]
    return [rates[step] for step in steps]


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_a_resumed_longer_schedule_follows_the_longer_one_from_the_resume_step(scheduler):
    # Trained 2 epochs of 5 updates, resumed with train.epochs=4: from update 10 on, the learning
    # rates are exactly those of an uninterrupted 4-epoch schedule. (Before the resume the run
    # followed the 2-epoch schedule; both shapes depend on their length, so the rate jumps at the
    # resume step from the short schedule's end to the long one's value: a warm restart.)
    from herbens.config import load_config
    from herbens.optim.schedules import build_schedule

    cfg = load_config("demo_ce", [f"scheduler.name={scheduler}", "scheduler.warmup_epochs=1"])["scheduler"]
    per_epoch, done, lr = 5, 10, 0.01

    def built(epochs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return optimizer, build_schedule(optimizer, cfg, epochs, per_epoch, lr)

    short_optimizer, short = built(2)
    for step in range(1, done + 1):
        short.step(step)
    optimizer, schedule = built(4)  # the resumed run: rebuilt for 4 epochs, then its checkpoint loaded
    optimizer.load_state_dict(short_optimizer.state_dict())
    schedule.load_state_dict(short.state_dict())
    schedule.seek(done)
    resumed = [optimizer.param_groups[0]["lr"]]
    for step in range(done + 1, 4 * per_epoch + 1):
        schedule.step(step)
        resumed.append(optimizer.param_groups[0]["lr"])
    assert resumed == _lr_after(cfg, 4, per_epoch, lr, list(range(done, 4 * per_epoch + 1)))
    final = lr / cfg["div_factor"] ** 2 if scheduler == "onecycle" else cfg["min_lr"]
    assert resumed[-1] == pytest.approx(final, rel=1e-9) and resumed[0] > 2 * final


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")  # the reference steps no optimizer
@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_resume_with_more_epochs_extends_the_schedule(tiny_herbarium, tmp_path, scheduler):
    extra = ["name=longer", f"scheduler.name={scheduler}", "infer.splits=[val]"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=extra + ["train.epochs=2"]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=extra + ["train.epochs=4"], flags=["--resume"]) == 0
    run = tmp_path / "longer"
    cfg = load_run_config(run)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and cfg["train"]["epochs"] == 4
    per_epoch = history[0]["step"]
    assert [h["step"] for h in history] == [per_epoch * e for e in (1, 2, 3, 4)]
    # The resumed epochs end at the learning rates of an uninterrupted 4-epoch run, the last at the end.
    expected = _lr_after(cfg["scheduler"], 4, per_epoch, cfg["optimizer"]["lr"], [h["step"] for h in history[2:]])
    assert [h["lr"] for h in history[2:]] == pytest.approx(expected, rel=1e-9)
    peak = cfg["optimizer"]["lr"]
    final = peak / cfg["scheduler"]["div_factor"] ** 2 if scheduler == "onecycle" else cfg["scheduler"]["min_lr"]
    assert history[-1]["lr"] == pytest.approx(final, rel=1e-6)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "none"])
def test_layer_decay_scales_every_groups_learning_rate(taxonomy, scheduler):
    from herbens.config import load_config
    from herbens.models.net import build_model
    from herbens.optim.optimizers import build_optimizer
    from herbens.optim.schedules import build_schedule

    cfg = load_config("demo_ce", ["optimizer.layer_decay=0.5", f"scheduler.name={scheduler}"])
    model = build_model(cfg, taxonomy)
    optimizer = build_optimizer(model, [], cfg["optimizer"], lr=0.01)
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    assert len(set(scales)) > 2 and max(scales) == 1.0  # several trunk depths, heads at full LR
    schedule = build_schedule(optimizer, cfg["scheduler"], epochs=2, updates_per_epoch=5, lr=0.01)
    for step in range(1, 11):
        full = [g["lr"] for g, s in zip(optimizer.param_groups, scales) if s == 1.0]
        assert len(set(full)) == 1
        if scheduler == "none":
            assert full[0] == 0.01
        for group, scale in zip(optimizer.param_groups, scales):
            assert group["lr"] == pytest.approx(full[0] * scale, rel=1e-9)
        schedule.step(step)


@pytest.mark.slow
def test_compiled_run_writes_weights_that_infer_loads(tiny_herbarium, tmp_path):
    extra = ["name=compiled", "train.epochs=1", "model.compile=true", "train.ema=true", "infer.splits=[val]"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=extra) == 0
    run = tmp_path / "compiled"
    for name in ("model.pt", "model_ema.pt"):
        keys = torch.load(run / name, weights_only=True).keys()
        assert not [k for k in keys if "_orig_mod" in k], name
    assert cli_main(["infer", str(run), "--split", "val", "test", "--tta", "center"]) == 0
    assert read_logits(run, "test").meta["views"] == ["center"]


# ----- failed starts and failed endings --------------------------------------------------------

def test_a_run_failing_before_its_first_checkpoint_removes_what_it_wrote(tiny_herbarium, tmp_path, monkeypatch):
    import herbens.training.fit

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(herbens.training.fit, "_train_epochs", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"])
    assert not (tmp_path / "r").exists()
    monkeypatch.undo()
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 0  # no flag needed


@pytest.mark.parametrize("flags", [[], ["--resume"]])
def test_a_retry_clears_a_start_killed_before_its_first_checkpoint(tiny_herbarium, tmp_path, flags, capsys):
    # What a SIGKILL during epoch 1 leaves: the run header and a partial checkpoint folder.
    run = tmp_path / "r"
    (run / "checkpoints" / "epoch0000-step00000001").mkdir(parents=True)
    for name in ("config.yaml", "taxonomy.json", "split.csv"):
        (run / name).write_text("from a start that died\n")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"], flags=flags) == 0
    assert "failed before its first checkpoint" in capsys.readouterr().out
    assert (run / "model.pt").exists() and yaml.safe_load((run / "config.yaml").read_text())["name"] == "r"


def test_a_folder_with_other_files_is_not_taken_for_a_failed_start(tiny_herbarium, tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("x\n")
    (run / "notes.txt").write_text("mine\n")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine\n"


def test_a_logits_failure_after_training_says_how_to_finish(tiny_herbarium, tmp_path, monkeypatch, capsys):
    import herbens.training.fit

    real = herbens.training.fit.write_split_logits

    def fail_on_test(accelerator, model, cfg, data, data_config, run_dir, split, views=None, **options):
        if split == "test":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(accelerator, model, cfg, data, data_config, run_dir, split, views, **options)

    monkeypatch.setattr(herbens.training.fit, "write_split_logits", fail_on_test)
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 2
    message = capsys.readouterr().err.strip()
    run = tmp_path / "r"
    command = f"herbens infer {run} --split test"
    assert "weights are saved (model.pt" in message and "simulated" in message and message.endswith(command)
    monkeypatch.undo()
    assert cli_main(command.split()[1:]) == 0
    assert len(read_logits(run, "test").image_ids) == len(load_test_metadata(tiny_herbarium / "test_metadata.json"))


# ----- trackers ----------------------------------------------------------------------------------

def test_tensorboard_receives_the_history_numbers(tiny_herbarium, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ["name=tb", "train.epochs=2", "train.trackers=[tensorboard]", "infer.splits=[val]"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=extra) == 0
    run = tmp_path / "tb"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "trackers" / "tb")).Reload()
    for key in ("train_loss", "loss_species", "loss_family", "lr", "images_per_second", "val_species_macro_f1"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [h["step"] for h in history]
        np.testing.assert_allclose([e.value for e in logged], [h[key] for h in history], rtol=1e-6)


def test_unknown_or_missing_tracker_is_a_clear_error(tiny_herbarium, tmp_path, capsys):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    assert train_tiny(tiny_herbarium, tmp_path, extra=["train.trackers=[tensorbored]"]) == 2
    assert "train.trackers[0]: unknown tracker 'tensorbored' (did you mean tensorboard?)" in capsys.readouterr().err
    missing = [n for n in LoggerType.list() if n != "all" and LoggerType(n) not in get_available_trackers()]
    if missing:
        assert train_tiny(tiny_herbarium, tmp_path, extra=[f"train.trackers=[{missing[0]}]"]) == 2
        assert f"train.trackers: {missing[0]} is not installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_trunk_compiled_run_reports_compile_time_and_saves_plain_keys(tiny_run, tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=c", "train.epochs=1", "model.compile=trunk",
                                                       "infer.splits=[val]"]) == 0
    assert "model.compile=trunk: 4 module(s) compiled in place" in capsys.readouterr().out  # test_resnet's blocks
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["cost"]["compile_time_s"] > 0
    weights = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert list(weights) == list(torch.load(tiny_run / "model.pt", weights_only=True))  # no "_orig_mod."


def test_fp16_on_a_cpu_is_refused_before_anything_starts(tiny_herbarium, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is real there")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["train.precision=fp16"], flags=["--check"]) == 2
    assert "train.precision=fp16 needs a GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
