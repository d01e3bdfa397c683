"""MovieLens cold start with the metarec SDK: meta-train, evaluate, adapt, recommend, save.

A cold-start user has rated only a handful of movies. Instead of one global model that treats
every new user alike, a meta-learner learns a model *that is quick to personalise*: at
request time it adapts to the user's first ratings (their "support set") and then scores the
catalogue for that user alone. This tutorial walks through the whole SDK on MovieLens-100K:

1. load the ratings and split users by arrival time (``metarec.UserTasks``): the earliest
   70 % are meta-training users, the next 10 % validation users (early stopping), the last
   20 % are the cold-start test users, each seen through their first 10 ratings;
2. meta-train two learners, each with early stopping on the validation users:

   * MeLU-style MAML (``metarec.presets.melu``): one gradient step on the support set
     adapts the decision layers; the meta-gradient flows through that step;
   * the memory-based learner (``metarec.MemoryLearner``): a GRU reads the support set and
     modulates the decision layers; adaptation is one forward pass, no gradient step;

3. evaluate on the test users: the query loss before / after adaptation
   (``learner.evaluate``), and MAE / nDCG@10 of the ratings they gave *after* their first 10,
   next to a simple reference that personalises only a per-user offset on the item means;
4. take one test user as a brand-new user: ``learner.adapt(first_ratings, features)`` and
   ``user.recommend(k=10)``, printed with movie titles; then ``adapt_many`` /
   ``recommend_many`` for every test user at once (what a nightly batch job does);
5. ``learner.save("meta.keras")`` and ``metarec.load(...)``: the file holds the model, the
   metarec settings and the feature encoder, so the loaded learner answers identically
   (this file is what ``metarec serve`` and ``metarec score-batch`` read).

    python examples/movielens_cold_start.py                      # ../shared/data/ml-100k
    python examples/movielens_cold_start.py --data path/to/ml-100k --epochs 20
    python examples/movielens_cold_start.py --data synthetic     # no download needed

MovieLens is not bundled (its licence forbids redistribution): point ``--data`` at an
extracted ``ml-100k`` folder, or fetch one with ``metarec.datasets.download_movielens("100k")``.
The default run takes about a minute on two CPU cores. The functions are importable
(``tests/test_examples.py`` runs a tiny version).
"""

import argparse
import logging
import os
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

import metarec
from metarec.evaluation import ItemMeanUserOffset, queries_from_tasks
from metarec.evaluation.methods import user_features_of
from metarec.metrics import mae, ndcg_at_k

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "ml-100k"


# ---------------------------------------------------------------------------- data
def load_data(source):
    """``"synthetic"`` or a MovieLens folder -> (InteractionData, {item_id: title} or None)."""
    if str(source) == "synthetic":
        # Seeded synthetic users whose taste is only partly visible in their features, so
        # adapting to their ratings has something to learn (see metarec.datasets.synthetic).
        return metarec.datasets.synthetic(seed=0), None
    folder = Path(source).expanduser()
    if not folder.exists():
        raise SystemExit(
            f"No MovieLens folder at {str(folder)!r}. Pass --data PATH (an extracted ml-100k "
            "folder), --data synthetic, or download one with "
            "metarec.datasets.download_movielens('100k')."
        )
    data = metarec.datasets.load_movielens(folder)
    return data, movie_titles(folder, data)


def movie_titles(folder, data=None):
    """``{item_id: title}`` for display only.

    The loader keeps model features (genres, year) and drops the title, which is text no
    model input uses; for printing recommendations we read it back from the raw files.
    """
    if data is not None and data.items is not None and "title" in data.items.columns:
        return data.items["title"].to_dict()
    folder = Path(folder)
    variant = metarec.datasets.detect_variant(folder)
    if variant == "100k":
        frame = pd.read_csv(folder / "u.item", sep="|", header=None, usecols=[0, 1],
                            names=["item_id", "title"], encoding="latin-1")
    elif variant == "1m":
        frame = pd.read_csv(folder / "movies.dat", sep="\t", header=None, names=["line"],
                            encoding="latin-1", quoting=3)["line"].str.split("::", expand=True)
        frame = pd.DataFrame({"item_id": frame[0].astype(np.int64), "title": frame[1]})
    else:
        frame = pd.read_csv(folder / "movies.csv").rename(columns={"movieId": "item_id"})
    return dict(zip(frame["item_id"], frame["title"]))


def make_tasks(data, support_size=10, seed=0):
    """Users as tasks, split by time: the realistic cold-start protocol.

    ``user_split="time"`` makes the test users the ones who arrived *last*, so nothing about
    them (not even the existence of their ratings) reaches meta-training; ``split="time"``
    makes each user's support set their *first* ``support_size`` ratings and the query the
    ones they gave afterwards: we predict the future from the past, never the reverse.
    """
    return metarec.UserTasks(data, support_size=support_size, split="time", user_split="time",
                             seed=seed)


# ---------------------------------------------------------------------------- meta-training
def early_stopping(patience):
    # val_loss is the query loss of the validation users *after* adapting to their support
    # sets: exactly what we care about, so it is what we stop on and keep the best of.
    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                         restore_best_weights=True)


def train_maml(tasks, epochs=10, batch_size=32, patience=3, seed=0, verbose="auto"):
    """MeLU-style, second-order MAML: one inner SGD step on the decision layers."""
    keras.utils.set_random_seed(seed)  # the same initial weights every run
    learner = metarec.presets.melu(tasks.encoder, local_steps=1)  # compiled (Adam 1e-3)
    learner.fit(tasks.train, validation_data=tasks.val, epochs=epochs, batch_size=batch_size,
                callbacks=[early_stopping(patience)], seed=seed, verbose=verbose)
    return learner


def train_memory(tasks, epochs=10, batch_size=32, patience=3, units=64, seed=0, verbose="auto"):
    """Memory-based learner: a GRU reads the support set; no gradient step at adaptation."""
    keras.utils.set_random_seed(seed)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=32, hidden_units=(64, 64))
    learner = metarec.MemoryLearner(model, units=units)  # inner_steps=0: purely memory-based
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, validation_data=tasks.val, epochs=epochs, batch_size=batch_size,
                callbacks=[early_stopping(patience)], seed=seed, verbose=verbose)
    return learner


# ---------------------------------------------------------------------------- evaluation
def adapted_predictions(learner, queries, batch_users=256):
    """Each user's predicted ratings of their query items, after adapting to their support.

    ``adapt_many`` adapts a whole batch of users in one compiled, vectorised call and
    ``score_many`` scores each user's own candidates; batching bounds the memory.
    """
    out = []
    for start in range(0, len(queries), batch_users):
        chunk = queries[start:start + batch_users]
        users = learner.adapt_many([q.support for q in chunk], [q.user_features for q in chunk])
        out += learner.score_many(users, [q.item_ids for q in chunk])
    return out


def unadapted_predictions(learner, queries):
    """The meta-model's own predictions, ignoring the support set: what adaptation adds to."""
    encoder = learner.encoder
    catalogue = encoder.item_ids[1:]  # index 0 is the "unknown item" row
    out = []
    for q in queries:
        # Score the whole catalogue, then pick the query items: every call has the same shape,
        # so the compiled kernel is traced once (one shape per user would retrace each time).
        scores = learner.predict_items(catalogue, q.user_features)
        # (UserTasks fits the encoder on every item of the data, so every query item is known.)
        out.append(scores[encoder.item_index(q.item_ids) - 1])
    return out


def rating_metrics(predictions, truths, rating_range):
    """Mean over users of MAE (predictions clipped to the rating scale) and nDCG@10 of the
    user's own query items ranked by prediction (graded gain 2^rating - 1)."""
    maes = [mae(t, p, rating_range) for p, t in zip(predictions, truths)]
    ndcgs = [ndcg_at_k(t, p, 10) for p, t in zip(predictions, truths)]
    return {"mae": float(np.mean(maes)), "ndcg@10": float(np.nanmean(ndcgs))}


def evaluate_learners(learners, tasks, data):
    """Test-set figures of each learner and of a non-adaptive reference, one dict per row."""
    queries, truths = queries_from_tasks(tasks.test, data.users)
    rating_range = tasks.encoder.schema.rating_range
    # Reference: item mean + the user's mean offset on the support (damping tuned on the
    # validation users). Strong on MAE for MovieLens: it is the bar a meta-learner has to clear
    # (with more epochs, inner steps or K) before it is worth serving.
    reference = ItemMeanUserOffset().fit(tasks.train, tasks.val)
    rows = {"item mean + user offset": {**rating_metrics(reference.predict_many(queries), truths,
                                                         rating_range)}}
    for name, learner in learners.items():
        losses = learner.evaluate(tasks.test, verbose=0)  # MSE on the query, before / after
        rows[f"{name}, not adapted"] = {
            "loss": losses["loss_before"],
            **rating_metrics(unadapted_predictions(learner, queries), truths, rating_range)}
        rows[f"{name}, adapted"] = {
            "loss": losses["loss"],
            **rating_metrics(adapted_predictions(learner, queries), truths, rating_range)}
    return rows


# ---------------------------------------------------------------------------- cold-start users
def describe_items(item_ids, data, titles):
    """Title (or id) and genres of each item, for printing."""
    genres = data.items["genres"] if data.items is not None and "genres" in data.items else None
    names = []
    for item in item_ids:
        name = titles.get(item, f"item {item}") if titles else f"item {item}"
        if genres is not None and item in genres.index:
            name += f"  [{', '.join(genres.loc[item])}]"
        names.append(name)
    return names


def cold_start_user(learner, tasks, data, position=0, k=10):
    """Treat test user ``position`` as a newcomer: adapt to their first ratings, recommend.

    Returns the support frame, the features, the adapted user and its top-``k`` frame.
    """
    support = tasks.test.support_frame(position)[["item_id", "rating"]]
    user_id = tasks.test.user_ids[position]
    # Features are whatever the sign-up form knows (age, gender, ... for MovieLens); the
    # encoder maps categories it never saw to an "unknown" bucket, so new values are safe.
    features = user_features_of(data.users, user_id)
    user = learner.adapt(support, features)
    top = user.recommend(k=k)  # seen (support) items are excluded by default
    return support, features, user, top


def recommend_everyone(learner, tasks, k=10, relevance=4.0):
    """Top-``k`` for every test user in one ``adapt_many`` + ``recommend_many`` pass.

    Returns the recommendations, the users per second, and the mean share of each user's
    top-``k`` that they rated at least ``relevance`` later on (their query set): a rough,
    conservative hit rate, since users rated only a small part of the catalogue.
    """
    test = tasks.test
    start = time.perf_counter()
    supports = [test.support_frame(i) for i in range(len(test))]
    features = [user_features_of(tasks.data.users, u) for u in test.user_ids]
    adapted = learner.adapt_many(supports, features)
    recs = learner.recommend_many(adapted, k=k)
    seconds = time.perf_counter() - start
    hits = []
    for i, (item_ids, _) in enumerate(recs):
        query = test.query_frame(i)
        liked = set(query.loc[query["rating"] >= relevance, "item_id"].tolist())
        hits.append(len(liked & set(item_ids.tolist())) / k)
    return recs, len(test) / seconds, float(np.mean(hits))


def save_and_reload(learner, path, support, features, candidates):
    """Save to one ``.keras`` file, load it back, and return the largest score difference of
    the two learners for the same user and candidates (expected ~0)."""
    learner.save(path)
    loaded = metarec.load(path)
    before = learner.adapt(support, features).score(candidates)
    after = loaded.adapt(support, features).score(candidates)
    return loaded, float(np.max(np.abs(before - after)))


# ---------------------------------------------------------------------------- the tutorial
def run(data="synthetic", epochs=10, batch_size=32, patience=3, k=10, seed=0, out=None,
        verbose="auto", print_fn=print):
    """Run every step; returns a dict of what each step produced (for tests and notebooks)."""
    started = time.perf_counter()
    dataset, titles = load_data(data)
    tasks = make_tasks(dataset, seed=seed)
    print_fn(f"Data: {dataset.num_users} users, {dataset.num_items} items, "
             f"{len(dataset.interactions)} ratings -> {tasks!r}")

    print_fn(f"\n[1/4] Meta-training (at most {epochs} epochs, early stopping on val_loss)")
    learners = {}
    for name, train in (("MAML (MeLU, 1 step)", train_maml), ("memory-based (GRU)", train_memory)):
        t0 = time.perf_counter()
        learners[name] = train(tasks, epochs=epochs, batch_size=batch_size, patience=patience,
                               seed=seed, verbose=verbose)
        history = learners[name].history.history
        best = int(np.argmin(history["val_loss"]))
        print_fn(f"  {name}: {len(history['loss'])} epochs in {time.perf_counter() - t0:.0f} s, "
                 f"best val_loss {history['val_loss'][best]:.3f} at epoch {best + 1}")

    print_fn(f"\n[2/4] Cold-start test users ({len(tasks.test)}): first {tasks.support_size} "
             "ratings adapt, the later ones are scored")
    table = evaluate_learners(learners, tasks, dataset)
    print_fn("| method | query MSE | MAE | nDCG@10 |\n|---|---|---|---|")
    for name, row in table.items():
        loss = f"{row['loss']:.3f}" if "loss" in row else "-"
        print_fn(f"| {name} | {loss} | {row['mae']:.3f} | {row['ndcg@10']:.3f} |")

    learner = learners["MAML (MeLU, 1 step)"]
    print_fn("\n[3/4] One cold-start user, with the MAML learner")
    support, features, user, top = cold_start_user(learner, tasks, dataset, k=k)
    print_fn(f"  features: {features}")
    print_fn("  their first ratings:")
    for name, rating in zip(describe_items(support["item_id"], dataset, titles), support["rating"]):
        print_fn(f"    {rating:.0f}  {name}")
    print_fn(f"  top {k} for them:")
    for name, score in zip(describe_items(top["item_id"], dataset, titles), top["score"]):
        print_fn(f"    {score:.2f}  {name}")
    recs, users_per_s, hit_rate = recommend_everyone(learner, tasks, k=k)
    print_fn(f"  adapt_many + recommend_many: top {k} for all {len(recs)} test users at "
             f"{users_per_s:.0f} users/s (first call, compilation included); on average "
             f"{hit_rate:.1%} of each top {k} are movies the user later rated 4+")

    print_fn("\n[4/4] Save and load")
    out = Path(out) if out else Path("runs/movielens_cold_start")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "maml.keras"
    candidates = top["item_id"].to_numpy()
    loaded, diff = save_and_reload(learner, path, support, features, candidates)
    learners["memory-based (GRU)"].save(out / "memory.keras")
    print_fn(f"  {path} ({os.path.getsize(path) / 1e6:.1f} MB): the loaded learner's scores "
             f"differ by at most {diff:.1e}")
    print_fn(f"\nDone in {time.perf_counter() - started:.0f} s "
             f"(Keras backend: {keras.backend.backend()}).")
    return {"data": dataset, "tasks": tasks, "learners": learners, "table": table,
            "support": support, "features": features, "user": user, "top": top,
            "recommendations": recs, "hit_rate": hit_rate, "saved": path, "loaded": loaded,
            "max_score_difference": diff}


def main(argv=None):
    # Each learner compiles its kernels once per padded shape (a handful of buckets), which
    # TensorFlow's heuristic reports as "excessive retracing"; the warning is noise here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="a MovieLens folder, or 'synthetic' (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="most meta-training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="users per meta-batch")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience")
    parser.add_argument("--k", type=int, default=10, help="recommendations per user")
    parser.add_argument("--out", default="runs/movielens_cold_start", help="where models go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return run(data=args.data, epochs=args.epochs, batch_size=args.batch_size,
               patience=args.patience, k=args.k, seed=args.seed, out=args.out,
               verbose=0 if args.quiet else "auto")


if __name__ == "__main__":
    main()
