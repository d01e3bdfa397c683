"""The quickstart job: meta-train on the embedded synthetic data and show what adaptation buys.

``metarec quickstart`` calls ``run_quickstart``: it generates seeded synthetic users, splits them
into meta-train / validation / cold-start test users by arrival time, trains the same network
the ordinary way (the global model) and with MAML, then adapts the meta-model to each test
user's first 10 interactions and prints MAE and nDCG@3 on the rest of their interactions.
"""

import time

import keras
import numpy as np

from metarec import datasets, models
from metarec.metrics import mae, ndcg_at_k
from metarec.maml import MAML
from metarec.pretraining import fit_global_model
from metarec.progress import resolve_verbose
from metarec.tasks import UserTasks


def user_features(data, user_ids):
    """Each user's raw feature dict (what a request for that user would carry)."""
    if data.users is None or data.users.empty:
        return [{} for _ in user_ids]
    return [data.users.loc[u].to_dict() for u in user_ids]


def cold_start_scores(data, taskset, score_fn, rating_range):
    """Mean MAE and nDCG@3 over the users of ``taskset``: ``score_fn(supports, features,
    query_item_ids) -> list of predicted ratings``."""
    supports = [taskset.support_frame(i) for i in range(len(taskset))]
    queries = [taskset.query_frame(i) for i in range(len(taskset))]
    features = user_features(data, taskset.user_ids)
    preds = score_fn(supports, features, [q["item_id"].to_numpy() for q in queries])
    maes, ndcgs = [], []
    for q, p in zip(queries, preds):
        true = q["rating"].to_numpy(np.float64)
        maes.append(mae(true, p, rating_range))
        ndcgs.append(ndcg_at_k(true, p, 3))
    return float(np.mean(maes)), float(np.mean(ndcgs))


def run_quickstart(seed=0, epochs=15, inner_steps=3, inner_lr=0.05, support_size=10, verbose="auto",
                   print_fn=print):
    """Run the quickstart and return its result rows ``[(method, mae, ndcg3)]``.

    ``verbose="auto"``: a progress bar on a terminal, one line per epoch otherwise."""
    verbose = resolve_verbose(verbose)
    start = time.time()
    keras.utils.set_random_seed(seed)
    data = datasets.synthetic(seed=seed)
    tasks = UserTasks(data, support_size=support_size, split="time", user_split="time", seed=seed)
    rating_range = tasks.encoder.schema.rating_range
    print_fn(
        f"Synthetic data: {data.num_users} users, {data.num_items} items, "
        f"{len(data.interactions)} ratings; {len(tasks.train)} meta-train, {len(tasks.val)} "
        f"validation and {len(tasks.test)} cold-start test users, support = first "
        f"{support_size} ratings."
    )

    print_fn("\n[1/2] Global model: the same network trained the ordinary way")
    global_model = models.rating_mlp(tasks.encoder)
    fit_global_model(global_model, tasks.train, tasks.val, epochs=epochs, verbose=verbose)

    print_fn(f"\n[2/2] MAML (second order, {inner_steps} inner steps on the decision layers, "
             "meta-learned per-layer inner learning rates)")
    learner = MAML(models.rating_mlp(tasks.encoder), inner_steps=inner_steps, inner_lr=inner_lr,
                   adapt="decision_layers", learn_inner_lr="per_layer")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(
        tasks.train, validation_data=tasks.val, epochs=epochs, batch_size=32, seed=seed,
        callbacks=[keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)],
        verbose=verbose,
    )

    def plain(model_learner):
        def score(supports, features, items):
            return [model_learner.predict_items(i, f) for i, f in zip(items, features)]
        return score

    def adapted(supports, features, items):
        users = learner.adapt_many(supports, features)
        return learner.score_many(users, items)

    # The global model wrapped without meta-training: its adapt() is plain per-user fine-tuning.
    global_learner = MAML(global_model, inner_steps=inner_steps, inner_lr=inner_lr, encoder=tasks.encoder,
                          feedback=tasks.encoder.schema.feedback)
    def fine_tuned(supports, features, items):
        users = global_learner.adapt_many(supports, features)
        return global_learner.score_many(users, items)

    rows = [
        ("global model, no adaptation", *cold_start_scores(data, tasks.test, plain(global_learner), rating_range)),
        ("global model, fine-tuned", *cold_start_scores(data, tasks.test, fine_tuned, rating_range)),
        ("MAML meta-model, no adaptation", *cold_start_scores(data, tasks.test, plain(learner), rating_range)),
        ("MAML meta-model, adapted", *cold_start_scores(data, tasks.test, adapted, rating_range)),
    ]
    print_fn(f"\nCold-start test users ({len(tasks.test)}), query = the ratings after the first "
             f"{support_size}:")
    print_fn(f"| {'method':<32} | {'MAE':>6} | {'nDCG@3':>6} |")
    print_fn(f"|{'-' * 34}|{'-' * 8}|{'-' * 8}|")
    for name, m, n in rows:
        print_fn(f"| {name:<32} | {m:6.4f} | {n:6.4f} |")
    print_fn(f"\nDone in {time.time() - start:.0f} s.")
    return rows
