"""Losses against slow, obviously-correct loop references on tiny inputs (values and gradients)."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SubCenterArcFaceLoss

from herbens.config import base_recipe, load_config
from herbens.config.rules import check_mixup_compatible
from herbens.core.errors import HerbensError
from herbens.losses import LOSSES, build_criterion, build_level_loss
from herbens.losses.class_balanced import class_balanced_weights
from herbens.models.heads import SubCenterArcFaceHead

C = 5
COUNTS = np.array([40, 10, 3, 1, 0])



def resolved_levels(*overrides):
    """The ``levels`` block of the base recipe with ``overrides``, as the trainer receives it."""
    return load_config(base_recipe(), list(overrides))["levels"]


def _inputs(seed=0, batch=6, classes=C):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, generator=g) * 2).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=g)
    return logits, target


def _soft(target, classes=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    other = torch.randint(0, classes, target.shape, generator=g)
    lam = 0.7
    return lam * F.one_hot(target, classes).float() + (1 - lam) * F.one_hot(other, classes).float()


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


def _assert_same(ours, ref, x):
    v1, g1 = _grad(ours, x)
    v2, g2 = _grad(ref, x)
    torch.testing.assert_close(v1, v2.to(v1.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2.to(g1.dtype), rtol=1e-5, atol=1e-6)


# ----- loop references -------------------------------------------------------------------
def ref_ce_row(z, t_probs, ls):
    """-sum_j q_j log softmax(z)_j with q = t (1 - ls) + ls / C, for one row."""
    n = len(z)
    log_den = torch.log(sum(torch.exp(z[j]) for j in range(n)))
    return -sum(((1 - ls) * t_probs[j] + ls / n) * (z[j] - log_den) for j in range(n))


def ref_ce(logits, probs, ls=0.0, sample_weights=None):
    total = 0.0
    for b in range(len(logits)):
        w = 1.0 if sample_weights is None else sample_weights[b]
        total = total + w * ref_ce_row(logits[b], probs[b], ls)
    return total / len(logits)


def onehot_list(target, classes=C):
    return [[1.0 if j == int(t) else 0.0 for j in range(classes)] for t in target]


# ----- cross-entropy ---------------------------------------------------------------------
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_ce_hard_matches_loop(ls):
    logits, target = _inputs()
    loss = build_level_loss("ce", "species", C, COUNTS, label_smoothing=ls)
    _assert_same(lambda z: loss({"species": z}, target),
                 lambda z: ref_ce(z, onehot_list(target), ls), logits)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_ce_soft_targets_match_loop(ls):
    logits, target = _inputs()
    soft = _soft(target)
    loss = build_level_loss("ce", "species", C, COUNTS, label_smoothing=ls)
    _assert_same(lambda z: loss({"species": z}, soft),
                 lambda z: ref_ce(z, soft.tolist(), ls), logits)


# ----- class-balanced --------------------------------------------------------------------
def test_class_balanced_weights_match_formula():
    beta = 0.99
    w = class_balanced_weights(COUNTS, beta)
    raw = [(1 - beta) / (1 - beta ** max(int(n), 1)) for n in COUNTS]
    expected = [r * len(raw) / sum(raw) for r in raw]
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert math.isclose(w.sum(), C)
    assert w[3] == w[4]  # count 0 is clamped to 1


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_class_balanced_loss_is_plain_mean_of_weighted_losses(ls):
    logits, target = _inputs(seed=3)
    beta = 0.9
    loss = build_level_loss("class_balanced", "species", C, COUNTS, beta=beta, label_smoothing=ls)
    w = class_balanced_weights(COUNTS, beta)
    _assert_same(lambda z: loss({"species": z}, target),
                 lambda z: ref_ce(z, onehot_list(target), ls, [float(w[int(t)]) for t in target]), logits)
    # PyTorch's weighted mean divides by sum(w_y) instead: a different number.
    torch_mean = F.cross_entropy(logits, target, weight=torch.tensor(w, dtype=torch.float32),
                                 label_smoothing=ls)
    assert not torch.isclose(loss({"species": logits}, target), torch_mean)


def test_class_balanced_soft_target_weight_is_expected_weight():
    logits, target = _inputs(seed=4)
    soft = _soft(target)
    loss = build_level_loss("class_balanced", "species", C, COUNTS, beta=0.9)
    w = class_balanced_weights(COUNTS, 0.9)
    weights = [sum(float(soft[b, j]) * w[j] for j in range(C)) for b in range(len(soft))]
    _assert_same(lambda z: loss({"species": z}, soft),
                 lambda z: ref_ce(z, soft.tolist(), 0.0, weights), logits)


# ----- logit adjustment ------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjusted_matches_formula(tau):
    logits, target = _inputs(seed=5)
    loss = build_level_loss("logit_adjusted", "species", C, COUNTS, tau=tau, label_smoothing=0.1)
    n = [max(int(c), 1) for c in COUNTS]
    log_prior = [math.log(c / sum(n)) for c in n]

    def ref(z):
        adjusted = torch.stack([torch.stack([z[b, j] + tau * log_prior[j] for j in range(C)])
                                for b in range(len(z))])
        return ref_ce(adjusted, onehot_list(target), 0.1)

    _assert_same(lambda z: loss({"species": z}, target), ref, logits)


# ----- seesaw ------------------------------------------------------------------------------
def ref_seesaw(z, target, counts, p=0.8, q=2.0, eps=1e-2):
    total = 0.0
    for b in range(len(z)):
        i = int(target[b])
        s = torch.softmax(z[b].detach(), dim=0).tolist()
        n = [max(float(c), 1.0) for c in counts]
        adjusted = []
        for j in range(len(z[b])):
            if j == i:
                adjusted.append(z[b, j])
                continue
            m = (n[j] / n[i]) ** p if n[j] < n[i] else 1.0
            s_i = max(s[i], eps)
            c = (s[j] / s_i) ** q if s[j] > s_i else 1.0
            adjusted.append(z[b, j] + math.log(m * c))
        adjusted = torch.stack(adjusted)
        total = total + ref_ce_row(adjusted, onehot_list([i])[0], 0.0)
    return total / len(z)


def _seesaw_case():
    # Large logits so that some non-target classes beat the target (compensation is active)
    # and a target with a tiny probability (the eps clamp is active).
    logits = torch.tensor([[4.0, 1.0, -1.0, 0.5, 0.0],
                           [-3.0, 6.0, 0.0, 1.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, -2.0, 3.0, -6.0, 1.0],
                           [1.0, 2.0, 3.0, 4.0, -5.0]])
    target = torch.tensor([0, 2, 3, 3, 4])
    return logits, target


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.8, 0.0), (0.0, 2.0), (1.5, 1.0)])
def test_seesaw_matches_formula_with_given_counts(p, q):
    logits, target = _seesaw_case()
    counts = torch.tensor([100, 30, 5, 0, 2])
    loss = build_level_loss("seesaw", "species", C, COUNTS, p=p, q=q).eval()
    loss.cum_samples.copy_(counts)
    _assert_same(lambda z: loss({"species": z}, target),
                 lambda z: ref_seesaw(z, target, counts.tolist(), p, q), logits)
    assert torch.equal(loss.cum_samples, counts)  # eval mode: counts untouched


def test_seesaw_updates_counts_before_the_loss_and_checkpoints_them():
    logits, target = _seesaw_case()
    loss = build_level_loss("seesaw", "species", C, COUNTS).train()
    loss.cum_samples.copy_(torch.tensor([7, 0, 1, 2, 0]))
    value = loss({"species": logits}, target)
    expected_counts = torch.tensor([8, 0, 2, 4, 1])
    assert torch.equal(loss.cum_samples, expected_counts)
    torch.testing.assert_close(value, ref_seesaw(logits, target, expected_counts.tolist()))
    state = loss.state_dict()
    assert torch.equal(state["cum_samples"], expected_counts)
    fresh = build_level_loss("seesaw", "species", C, COUNTS)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.cum_samples, expected_counts)


def test_seesaw_counts_are_in_the_criterion_state_dict(taxonomy):
    crit = build_criterion(resolved_levels("levels.species.loss=seesaw", "levels.family=null"), taxonomy)
    assert "losses.species.terms.0.cum_samples" in crit.state_dict()
    assert not any(k.startswith("map_") for k in crit.state_dict())


def test_seesaw_all_reduces_batch_counts(monkeypatch):
    """Fast check of the wiring: a fake second rank that saw the same labels doubles them."""
    import torch.distributed as dist

    def fake_all_reduce(tensor, op=None):
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    loss = build_level_loss("seesaw", "species", C, COUNTS).train()
    loss({"species": torch.zeros(3, C)}, torch.tensor([0, 0, 1]))
    assert loss.cum_samples.tolist() == [4, 2, 0, 0, 0]


def test_seesaw_runs_inside_a_real_process_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        loss = build_level_loss("seesaw", "species", C, COUNTS).train()
        loss({"species": torch.zeros(3, C)}, torch.tensor([0, 0, 4]))
        assert loss.cum_samples.tolist() == [2, 0, 0, 0, 1]
    finally:
        dist.destroy_process_group()


# ----- AMS ---------------------------------------------------------------------------------
def ref_ams_metric(emb, labels, temperature, margin):
    """Naive loop over anchors of the formula in herbens.losses.ams."""
    e = [row / torch.sqrt(sum(v * v for v in row)) for row in emb]
    n = len(e)

    def dist(a, j):
        return torch.sqrt(torch.clamp(2 - 2 * sum(e[a][k] * e[j][k] for k in range(len(e[a]))), min=1e-12))

    terms = []
    for a in range(n):
        pos = [j for j in range(n) if j != a and int(labels[j]) == int(labels[a])]
        neg = [j for j in range(n) if int(labels[j]) != int(labels[a])]
        if not pos or not neg:
            continue
        d_pos = [dist(a, j) for j in pos]
        d_neg = [dist(a, j) for j in neg]
        z_pos = sum(torch.exp(d / temperature) for d in d_pos)
        z_neg = sum(torch.exp(-d / temperature) for d in d_neg)
        wp = sum(torch.exp(d / temperature) / z_pos * d for d in d_pos)
        wn = sum(torch.exp(-d / temperature) / z_neg * d for d in d_neg)
        terms.append(torch.log(1 + torch.exp(wp - wn + margin)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("temperature,margin", [(0.1, 0.0), (1.0, 0.3)])
def test_ams_matches_loop_over_anchors(temperature, margin):
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(7, 4, generator=g, dtype=torch.float64)
    logits = torch.randn(7, C, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 have no positive: skipped
    loss = build_level_loss("ams", "species", C, COUNTS, temperature=temperature, margin=margin,
                            label_smoothing=0.1, metric_weight=0.5)

    def ours(x):
        return loss({"embedding": x, "species": logits}, labels)

    def ref(x):
        return 0.5 * ref_ams_metric(x, labels, temperature, margin) + ref_ce(logits.float(), onehot_list(labels), 0.1)

    v1, g1 = _grad(ours, emb)
    v2, g2 = _grad(ref, emb)
    torch.testing.assert_close(v1, v2.to(v1.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-6)


def test_ams_without_any_triplet_is_just_ce():
    emb = torch.randn(3, 4, requires_grad=True)
    logits, _ = _inputs(batch=3)
    labels = torch.tensor([0, 1, 2])
    loss = build_level_loss("ams", "species", C, COUNTS, label_smoothing=0.0)
    value = loss({"embedding": emb, "species": logits}, labels)
    torch.testing.assert_close(value, F.cross_entropy(logits, labels))
    value.backward()
    assert torch.isfinite(emb.grad).all()


# ----- sub-center ArcFace ------------------------------------------------------------------
def _arcface_pair(num_classes=C, dim=8):
    torch.manual_seed(0)
    head = SubCenterArcFaceHead(dim, num_classes, margin=28.6, scale=64, sub_centers=3)
    pml = SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=28.6, scale=64,
                               sub_centers=3)
    pml.W.data.copy_(head.loss.W.data)
    return head, pml


def test_arcface_head_logits_and_margin_loss_match_pml():
    head, pml = _arcface_pair()
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(head(emb), pml.get_logits(emb))
    # Logits: scale times the best sub-center cosine, no margin.
    cos = F.normalize(emb, dim=1) @ F.normalize(head.loss.W, dim=0)
    torch.testing.assert_close(head(emb), 64 * cos.view(6, C, 3).amax(2), rtol=1e-5, atol=1e-4)
    _assert_same(lambda x: head.margin_loss(x, labels), lambda x: pml(x, labels), emb)
    # And the gradient reaching W is the same.
    head.zero_grad()
    pml.zero_grad()
    head.margin_loss(emb, labels).backward()
    pml(emb, labels).backward()
    torch.testing.assert_close(head.loss.W.grad, pml.W.grad)


def test_arcface_margin_loss_reads_model_output():
    loss = build_level_loss("subcenter_arcface", "species", C, COUNTS)
    value = torch.tensor(3.5)
    assert loss({"species": torch.zeros(2, C), "species_margin_loss": value}, torch.tensor([0, 1])) is value
    with pytest.raises(HerbensError, match="species_margin_loss"):
        loss({"species": torch.zeros(2, C)}, torch.tensor([0, 1]))


def test_arcface_head_keeps_fp32_weights_under_half_inputs():
    head, _ = _arcface_pair()
    labels = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = torch.randn(4, 8).to(torch.bfloat16)
        logits = head(emb)
        value = head.margin_loss(emb, labels)
    emb16 = torch.randn(4, 8).half()
    head(emb16)
    head.margin_loss(emb16, labels)
    assert head.loss.W.dtype == torch.float32
    assert logits.dtype == torch.float32 and value.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(value)


# ----- mixed precision ---------------------------------------------------------------------
LOSS_CASES = [("ce", {"label_smoothing": 0.1}), ("class_balanced", {}), ("seesaw", {}),
              ("logit_adjusted", {}), ("ams", {})]


@pytest.mark.parametrize("name,params", LOSS_CASES)
def test_losses_finite_under_bf16_autocast_and_half_inputs(name, params):
    torch.manual_seed(0)
    fc = torch.nn.Linear(8, C)
    x = torch.randn(8, 8) * 10
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    loss = build_level_loss(name, "species", C, COUNTS, **params).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fc(x)
        value = loss({"species": logits, "embedding": x}, target)
    assert logits.dtype == torch.bfloat16 and value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(fc.weight.grad).all()
    half = loss({"species": fc(x).detach().half(), "embedding": x.half()}, target)
    assert torch.isfinite(half)


# ----- hierarchy, mixup, factories ---------------------------------------------------------
def test_hierarchical_soft_targets_sum_through_the_maps(taxonomy):
    levels = resolved_levels("levels.family.loss=class_balanced")
    crit = build_criterion(levels, taxonomy)
    species = torch.tensor([[0.7, 0.0, 0.3, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.4, 0.0, 0.6],
                            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    targets = {"species": species, "genus": torch.tensor([0, 1, 0]), "family": torch.tensor([0, 1, 0])}
    for level in ("genus", "family"):
        got = crit.level_target(level, targets)
        mapping = taxonomy.level_map(level)
        expected = torch.zeros(3, taxonomy.num_classes(level))
        for b in range(3):
            for s in range(6):
                expected[b, mapping[s]] += species[b, s]
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got.sum(1), torch.ones(3))

    outputs = {level: torch.randn(3, taxonomy.num_classes(level)) for level in levels}
    result = crit(outputs, targets)
    parts = {level: crit.losses[level](outputs, crit.level_target(level, targets))[0] for level in levels}
    torch.testing.assert_close(result["loss"], parts["species"] + 0.5 * parts["genus"] + 0.25 * parts["family"])
    assert set(result) == {"loss", "species", "genus", "family"}
    assert not result["genus"].requires_grad


def test_hierarchical_hard_targets_derived_from_species_when_missing(taxonomy):
    levels = resolved_levels()
    del levels["species"]
    crit = build_criterion(levels, taxonomy)
    species = torch.tensor([0, 3, 5])
    assert crit.level_target("genus", {"species": species}).tolist() == [0, 1, 2]
    assert crit.level_target("family", {"species": species}).tolist() == [0, 1, 1]
    assert set(crit.losses) == {"genus", "family"}


@pytest.mark.parametrize("loss_name,head", [("subcenter_arcface", "subcenter_arcface"), ("ams", "linear"),
                                            ("seesaw", "linear")])
def test_mixup_with_hard_label_loss_is_refused(loss_name, head, taxonomy):
    levels = resolved_levels(f"levels.genus.head={head}", f"levels.genus.loss={loss_name}", "levels.family=null",
                             "sampler=pk")
    check_mixup_compatible(levels, {"mixup": 0.0, "cutmix": 0.0})
    with pytest.raises(HerbensError, match=rf"levels\.genus\.loss\[0\]: mixup/cutmix cannot be combined with "
                                           rf".*{loss_name} on level genus"):
        check_mixup_compatible(levels, {"mixup": 0.8, "cutmix": 0.0})
    arcface = resolved_levels("levels.species.head=subcenter_arcface",
                              "levels.species.loss=[ce, subcenter_arcface]")
    with pytest.raises(HerbensError, match=r"levels\.species\.loss\[1\]: mixup/cutmix cannot be combined with "
                                           r"margin loss subcenter_arcface"):
        check_mixup_compatible(arcface, {"mixup": 0.0, "cutmix": 1.0})
    # The same refusal at run time, should the start-up check be skipped.
    crit = build_criterion(levels, taxonomy)
    outputs = {"species": torch.randn(2, 6), "genus": torch.randn(2, 3), "embedding": torch.randn(2, 4),
               "genus_margin_loss": torch.tensor(1.0)}
    with pytest.raises(HerbensError, match="mixup/cutmix cannot be combined"):
        crit(outputs, {"species": torch.full((2, 6), 1 / 6)})


def test_factory_errors(taxonomy):
    # Unknown names and parameters, and a loss with the wrong head, are refused when the recipe
    # loads (tests/test_config.py); what only the data can show is refused here.
    with pytest.raises(HerbensError, match="counts"):
        build_level_loss("seesaw", "species", C, COUNTS[:3])
    assert set(LOSSES) == {"ce", "class_balanced", "seesaw", "logit_adjusted", "subcenter_arcface", "ams"}


def _teacher_batch(taxonomy, labels, seed=0):
    """Hard labels per level and a fully stored teacher row (K = C) per image and level."""
    g = torch.Generator().manual_seed(seed)
    targets = {"species": labels}
    for level in ("species", "genus", "family"):
        c = taxonomy.num_classes(level)
        logp = torch.log_softmax(torch.randn(len(labels), c, generator=g) * 2, dim=1)
        order = torch.argsort(logp, dim=1, descending=True)
        targets[f"teacher.{level}.classes"] = order
        targets[f"teacher.{level}.logp"] = logp.gather(1, order)
        targets[f"teacher.{level}.rest"] = torch.zeros(len(labels))
        if level != "species":
            targets[level] = torch.as_tensor(taxonomy.level_map(level))[labels]
    return targets


def _dense_kl(z, classes, logp, t):
    """Per image: T^2 KL(q_T || softmax(z / T)) by a loop over classes."""
    out = []
    for b in range(len(z)):
        q = torch.zeros(z.shape[1], dtype=torch.float64)
        q[classes[b]] = logp[b].double().exp()
        q_t = q ** (1 / t) / (q ** (1 / t)).sum()
        log_s = torch.log_softmax(z[b].double() / t, dim=0)
        out.append(t * t * sum(q_t[j] * (torch.log(q_t[j]) - log_s[j]) for j in range(len(q)) if q_t[j] > 0))
    return torch.stack(out)


@pytest.mark.parametrize("beta", [None, 0.99])
def test_distilled_levels_mix_the_class_weighted_kl_with_their_own_loss(taxonomy, beta):
    levels = resolved_levels("levels.species.loss=class_balanced")
    alpha, t = 0.3, 2.0
    distill = {"levels": ["species", "genus", "family"], "alpha": alpha, "temperature": t,
               "class_balanced_beta": beta}
    crit = build_criterion(levels, taxonomy, distill)
    labels = torch.tensor([0, 0, 0, 3, 5])
    targets = _teacher_batch(taxonomy, labels)
    outputs = {level: torch.randn(5, taxonomy.num_classes(level)) for level in levels}
    result = crit(outputs, targets)
    per_image = torch.ones(5, dtype=torch.float64) if beta is None else torch.as_tensor(
        class_balanced_weights(taxonomy.level_counts("species"), beta))[labels]
    expected = 0.0
    for level, level_weight in (("species", 1.0), ("genus", 0.5), ("family", 0.25)):
        own = crit.losses[level](outputs, crit.level_target(level, targets))[0]
        kd = (_dense_kl(outputs[level], targets[f"teacher.{level}.classes"], targets[f"teacher.{level}.logp"], t)
              * per_image).mean()
        assert float(result[f"{level}_distill"]) == pytest.approx(float(kd), rel=1e-5)
        expected = expected + level_weight * ((1 - alpha) * own.double() + alpha * kd)
    assert float(result["loss"]) == pytest.approx(float(expected), rel=1e-5)
