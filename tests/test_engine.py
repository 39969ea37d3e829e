"""Combining test-time views, against a plain loop."""

import math

import pytest
import torch

from herbens.core.errors import HerbensError
from herbens.infer.loop import combine_views


def test_view_combination_matches_a_loop_reference():
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    mean = combine_views(logits, "logit")
    prob = combine_views(logits, "prob")
    for b in range(3):
        expected_mean = [sum(logits[b, v, c].item() for v in range(4)) / 4 for c in range(5)]
        assert mean[b].tolist() == pytest.approx(expected_mean, abs=1e-6)
        probs = [[math.exp(logits[b, v, c].item()) / sum(math.exp(logits[b, v, k].item()) for k in range(5))
                  for c in range(5)] for v in range(4)]
        expected_prob = [math.log(sum(p[c] for p in probs) / 4) for c in range(5)]
        assert prob[b].tolist() == pytest.approx(expected_prob, abs=1e-5)
    assert combine_views(logits, "none") is logits
    with pytest.raises(HerbensError, match="tta_space"):
        combine_views(logits, "median")
