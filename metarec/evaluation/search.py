"""Hyper-parameter search for meta-learners on validation users only.

``search(protocol, "residual-maml", grid)`` fits one method per grid point on the meta-train
users of protocol Q1 (early stopping on the validation users, as in the report), scores each on
the *validation* users and returns the table, best first. Test users are never read, so the
winner can be reported on test users afterwards without selection bias; the winner becomes a
named preset (see ``metarec.presets``).

    metarec evaluate --data DIR --search residual-maml --out runs/search

runs :data:`GRIDS` for the named method.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

#: The documented search spaces (one seed; the 3-seed report then re-fits the winner).
GRIDS: dict[str, dict[str, Sequence]] = {
    "residual-maml": {"inner_steps": (1, 5), "inner_lr": (0.01, 0.05), "proximal": (0.0, 1.0)},
}


def grid_points(axes: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the ``axes`` values, in order."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def build_point(method: str, point: Mapping, epochs: int):
    """A fresh, unfitted method of kind ``method`` with the settings of one grid point."""
    from metarec.evaluation.neural import residual_method

    if method != "residual-maml":
        raise ValueError(f"no search space for method {method!r}; choose from {sorted(GRIDS)}")
    point = dict(point)
    name = "residual-maml(" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"
    return residual_method(name, inner_steps=int(point.pop("inner_steps")),
                           inner_lr=float(point.pop("inner_lr")), epochs=epochs, **point)


def search(protocol, method: str, axes: Mapping[str, Sequence] | None = None, k: int = 10,
           seed: int = 0, epochs: int = 30, progress: bool = True) -> pd.DataFrame:
    """Fit every grid point at support size ``k`` and score it on validation users.

    Returns one row per point (its settings, epochs trained, validation MAE / RMSE / nDCG@3 /
    Recall@20), sorted by validation MAE.
    """
    import keras

    axes = GRIDS.get(method) if axes is None else axes
    if not axes:
        raise ValueError(f"no search space for method {method!r}; choose from {sorted(GRIDS)}")
    tasks = protocol.tasks(k)
    points = grid_points(axes)
    bar = keras.utils.Progbar(len(points)) if progress else None
    rows = []
    for i, point in enumerate(points):
        candidate = build_point(method, point, epochs)
        candidate.fit(tasks.train, tasks.val, seed=seed)
        scores = protocol.evaluate_method(candidate, split="val", k=k)
        rows.append({**point, "epochs_trained": getattr(candidate, "epochs_trained_", None),
                     "val_mae": float(np.nanmean(scores["mae"])),
                     "val_rmse": float(np.nanmean(scores["rmse"])),
                     "val_ndcg@3": float(np.nanmean(scores["ndcg@3"])),
                     "val_recall@20": float(np.nanmean(scores["recall@20"]))})
        candidate.learner = None
        if bar:
            bar.update(i + 1)
    return pd.DataFrame(rows).sort_values("val_mae", kind="stable").reset_index(drop=True)
