"""Method names of ``metarec evaluate``: each name builds a fresh, untrained method.

``build_methods("baselines,melu-1", data, epochs=...)`` returns the methods in order, with
the groups ``baselines`` (the nine of BENCHMARK.md: rating baselines 1-5 and catalogue-ranking
baselines 6-9), ``ranking-baselines`` (6-9 only), ``learners`` and ``learned-optimizers``
(the LSTM meta-learner's rows) expanded.
"""

from __future__ import annotations

from collections.abc import Callable

from metarec.evaluation.methods import GlobalMean, ItemMean, ItemMeanUserOffset, Method
from metarec.evaluation.neural import (
    FineTune,
    GlobalModel,
    _EarlyStoppedLearnerMethod,
    catalogue_method,
    meta_learner_method,
    residual_method,
)
from metarec.evaluation.ranking_baselines import EASE, ImplicitALS, ItemKNN, MostPopular

__all__ = ["GROUPS", "METHOD_HELP", "build_methods", "method_names"]

METHOD_HELP = {
    "global-mean": "baseline 1: the global mean rating",
    "item-mean": "baseline 2: damped item mean (damping tuned on validation users)",
    "item-mean-offset": "baseline 3: damped item mean + damped support offset (tuned)",
    "global-model": "baseline 4: rating_mlp trained the ordinary way, early stopping on validation",
    "fine-tune": "baseline 5: global model + per-user SGD (steps, lr, adapted subset tuned on validation)",
    "most-popular": "baseline 6: most popular items of the meta-train users (matrix all-rated / liked tuned)",
    "ease": "baseline 7: EASE^R fold-in (lambda, matrix, fallback tuned on validation Recall@20)",
    "item-knn": "baseline 8: cosine item-kNN fold-in (neighbourhood size, matrix, fallback tuned)",
    "implicit-als": "baseline 9: implicit ALS fold-in (factors, regularisation, alpha, matrix, fallback tuned)",
    "melu-1": "MeLU-style second-order MAML, 1 local step (presets.melu)",
    "melu-5": "MeLU-style second-order MAML, 5 local steps (presets.melu)",
    "fomaml": "first-order MAML, 1 inner step, decision layers adapted",
    "reptile": "Reptile, 5 inner steps, decision layers adapted",
    "meta-sgd": "Meta-SGD: MAML with meta-learned per-parameter inner rates, 1 step",
    "residual-maml": "second-order MAML on top of the damped item mean, per-user offset adapts (1 step)",
    "memory": "memory-based: a GRU reads the support set and FiLM-conditions the decision layers (no steps)",
    "memory-maml": "memory-based conditioning followed by 1 second-order MAML step",
    "lstm-optimizer": "learned update rule: a coordinate-wise LSTM (16) writes the decision layers' update "
                      "(Andrychowicz form, inner_lr 0.01 output scale), 1 step, meta-trained second order",
    "lstm-optimizer-5": "lstm-optimizer with 5 steps of the learned rule",
    "lstm-ravi-larochelle": "learned update rule, Ravi-Larochelle form: the weights are the cell state, input "
                            "gate = learned rate, forget gate = learned decay (LSTM 16), 1 step",
    "residual-maml-proximal": "residual-maml with 5 inner steps and a proximal pull (1.0) toward the initialisation "
                              "(= presets.residual_maml_tuned, the winner of --search residual-maml)",
    "residual-maml-ranking": "residual-maml with a sampled pairwise ranking term (weight 0.5) in the meta-loss",
    "residual-memory": "memory-based learner (GRU, FiLM, no steps) over the damped item mean",
    "catalogue-two-tower": "two-tower MAML for top-k lists (presets.catalogue_two_tower): co-occurrence item "
                           "vectors, a linear inner step on the user vector, catalogue softmax outer loss; "
                           "rating head over the damped item mean",
}
GROUPS = {
    "baselines": ("global-mean", "item-mean", "item-mean-offset", "global-model", "fine-tune",
                  "most-popular", "ease", "item-knn", "implicit-als"),
    "ranking-baselines": ("most-popular", "ease", "item-knn", "implicit-als"),
    "learners": ("melu-1", "melu-5", "fomaml", "reptile", "meta-sgd", "residual-maml", "memory", "memory-maml"),
    "ideas": ("residual-maml-proximal", "residual-maml-ranking", "residual-memory"),
    "catalogue": ("catalogue-two-tower",),
    "learned-optimizers": ("lstm-optimizer", "lstm-optimizer-5", "lstm-ravi-larochelle"),
}


def method_names() -> list[str]:
    """Every method name and group, for ``--list-methods``."""
    return list(METHOD_HELP) + list(GROUPS)


def _melu(name: str, steps: int, epochs: int) -> Method:
    def build(train_tasks, seed):
        import keras

        from metarec.presets import melu

        keras.utils.set_random_seed(int(seed))
        return melu(train_tasks.encoder, local_steps=steps)

    method = _EarlyStoppedLearnerMethod(name, build, {"epochs": epochs, "batch_size": 32, "max_query": 128})
    method.settings = {"preset": f"melu(local_steps={steps})"}
    return method


def build_methods(spec: str, data, epochs: int | None = None) -> list[Method]:
    """The methods named in the comma-separated ``spec``; ``epochs`` caps every neural
    method's training epochs (default 30; early stopping on validation users still applies)."""
    names: list[str] = []
    for raw in str(spec).split(","):
        name = raw.strip()
        if not name:
            continue
        expanded = GROUPS.get(name, (name,))
        for n in expanded:
            if n not in METHOD_HELP:
                raise ValueError(f"unknown method {n!r}; choose from {method_names()}")
            if n not in names:
                names.append(n)
    if not names:
        raise ValueError(f"no method named in --methods, got {spec!r}")
    epochs = 30 if epochs is None else epochs
    global_model = GlobalModel(epochs=epochs)
    factories: dict[str, Callable[[], Method]] = {
        "global-mean": GlobalMean,
        "item-mean": ItemMean,
        "item-mean-offset": ItemMeanUserOffset,
        "global-model": lambda: global_model,
        "fine-tune": lambda: FineTune(global_model, users=data.users),
        "most-popular": MostPopular,
        "ease": EASE,
        "item-knn": ItemKNN,
        "implicit-als": ImplicitALS,
        "melu-1": lambda: _melu("melu-1", 1, epochs),
        "melu-5": lambda: _melu("melu-5", 5, epochs),
        "fomaml": lambda: meta_learner_method("fomaml", "fomaml", inner_steps=1, epochs=epochs),
        "reptile": lambda: meta_learner_method("reptile", "reptile", inner_steps=5, epochs=epochs),
        "meta-sgd": lambda: meta_learner_method("meta-sgd", "meta-sgd", inner_steps=1, epochs=epochs),
        "memory": lambda: meta_learner_method("memory", "memory", inner_steps=0, epochs=epochs),
        "memory-maml": lambda: meta_learner_method("memory-maml", "memory", inner_steps=1, epochs=epochs),
        "lstm-optimizer": lambda: meta_learner_method("lstm-optimizer", "lstm-optimizer", inner_steps=1,
                                                      epochs=epochs),
        "lstm-optimizer-5": lambda: meta_learner_method("lstm-optimizer-5", "lstm-optimizer", inner_steps=5,
                                                        epochs=epochs),
        "lstm-ravi-larochelle": lambda: meta_learner_method(
            "lstm-ravi-larochelle", "lstm-optimizer", inner_steps=1, epochs=epochs,
            learner_options={"form": "ravi_larochelle"}),
        "residual-maml-proximal": lambda: residual_method(
            "residual-maml-proximal", inner_steps=5, epochs=epochs, proximal=1.0),
        "residual-maml-ranking": lambda: residual_method(
            "residual-maml-ranking", inner_steps=1, epochs=epochs, ranking_weight=0.5),
        "residual-memory": lambda: residual_method("residual-memory", inner_steps=0, epochs=epochs,
                                                   memory=True),
        "residual-maml": lambda: residual_method("residual-maml", inner_steps=1, epochs=epochs),
        "catalogue-two-tower": lambda: catalogue_method("catalogue-two-tower", epochs=min(epochs, 10)),
    }
    return [factories[n]() for n in names]
