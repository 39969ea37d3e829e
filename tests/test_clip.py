"""open_clip checkpoints in the trunk, and heads initialised from class names (no downloads).

A randomly initialised open_clip model of a tiny ViT architecture (registered from a config
file, as open_clip's own configs are) is saved in open_clip's formats and loaded into
herbens' trunk through timm's CLIP conversion; the trunk's image embeddings and the
text-initialised heads' logits must equal open_clip's ``encode_image`` and zero-shot logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train_tiny

from herbens.cli.main import main as cli_main
from herbens.config import load_config, load_run_config
from herbens.data.dataset import HerbariumDataset
from herbens.data.run_data import load_run_data
from herbens.data.taxonomy import Taxonomy
from herbens.data.transforms import build_eval_transform, model_data_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json
from herbens.metrics import macro_f1
from herbens.models.clip import class_prompts, init_text_heads, with_text_head_scales
from herbens.models.net import build_model

open_clip = pytest.importorskip("open_clip")

EMBED_DIM, IMAGE, PATCH, WIDTH, LAYERS, HEADS = 24, 32, 8, 64, 2, 2


def register_tiny_clip(folder, quick_gelu: bool) -> str:
    """Register a tiny ViT CLIP architecture with open_clip; returns its name."""
    name = "herbens-tiny-quickgelu" if quick_gelu else "herbens-tiny"
    config = {"embed_dim": EMBED_DIM, "quick_gelu": quick_gelu,
              "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH,
                             "head_width": WIDTH // HEADS, "patch_size": PATCH},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


@pytest.fixture(params=[False, True], ids=["gelu", "quickgelu"])
def clip_checkpoint(request, tmp_path):
    """(open_clip model, its architecture name, checkpoint path, quick_gelu)."""
    return make_checkpoint(tmp_path, request.param)


def make_checkpoint(tmp_path, quick_gelu: bool):
    name = register_tiny_clip(tmp_path, quick_gelu)
    torch.manual_seed(0)
    model = open_clip.create_model(name, device="cpu").eval()
    with torch.no_grad():  # a trained-looking temperature, not the init value 1/0.07
        model.logit_scale.fill_(4.2)
        model.visual.proj.mul_(3.0)  # keep the projection far from a zero-bias no-op
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)  # the format of released open_clip weights
    return model, name, path, quick_gelu


def recipe(name: str, path, quick_gelu: bool, extra: list[str] | None = None) -> dict:
    backbone = "vit_base_patch16_clip_quickgelu_224.openai" if quick_gelu else "vit_base_patch16_clip_224.openai"
    kwargs = f"{{img_size: {IMAGE}, patch_size: {PATCH}, embed_dim: {WIDTH}, depth: {LAYERS}, num_heads: {HEADS}}}"
    return load_config("demo_ce", [
        f"model.backbone={backbone}", "model.pretrained=true", f"model.pretrained_file={path}",
        f"model.model_kwargs={kwargs}", f"model.clip_embed_dim={EMBED_DIM}", f"model.open_clip_model={name}",
        *(extra or [])])


def test_open_clip_checkpoint_gives_open_clip_image_embeddings(clip_checkpoint, taxonomy):
    model, name, path, quick_gelu = clip_checkpoint
    net = build_model(recipe(name, path, quick_gelu), taxonomy).eval()
    images = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = net(images)["embedding"]
        theirs = model.encode_image(images)
    assert ours.shape == (3, EMBED_DIM)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_training_checkpoint_format_loads_too(clip_checkpoint, taxonomy, tmp_path):
    # open_clip's trainer saves {"epoch", "name", "state_dict": DDP-prefixed keys, "optimizer"}.
    model, name, _, quick_gelu = clip_checkpoint
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)
    net = build_model(recipe(name, path, quick_gelu), taxonomy).eval()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(net(images)["embedding"], model.encode_image(images), rtol=1e-4, atol=1e-5)


def test_text_initialised_heads_give_open_clip_zero_shot_logits(clip_checkpoint, taxonomy):
    model, name, path, quick_gelu = clip_checkpoint
    levels = ["species", "genus", "family"]
    template = "a photo of {name}, in the family {family}."
    cfg = recipe(name, path, quick_gelu, [f"levels.{level}.head=cosine" for level in levels]
                 + [f"text_heads.levels=[{', '.join(levels)}]", f"text_heads.template={template}"])
    net = build_model(cfg, taxonomy).eval()
    scales = init_text_heads(net, cfg, taxonomy)
    assert scales == {level: pytest.approx(torch.tensor(4.2).exp().item()) for level in levels}
    images = torch.randn(4, 3, IMAGE, IMAGE)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        out = net(images)
        image = model.encode_image(images, normalize=True)
        for level in levels:
            text = model.encode_text(tokenizer(class_prompts(taxonomy, level, template)), normalize=True)
            zero_shot = model.logit_scale.exp() * image @ text.T  # open_clip's zero-shot classifier
            torch.testing.assert_close(out[level], zero_shot, rtol=1e-4, atol=1e-4)
    # The scale travels in the config, so a model rebuilt from the run's config.yaml matches.
    cfg = with_text_head_scales(cfg, scales)
    rebuilt = build_model(cfg, taxonomy)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images)["species"], out["species"])


def test_prompts_fill_the_taxonomic_names(taxonomy):
    prompts = class_prompts(taxonomy, "species", "a photo of {family} {genus} {name}.")
    assert prompts[0] == "a photo of f0 g0 a." and prompts[3] == "a photo of f1 g1 d."
    assert class_prompts(taxonomy, "genus", "{family} {name}") == ["f0 g0", "f0 g1", "f1 g2"]
    with pytest.raises(HerbensError, match="genus"):
        class_prompts(taxonomy, "family", "{genus}")


@pytest.mark.parametrize("override, message", [
    ("levels.genus.head=linear", "levels.genus.head must be cosine"),
    ("levels.genus=null", "levels.genus is null"),
    ("model.neck=bnneck", "model.neck: none"),
    ("model.clip_embed_dim=null", "model.clip_embed_dim"),
    ("model.open_clip_model=null", "model.open_clip_model"),
    ("model.pretrained=false", "model.pretrained=true"),
    ("model.pretrained_file=null", "model.pretrained_file"),
    ("model.open_clip_model=hf-hub:imageomics/bioclip", "model.open_clip_model: .*local-dir:"),
    ("text_heads.template=a {name} of {family} in {order}", "field 'order' is not known for species"),
    ("text_heads.template=a {}", "field '' is not known"),
    ("text_heads.template=a {name", "text_heads.template 'a {name': malformed")])
def test_text_heads_settings_are_checked_when_the_recipe_loads(clip_checkpoint, override, message):
    # Refused by the recipe's rules, naming the key, before any model or checkpoint is built.
    _, name, path, quick_gelu = clip_checkpoint
    heads = ["levels.species.head=cosine", "levels.genus.head=cosine", "text_heads.levels=[species, genus]"]
    recipe(name, path, quick_gelu, heads)  # loads as it is
    with pytest.raises(HerbensError, match=message):
        recipe(name, path, quick_gelu, [*heads, override])


def test_non_square_non_native_size_interpolates_position_embeddings(clip_checkpoint, taxonomy):
    # Pre-trained at 32x32 (a 4x4 grid); trained at 48x40 (6x5): timm resamples the grid at load.
    model, name, path, quick_gelu = clip_checkpoint
    kwargs = f"{{img_size: [48, 40], patch_size: {PATCH}, embed_dim: {WIDTH}, depth: {LAYERS}, num_heads: {HEADS}}}"
    net = build_model(recipe(name, path, quick_gelu, [f"model.model_kwargs={kwargs}"]), taxonomy)
    assert net.trunk.pos_embed.shape[1] == 1 + 6 * 5
    out = net(torch.randn(2, 3, 48, 40))
    sum(out[level].sum() for level in net.heads).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_zeroshot_verb_reports_open_clip_zero_shot_macro_f1(tiny_herbarium, tmp_path):
    model, name, path, quick_gelu = make_checkpoint(tmp_path, False)
    overrides = [f"data.root={tiny_herbarium}", f"output_dir={tmp_path}", "data.num_workers=0",
                 "data.val_fraction=0.25", f"input.size=[{IMAGE},{IMAGE}]", "levels.species.head=cosine",
                 "levels.genus.head=cosine", "text_heads.levels=[species, genus]"]
    cfg = recipe(name, path, quick_gelu, overrides)
    argv = [f"{k}={v}" for k, v in (o.split("=", 1) for o in overrides)]
    backbone = cfg["model"]["backbone"]
    out = tmp_path / "zeroshot.json"
    assert cli_main(["zeroshot", "demo_ce", f"model.backbone={backbone}", "model.pretrained=true",
                     f"model.pretrained_file={path}", f"model.model_kwargs={cfg['model']['model_kwargs']}",
                     f"model.clip_embed_dim={EMBED_DIM}", f"model.open_clip_model={name}", *argv,
                     "--json", str(out)]) == 0
    scores = read_json(out)

    # The same validation images through open_clip's own zero-shot classifier.
    data = load_run_data(cfg, tmp_path / "no_run", reuse_split=False)
    net = build_model(cfg, data.taxonomy)
    transform = build_eval_transform(model_data_config(net.data_config, cfg["input"]))
    dataset = HerbariumDataset(data.val, data.images_dir, data.taxonomy, transform=transform)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items])
    labels = [item["species"] for item in items]
    tokenizer = open_clip.get_tokenizer(name)
    assert scores["val_images"] == len(dataset) > 0
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        for level in ("species", "genus"):
            text = model.encode_text(tokenizer(class_prompts(data.taxonomy, level, "a photo of {name}.")),
                                     normalize=True)
            predicted = (image @ text.T).argmax(dim=1).numpy()
            expected = macro_f1(data.taxonomy.level_indices(level, labels), predicted)
            assert scores[f"val_{level}_macro_f1"] == pytest.approx(expected)
    assert "val_family_macro_f1" not in scores


def test_zeroshot_verb_needs_text_heads(tmp_path, capsys):
    assert cli_main(["zeroshot", "demo_ce", f"output_dir={tmp_path}"]) == 2
    assert "text_heads.levels" in capsys.readouterr().err


def test_linear_probe_run_keeps_the_clip_tower_and_records_the_head_scale(tiny_herbarium, tmp_path):
    # A whole run: text-initialised heads, one frozen epoch. The saved trunk still computes
    # open_clip's image embedding, and the run's config carries exp(logit_scale) for each head.
    model, name, path, quick_gelu = make_checkpoint(tmp_path, True)
    cfg = recipe(name, path, quick_gelu)
    extra = [f"model.backbone={cfg['model']['backbone']}", "model.pretrained=true", f"model.pretrained_file={path}",
             f"model.model_kwargs={cfg['model']['model_kwargs']}", f"model.clip_embed_dim={EMBED_DIM}",
             f"model.open_clip_model={name}", f"input.size=[{IMAGE},{IMAGE}]", "levels.species.head=cosine",
             "levels.genus.head=cosine", "text_heads.levels=[species, genus]", "train.epochs=1",
             "train.freeze_trunk_epochs=1", "infer.splits=[]", "name=probe"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=extra) == 0
    run = tmp_path / "probe"
    saved = load_run_config(run)  # through the schema, as inference and export read it
    scale = pytest.approx(torch.tensor(4.2).exp().item())
    assert saved["levels"]["species"]["head"] == {"name": "cosine", "scale": scale}
    assert saved["levels"]["genus"]["head"] == {"name": "cosine", "scale": scale}
    assert saved["levels"]["family"]["head"]["name"] == "linear"
    rebuilt = {**saved, "model": {**saved["model"], "pretrained": False, "pretrained_file": None}}
    net = build_model(rebuilt, Taxonomy.load(run / "taxonomy.json"))
    assert net.heads["species"].scale == scale and net.heads["genus"].scale == scale
    net.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images)["embedding"], model.encode_image(images), rtol=1e-4, atol=1e-5)
    # herbens zeroshot takes the run folder: its config.yaml through the schema, its own split.
    out = tmp_path / "zeroshot.json"
    assert cli_main(["zeroshot", str(run), "--json", str(out)]) == 0
    scores = read_json(out)
    assert scores["levels"] == ["species", "genus"] and 0 <= scores["val_species_macro_f1"] <= 1
    assert scores["val_images"] == len((run / "split.csv").read_text().splitlines()) - 1 > 0




@pytest.mark.slow
def test_a_text_head_run_resumes_with_its_recorded_scale(tiny_herbarium, tmp_path, capsys, monkeypatch):
    # config.yaml holds exp(logit_scale) in each text head's node while the recipe holds the
    # cosine default: --resume must not take that for a changed key.
    _, name, path, quick_gelu = make_checkpoint(tmp_path, False)
    cfg = recipe(name, path, quick_gelu)
    extra = [f"model.backbone={cfg['model']['backbone']}", "model.pretrained=true", f"model.pretrained_file={path}",
             f"model.model_kwargs={cfg['model']['model_kwargs']}", f"model.clip_embed_dim={EMBED_DIM}",
             f"model.open_clip_model={name}", f"input.size=[{IMAGE},{IMAGE}]", "levels.species.head=cosine",
             "text_heads.levels=[species]", "infer.splits=[]", "name=resumed"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=[*extra, "train.epochs=1"]) == 0

    def text_tower_again(*args):
        raise AssertionError("a resumed run's heads come from its checkpoint: no second text-tower pass")

    monkeypatch.setattr("herbens.training.setup.init_text_heads", text_tower_again)
    assert train_tiny(tiny_herbarium, tmp_path, extra=[*extra, "train.epochs=2"], flags=["--resume"]) == 0
    history = (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]
    scale = pytest.approx(torch.tensor(4.2).exp().item())
    assert load_run_config(tmp_path / "resumed")["levels"]["species"]["head"]["scale"] == scale
    # A recipe that changes a text head's other settings is still refused.
    capsys.readouterr()
    assert train_tiny(tiny_herbarium, tmp_path, extra=[*extra, "train.epochs=3", "text_heads.template={name}"],
                      flags=["--resume"]) == 2
    assert "text_heads.template" in capsys.readouterr().err
