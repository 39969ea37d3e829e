"""The keep rule on planted runs: false keeps on identical noise, power on a real prior shift,
the ensemble against its strong member, and the honest estimate against test (issue 24).

    python bench/ensemble_keep_rule.py            # 48 + 40 + 40 + 40 seeds, a few minutes on 2 cores

Uses the generators of tests/test_ensemble_keep.py (which assert the same properties) and
prints the figures the README's keep-rule paragraph quotes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_ensemble_keep as planted  # noqa: E402  (the tests' generators, not a copy of them)


def identical_noise(tmp: Path) -> None:
    kept, change = 0, []
    for (n_val, classes), seed in planted._seeds():
        rng = np.random.default_rng(1000 * classes + seed)
        tax, y, logits = planted._identical_runs(rng, classes, n_val)
        params, steps, _, space = planted._fit(tmp, f"c{classes}s{seed}", tax, logits["val"], y["val"], nested=False)
        kept += any(s["kept"] for s in steps if s["step"].startswith("+"))
        equal = params.replace(weights=np.full(3, 1 / 3), temperatures={lv: np.ones(3) for lv in params.temperatures},
                               tau=0.0, alpha=0.0, beta=0.0)
        change.append(planted._test_f1(params, space, logits["test"], y["test"])
                      - planted._test_f1(equal, space, logits["test"], y["test"]))
    print(f"identical noise runs, {len(change)} seeds: a step kept on {kept}; "
          f"mean test change against equal weights {np.mean(change):+.4f}")


def prior_shift(tmp: Path, planted_shift: float) -> None:
    kept, test_gain = 0, []
    for params, steps, _, space, test, y in planted._planted(
            tmp, f"p{planted_shift}", lambda rng: planted._prior_shift(rng, planted=planted_shift)):
        kept += next(s for s in steps if s["step"].startswith("+ inverse"))["kept"] is True
        test_gain.append(planted._test_f1(params, space, test, y)
                         - planted._test_f1(params.replace(tau=0.0), space, test, y))
    print(f"prior shift {planted_shift}, 40 seeds: tau kept on {kept}; mean test gain of the fit over tau 0 "
          f"{np.mean(test_gain):+.4f}")


def strong_and_weak(tmp: Path) -> None:
    diff = []
    for params, _, _, space, test, y in planted._planted(tmp, "sw", planted._strong_and_weak):
        strong = params.replace(weights=np.eye(3)[0], tau=0.0, alpha=0.0, beta=0.0)
        diff.append(planted._test_f1(params, space, test, y) - planted._test_f1(strong, space, test, y))
    print(f"one strong and two weak members (one ArcFace-scaled), 40 seeds: ensemble minus strong member "
          f"{np.mean(diff):+.4f} (s.e. {np.std(diff, ddof=1) / np.sqrt(len(diff)):.4f})")


def honest_estimate(tmp: Path) -> None:
    honest, oof = [], []
    for params, _, info, space, test, y in planted._planted(
            tmp, "h", lambda rng: planted._prior_shift(rng, planted=0.3), nested=True):
        f1 = planted._test_f1(params, space, test, y)
        honest.append(info["honest"]["species_macro_f1"] - f1)
        oof.append(info["out_of_fold"]["species_macro_f1"] - f1)
    print(f"small prior shift 0.3, 40 seeds, nested: honest minus test {np.mean(honest):+.4f}, "
          f"out-of-fold minus test {np.mean(oof):+.4f}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        identical_noise(tmp)
        for shift in (0.3, 1.0):
            prior_shift(tmp, shift)
        strong_and_weak(tmp)
        honest_estimate(tmp)


if __name__ == "__main__":
    main()
