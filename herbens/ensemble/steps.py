"""The validation table being built: each step cross-fitted, kept by one rule, scored honestly.

Every fitted value has one set of parameters per fit of :class:`herbens.ensemble.crossfit.NestedFolds`.
Each group of fits (the top group: all validation rows; with nesting, one more per outer fold,
on the rows outside it) decides for itself whether a step is kept, by the keep rule
(:func:`herbens.ensemble.keep_rule.keep_test`) on its own inner out-of-fold predictions. The top group's decision is the one shown and applied to the
test split; the other groups' final values predict their outer fold: the ``honest`` column.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from herbens.ensemble.combine import Params
from herbens.ensemble.crossfit import NestedFolds, evaluate_fits, scores_of
from herbens.ensemble.keep_rule import KeepTest, keep_test
from herbens.ensemble.stores import AlignedSplit

ROWS_PER_FITTED_VALUE = 10


class Steps:
    """The table rows and the state in use: every fit's parameters and each group's predictions.

    ``fits[j]`` are fit j's current parameters; the top group's full fit is applied to the test
    split. Rows whose parameters are given rather than fitted are scored lazily, all together
    in one pass.
    """

    def __init__(self, split: AlignedSplit, folds: NestedFolds, chunk_rows: int, log: Callable):
        self.split, self.folds, self.chunk_rows, self.log = split, folds, chunk_rows, log
        self.rows: list[dict] = []
        self.fits: list[Params] = []
        self._current: int | None = None  # row whose parameters the top group uses
        self._state: tuple[np.ndarray, np.ndarray] | None = None  # oof [N, groups], honest [N]
        self._pending: list[tuple[int, list[Params]]] = []

    @property
    def params(self) -> Params:
        """The full fit's parameters in use."""
        return self.fits[self.folds.full]

    def same(self, params: Params) -> list[Params]:
        """The same parameters for every fit (nothing fitted)."""
        return [params] * self.folds.num_fits

    def add(self, name: str, fits: list[Params], current: bool = False, show_params: bool = True) -> None:
        """Append a row to be scored with ``fits``; ``current`` makes them every group's parameters."""
        row = {"step": name, "kept": None}
        if show_params:
            row["params"] = fits[self.folds.full].to_json()
        self.rows.append(row)
        self._pending.append((len(self.rows) - 1, fits))
        if current:
            self.fits, self._current, self._state = fits, len(self.rows) - 1, None

    def flush(self) -> None:
        """Score every pending row (in-sample, out-of-fold, honest) in one pass."""
        if not self._pending:
            return
        ins, oof, honest = evaluate_fits(self.split, self.folds, [f for _, f in self._pending], self.chunk_rows)
        for g, (index, _) in enumerate(self._pending):
            self.rows[index].update(self._scores(ins[:, g], oof[:, self.folds.top_group, g], honest[:, g]))
            if index == self._current:
                self._state = (oof[:, :, g], honest[:, g])
        self._pending = []

    def _scores(self, ins: np.ndarray, oof: np.ndarray, honest: np.ndarray) -> dict:
        out = {"in_sample": scores_of(self.split, ins), "out_of_fold": scores_of(self.split, oof)}
        if self.folds.nested:
            out["honest"] = scores_of(self.split, honest)
        return out

    def current_scores(self) -> dict:
        """Scores of the parameters in use (honest: of each group's own choices so far)."""
        self.flush()
        row = self.rows[self._current]
        out = {"in_sample": row["in_sample"], "out_of_fold": row["out_of_fold"]}
        if self.folds.nested:
            out["honest"] = scores_of(self.split, self._state[1])
        return out

    def too_few_rows(self, name: str, fitted_values: int) -> bool:
        """Whether validation is too small to judge a step fitting ``fitted_values`` values (then it is skipped).

        Decided on all validation rows, for every group alike.
        """
        n, classes = len(self.split), self.split.space.num_classes
        reason = None
        if n < classes:
            reason = f"{n} validation rows for {classes} classes"
        elif n < ROWS_PER_FITTED_VALUE * fitted_values:
            reason = f"{n} validation rows for {fitted_values} fitted values (< {ROWS_PER_FITTED_VALUE} each)"
        if reason:
            self.log(f"{name}: not fitted, validation too small ({reason}); keeping the simpler choice")
            self.rows.append({"step": f"{name}: skipped ({reason})", "kept": False, **self.current_scores()})
        return reason is not None

    def _group_choice(self, group: int, oof: np.ndarray) -> KeepTest:
        """The keep rule on the group's own rows: its inner out-of-fold predictions in use
        against each alternative's."""
        mask, species = self.folds.in_group(group), self.split.space.species
        current = species[self._state[0][mask, group]]
        return keep_test(self.split.labels[mask], current, [species[oof[mask, a]] for a in range(oof.shape[1])])

    def consider(self, name: str, alternatives: list[list[Params]], labels: Sequence[str] = ("",),
                 forced: bool = False) -> bool:
        """Each group keeps its best out-of-fold alternative if the keep rule says so.

        ``alternatives`` (simplest first; the first wins ties) each hold one Params per fit.
        ``forced`` (values given by the user): the single alternative is applied. Returns the
        top group's decision.
        """
        if forced:
            self.add(name, alternatives[0], current=True)
            self.rows[-1]["kept"] = True
            return True
        self.flush()
        ins, oof, honest = evaluate_fits(self.split, self.folds, alternatives, self.chunk_rows)
        fits, state_oof, state_honest = list(self.fits), self._state[0].copy(), self._state[1].copy()
        for group in range(self.folds.num_groups):
            test = self._group_choice(group, oof[:, group])
            best = test.best
            if group == self.folds.top_group:
                top = test
            if test.kept:
                for j in range(self.folds.fit_index(group, 0), self.folds.fit_index(group, self.folds.k) + 1):
                    fits[j] = alternatives[best][j]
                state_oof[:, group] = oof[:, group, best]
                if group != self.folds.top_group:  # its outer fold, which it never saw
                    held_out = self.folds.top.fold == group
                    state_honest[held_out] = honest[held_out, best]
        best = top.best
        row = {"step": name + labels[best], "kept": top.kept, "params": alternatives[best][self.folds.full].to_json(),
               **self._scores(ins[:, best], oof[:, self.folds.top_group, best], state_honest),
               "keep_test": {"gain": round(top.gain, 4), "p": round(top.p, 4), "rows_changed": top.changed}}
        self.rows.append(row)
        self.fits, self._state = fits, (state_oof, state_honest)
        if top.kept:
            self._current = len(self.rows) - 1
        return top.kept
