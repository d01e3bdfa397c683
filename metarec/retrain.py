"""Retraining behind a promotion gate: the loop from logged interactions back to serving.

``retrain`` reads logged interactions, warm-starts meta-training from the newest model version
in a model folder, evaluates the old and the new model on the most recent users (held out by
the time of their first interaction), and writes the next numbered version only when the new
model is not worse than the old one beyond ``margin``. A running server polls the folder and
swaps the new version in by itself.

New items and users. The feature encoder (vocabularies, feature tables) of the current model is
kept as it is: items that appear only in the logs map to the out-of-vocabulary bucket (index
0), which the model has learned as "an item we know nothing about", and new users need no
vocabulary at all (a user is represented by their interactions and features, not an id).
Growing the vocabularies needs a full training run with a new encoder (``UserTasks`` on the
whole data); the counts of unknown items are reported so that one knows when it is due.
"""

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from metarec.batch_scoring import read_table, resolve_model_path
from metarec.interaction_log import InteractionLog, is_postgres_url, open_interaction_log
from metarec.interactions import InteractionData
from metarec.metrics import mae, ndcg_at_k, rmse
from metarec.progress import resolve_verbose
from metarec.sampling import item_counts_of
from metarec.saving import load
from metarec.tasks import UserTasks


@dataclass
class RetrainResult:
    promoted: bool
    old_version: int
    new_version: int | None
    old_metrics: dict
    new_metrics: dict
    gate_metric: str
    unknown_items: int
    history: dict = field(default_factory=dict)
    report_dir: Path | None = None

    def summary(self):
        verdict = (f"promoted as version {self.new_version}" if self.promoted
                   else "refused: the current version keeps serving")
        rows = "\n".join(
            f"| {k} | {self.old_metrics[k]:.4f} | {self.new_metrics[k]:.4f} |" for k in self.old_metrics
        )
        return (
            f"Retrain of version {self.old_version}: {verdict} (gate: {self.gate_metric}).\n\n"
            f"| metric | current (v{self.old_version}) | retrained |\n|---|---|---|\n{rows}\n\n"
            f"Logged interactions on items unknown to the model: {self.unknown_items}."
        )


def read_logs(source):
    """Logged interactions from the server's log (a SQLite file or a ``postgresql://`` URL),
    or a Parquet / CSV file."""
    if is_postgres_url(source):
        with open_interaction_log(source) as log:
            return log.to_pandas()
    source = Path(source)
    if source.suffix in (".sqlite", ".db", ".sqlite3"):
        if not source.exists():
            raise ValueError(f"No interaction log at {str(source)!r}.")
        with InteractionLog(source) as log:
            return log.to_pandas()
    return read_table(source)


def _as_id_type(values, known_ids):
    """Logged ids are strings; use the model's integer ids where they parse as integers."""
    known = [i for i in known_ids if i is not None]
    if known and all(isinstance(i, (int, np.integer)) for i in known):
        parsed = pd.to_numeric(pd.Series(values), errors="coerce")
        whole = parsed.notna() & (parsed == parsed.round())
        out = pd.Series(values, dtype=object).copy()
        out[whole] = parsed[whole].astype(np.int64).astype(object)
        return out.to_numpy()
    return np.asarray(values, dtype=object)


def latest_version(model_dir):
    """The highest version number in a folder of numbered versions; ``ValueError`` when the
    folder is missing or holds none."""
    if not Path(model_dir).is_dir():
        raise ValueError(f"No model folder at {str(model_dir)!r}: pass --model-dir (model_dir=) the folder "
                         f"of numbered versions a server serves, e.g. models/recs holding 1/model.keras.")
    versions = [int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise ValueError(f"{str(model_dir)!r} holds no numbered model version (e.g. 1/model.keras).")
    return max(versions)


def holdout_metrics(learner, taskset):
    """Mean per-user metrics after adapting to each held-out user's support set (and
    features, when the logs came with a user-feature table)."""
    supports = [taskset.support_frame(i)[["item_id", "rating"]] for i in range(len(taskset))]
    queries = [taskset.query_frame(i) for i in range(len(taskset))]
    # Logged items unknown to the kept encoder are counted in the result (unknown_items), not
    # warned about once per call.
    adapted = learner.adapt_many(supports, [taskset.user_features(i) for i in range(len(taskset))],
                                 unknown_ids="ignore")
    preds = learner.score_many(adapted, [q["item_id"].to_numpy() for q in queries], unknown_ids="ignore")
    scores = {"loss": learner.evaluate(taskset, verbose=0)["loss"]}
    if learner.feedback == "explicit":
        rating_range = learner.encoder.schema.rating_range
        pairs = [(q["rating"].to_numpy(np.float64), p) for q, p in zip(queries, preds)]
        scores["mae"] = float(np.mean([mae(t, p, rating_range) for t, p in pairs]))
        scores["rmse"] = float(np.mean([rmse(t, p, rating_range) for t, p in pairs]))
        scores["ndcg@3"] = float(np.mean([ndcg_at_k(t, p, 3) for t, p in pairs]))
    return scores


def retrain(
    model_dir,
    logs,
    epochs=10,
    batch_size=32,
    learning_rate=1e-3,
    support_size=10,
    fractions=(0.7, 0.1, 0.2),
    margin=0.0,
    gate_metric=None,
    report_dir=None,
    seed=0,
    verbose=1,
    user_features=None,
):
    """Retrain the newest version in ``model_dir`` on ``logs``; promote it only if not worse.

    Args:
        logs: DataFrame with ``user_id``, ``item_id``, ``rating``, ``timestamp``.
        fractions: user split by first-interaction time: train, validation (early stopping),
            held-out (the gate). The held-out users are the most recent ones.
        margin: the new model may be worse than the old one by at most this much.
        gate_metric: "mae" (explicit feedback, default) or "loss" (query loss after adaptation;
            the default for implicit feedback). Lower is better for both.
        user_features: optional DataFrame of user features (indexed by ``user_id``, or with a
            ``user_id`` column): the log holds interactions only, and without this table new
            users are trained and evaluated with unknown features although requests send
            theirs. Users missing from it get unknown features.
    Returns a ``RetrainResult``; ``promoted`` says whether a new version was written.
    """
    verbose = resolve_verbose(verbose)
    model_dir = Path(model_dir)
    old_version = latest_version(model_dir)
    old_path = resolve_model_path(model_dir / str(old_version))
    current = load(old_path)
    encoder = current.encoder
    missing = {"user_id", "item_id", "rating", "timestamp"} - set(logs.columns)
    if missing:
        raise ValueError(f"logs lack columns {sorted(missing)}; got {list(logs.columns)}.")
    frame = pd.DataFrame({
        "user_id": np.asarray(logs["user_id"], dtype=object),
        "item_id": _as_id_type(logs["item_id"], encoder.item_ids),
        "rating": logs["rating"].astype(np.float64),
        "timestamp": logs["timestamp"].astype(np.int64),
    })
    unknown_items = int((encoder.item_index(frame["item_id"].to_numpy()) == 0).sum())
    users = _user_feature_frame(user_features, encoder, frame["user_id"])
    # Item features come from the kept encoder, not from the logs: only the user side is given.
    schema = encoder.schema.replace(item_features=()) if users is not None else None
    data = InteractionData(frame, users=users, schema=schema, duplicates="last", missing_features="default")
    tasks = UserTasks(data, support_size=support_size, split="time", user_split="time",
                      fractions=fractions, encoder=encoder, seed=seed)
    if len(tasks.train) == 0 or len(tasks.test) == 0:
        raise ValueError(
            f"Too few users with more than {support_size} logged interactions to retrain and "
            f"evaluate: {len(tasks.train)} train and {len(tasks.test)} held-out users."
        )
    gate_metric = gate_metric or ("mae" if current.feedback == "explicit" else "loss")
    old_metrics = holdout_metrics(current, tasks.test)
    if gate_metric not in old_metrics:
        raise ValueError(f"gate_metric must be one of {sorted(old_metrics)}; got {gate_metric!r}.")

    keras.utils.set_random_seed(seed)
    candidate = load(old_path)  # warm start: the current weights, settings and encoder
    if candidate.objective is not None:
        # A catalogue objective draws negatives by the items' counts: those of the new data.
        candidate.objective.sampler.fit(item_counts_of(tasks.train))
    candidate.compile(optimizer=keras.optimizers.Adam(learning_rate))
    callbacks = [keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)]
    history = candidate.fit(
        tasks.train, validation_data=tasks.val if len(tasks.val) else None, epochs=epochs,
        batch_size=batch_size, callbacks=callbacks if len(tasks.val) else None, seed=seed,
        verbose=verbose,
    ).history
    new_metrics = holdout_metrics(candidate, tasks.test)
    promoted = new_metrics[gate_metric] <= old_metrics[gate_metric] + margin
    new_version = None
    if promoted:
        new_version = old_version + 1
        _publish(candidate, model_dir, new_version)
    result = RetrainResult(promoted, old_version, new_version, old_metrics, new_metrics,
                           gate_metric, unknown_items, history)
    if report_dir is not None:
        result.report_dir = write_report(result, report_dir)
    return result


def _user_feature_frame(user_features, encoder, logged_users):
    """The user-feature table as InteractionData wants it: restricted to the model's user
    features, indexed by the logged user ids (matched on their string form: the SQLite log
    holds strings, a table may hold integers)."""
    if user_features is None:
        return None
    frame = user_features
    if "user_id" in frame.columns:
        frame = frame.set_index("user_id")
    names = [spec.name for spec in encoder.schema.user_features]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ValueError(f"user_features lacks the model's user feature columns {missing}; "
                         f"got columns {list(frame.columns)}.")
    frame = frame[names].copy()
    frame.index = pd.Index([str(i) for i in frame.index], dtype=object)
    frame = frame[~frame.index.duplicated(keep="last")]
    logged = pd.unique(pd.Series(logged_users, dtype=object))
    keys = [str(u) for u in logged]
    known = [k in frame.index for k in keys]
    out = frame.loc[[k for k, ok in zip(keys, known) if ok]]
    out.index = pd.Index([u for u, ok in zip(logged, known) if ok], dtype=object, name="user_id")
    return out


def _publish(learner, model_dir, version):
    """Write a version folder completely under a hidden name, then rename it into place, so a
    watching server never sees a half-written version."""
    staging = model_dir / f".staging-{version}-{os.getpid()}-{int(time.time() * 1000)}"
    staging.mkdir()
    try:
        learner.save(staging / "model.keras")
        os.rename(staging, model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


#: Plot legend of each history key: which users, and before or after adaptation.
CURVE_LABELS = {
    "loss": "meta-train users, after adaptation",
    "loss_before": "meta-train users, before adaptation",
    "val_loss": "validation users, after adaptation",
    "val_loss_before": "validation users, before adaptation",
}
PLOT_FILE = "learning_curves.png"


def write_report(result, report_dir):
    """report.md (which links the plot) and learning_curves.png for one retrain run."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    curves = {key: values for key, values in result.history.items() if len(values)}
    text = "# Retrain report\n\n" + result.summary() + "\n"
    if curves:
        epochs = max(len(v) for v in curves.values())
        text += (f"\n## Learning curves\n\n{epochs} epoch(s) of meta-training from version "
                 f"{result.old_version} (early stopping keeps the best weights).\n\n"
                 f"![Learning curves: query loss per epoch]({PLOT_FILE})\n")
    (report_dir / "report.md").write_text(text)
    learning_curve_figure(result).savefig(report_dir / PLOT_FILE, dpi=100)
    return report_dir


def learning_curve_figure(result):
    """The learning curves of a retrain run as a matplotlib ``Figure``.

    One point per epoch on an integer axis; every curve is a mean query loss per user (the loss
    the gate's ``loss`` metric reads), and the legend says which users and whether before or
    after adaptation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = {key: values for key, values in result.history.items() if len(values)}
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=CURVE_LABELS.get(key, key))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean query loss per user")
    ax.set_title(f"Retraining from version {result.old_version}")
    if curves:
        ax.legend()
    fig.tight_layout()
    return fig
