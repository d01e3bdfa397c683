"""Meta-gradients of a tiny model in float64, for tests/test_meta_gradients.py.

Run as ``KERAS_BACKEND=... python tests/gradcheck.py OUT.npz``: a separate process per backend,
because float64 on JAX is a process-wide switch. Writes the second-order and first-order MAML
meta-gradients, central finite differences of the meta-loss, and the Reptile update.
"""

import os
import sys

import keras
import numpy as np

from metarec import backend  # noqa: E402
from metarec.learned_optimizer import FORMS, LSTMMetaLearner  # noqa: E402
from metarec.maml import MAML  # noqa: E402
from metarec.memory import MemoryLearner  # noqa: E402
from metarec.reptile import Reptile  # noqa: E402
from metarec.catalogue_objective import CatalogueObjective  # noqa: E402
from metarec.sampling import NegativeSampler  # noqa: E402
from metarec.tasks import Episode  # noqa: E402


def tiny_model():
    # sigmoid, not tanh: Keras's tanh activation computes in float32 on JAX, which would spoil
    # a float64 finite-difference check.
    x = keras.Input((3,), name="x", dtype="float64")
    h = keras.layers.Dense(4, activation="sigmoid", name="body")(x)
    out = keras.layers.Dense(1, name="decision_out")(h)
    model = keras.Model({"x": x}, out)
    rng = np.random.default_rng(42)
    model.set_weights([rng.normal(scale=0.7, size=w.shape) for w in model.get_weights()])
    return model


def episode():
    rng = np.random.default_rng(7)
    b, s, q = 3, 4, 5
    support_mask = np.ones((b, s))
    support_mask[2, 3] = 0.0  # a padded row must not count
    query_mask = np.ones((b, q))
    query_mask[1, 4] = 0.0
    return Episode(
        {"x": rng.normal(size=(b, s, 3))}, rng.normal(size=(b, s)), support_mask,
        {"x": rng.normal(size=(b, q, 3))}, rng.normal(size=(b, q)), query_mask,
    )


def two_headed_model():
    """A tiny model with an item id, an item feature ``x`` and a user feature ``u``, and two
    outputs, ``rating`` and ``ranking``: the shape of ``metarec.models.two_tower``."""
    item_id = keras.Input((), name="item_id", dtype="int32")
    x = keras.Input((3,), name="x", dtype="float64")
    u = keras.Input((2,), name="u", dtype="float64")
    h = keras.layers.Dense(4, activation="sigmoid", name="body")(keras.layers.Concatenate()([x, u]))
    bias = keras.layers.Flatten()(keras.layers.Embedding(6, 1, name="item_bias")(item_id))
    ranking = keras.layers.Add()([keras.layers.Dense(1, name="decision_out")(h), bias])
    rating = keras.layers.Dense(1, name="decision_rating")(h)
    model = keras.Model({"item_id": item_id, "x": x, "u": u}, {"rating": rating, "ranking": ranking})
    rng = np.random.default_rng(11)
    model.set_weights([rng.normal(scale=0.7, size=w.shape) for w in model.get_weights()])
    return model


def catalogue_batch():
    """An episode of 3 users over 5 items (ratings 1..5, some liked) and 8 padded negatives."""
    rng = np.random.default_rng(5)
    table = rng.normal(size=(6, 3))
    b, s, q = 3, 4, 5

    def rows(n):
        items = rng.integers(1, 6, size=(b, n)).astype(np.int32)
        users = np.repeat(rng.normal(size=(b, 1, 2)), n, axis=1)
        return {"item_id": items, "x": table[items], "u": users}, rng.integers(1, 6, size=(b, n)).astype(np.float64)

    support, support_y = rows(s)
    query, query_y = rows(q)
    support_mask = np.ones((b, s))
    support_mask[2, 3] = 0.0
    query_mask = np.ones((b, q))
    query_mask[1, 4] = 0.0
    ep = Episode(support, support_y, support_mask, query, query_y, query_mask)
    index = np.array([1, 2, 3, 4, 5, 2, 0, 0], np.int32)
    negatives = {"inputs": {"item_id": index, "x": table[index]}, "index": index,
                 "correction": rng.normal(scale=0.3, size=8), "mask": (index > 0).astype(np.float64)}
    return ep, negatives


def flat(arrays):
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def finite_difference(grad_fn, base, non_trainable, ep, eps=1e-6):
    """Central differences of the meta-loss ``grad_fn(params, ...)[0]["loss"]``, per entry."""
    sizes = [p.size for p in base]
    fd = np.zeros(sum(sizes))
    for j in range(sum(sizes)):
        losses = []
        for sign in (1.0, -1.0):
            vec = flat(base)
            vec[j] += sign * eps
            parts, start = [], 0
            for p in base:
                parts.append(vec[start:start + p.size].reshape(p.shape))
                start += p.size
            logs, _ = grad_fn(parts, non_trainable, ep)
            losses.append(float(backend.to_numpy(logs["loss"])))
        fd[j] = (losses[0] - losses[1]) / (2 * eps)
    return fd


def main(out_path):
    # Process-wide switches: only when run as a script, never on import by the test module.
    if os.environ.get("KERAS_BACKEND") == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    model = tiny_model()
    ep = episode()
    results = {}
    for name, first_order in (("second_order", False), ("first_order", True)):
        learner = MAML(model, inner_steps=2, inner_lr=0.3, adapt="all", first_order=first_order,
                       clipnorm=None, feedback="explicit")
        params, non_trainable = learner.snapshot()
        grad_fn = backend.jit(learner.meta_gradients)
        _, grads = grad_fn(params, non_trainable, ep)
        results[name] = flat(backend.to_numpy(g) for g in grads)
    # Finite differences of the meta-loss (the same for both orders: only gradients differ).
    base = [backend.to_numpy(p) for p in params]
    results["finite_difference"] = finite_difference(grad_fn, base, non_trainable, ep)
    # The proximal inner term (a pull toward the initialisation) is differentiated through too.
    prox = MAML(model, inner_steps=2, inner_lr=0.3, adapt="all", proximal=0.7, clipnorm=None,
                feedback="explicit")
    prox_fn = backend.jit(prox.meta_gradients)
    _, grads = prox_fn(params, non_trainable, ep)
    results["proximal"] = flat(backend.to_numpy(g) for g in grads)
    results["proximal_finite_difference"] = finite_difference(prox_fn, base, non_trainable, ep)
    # Inner-gradient clipping. Inactive (a large clipnorm): the exact meta-gradient. Active: the
    # clip factor counts as a constant, so for one user and one step whose factor is exactly
    # 1/2 the meta-gradient equals the unclipped one with half the inner learning rate.
    big = MAML(model, inner_steps=2, inner_lr=0.3, adapt="all", clipnorm=1e6, feedback="explicit")
    _, grads = backend.jit(big.meta_gradients)(params, non_trainable, ep)
    results["clip_inactive"] = flat(backend.to_numpy(g) for g in grads)
    one = Episode(*[{k: v[:1] for k, v in part.items()} if isinstance(part, dict) else part[:1]
                    for part in ep])
    plain = MAML(model, inner_steps=1, inner_lr=0.3, adapt="all", clipnorm=None,
                 feedback="explicit")
    start = plain.forward.split(params)[0]
    adapted, _ = plain.adapt_user(params, non_trainable, {k: v[0] for k, v in one.support.items()},
                                  one.support_y[0], one.support_mask[0])
    grad_norm = np.sqrt(sum(np.sum(np.square(backend.to_numpy(a) - backend.to_numpy(w)))
                            for a, w in zip(adapted, start))) / 0.3
    clipped = MAML(model, inner_steps=1, inner_lr=0.3, adapt="all", clipnorm=grad_norm / 2,
                   feedback="explicit")
    _, grads = backend.jit(clipped.meta_gradients)(params, non_trainable, one)
    results["clip_active"] = flat(backend.to_numpy(g) for g in grads)
    halved = MAML(model, inner_steps=1, inner_lr=0.15, adapt="all", clipnorm=None,
                  feedback="explicit")
    _, grads = backend.jit(halved.meta_gradients)(params, non_trainable, one)
    results["clip_active_reference"] = flat(backend.to_numpy(g) for g in grads)
    _, grads = backend.jit(plain.meta_gradients)(params, non_trainable, one)
    results["clip_unclipped"] = flat(backend.to_numpy(g) for g in grads)
    # The memory-based learner, with one gradient step after conditioning: the meta-gradient
    # flows through the GRU, the FiLM heads, the shared representation and the inner step.
    memory = MemoryLearner(tiny_model(), inner_steps=1, inner_lr=0.3, adapt="all", units=3,
                           clipnorm=None, feedback="explicit")
    rng = np.random.default_rng(3)
    for v in memory.support_reader.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape))
    mem_params, mem_non_trainable = memory.snapshot()
    mem_fn = backend.jit(memory.meta_gradients)
    _, grads = mem_fn(mem_params, mem_non_trainable, ep)
    results["memory"] = flat(backend.to_numpy(g) for g in grads)
    reader = {id(v) for v in memory.support_reader.trainable_variables}
    results["memory_reader"] = flat(backend.to_numpy(g) for g, v in zip(grads, memory.meta_variables)
                                    if id(v) in reader)
    results["memory_finite_difference"] = finite_difference(
        mem_fn, [backend.to_numpy(p) for p in mem_params], mem_non_trainable, ep)
    # The LSTM meta-learner, both forms, reading the parameters too: the meta-gradient flows
    # through two steps of the learned rule, the inner gradients and loss it reads (second
    # order) and into the rule's own weights. Rule weights are drawn at random so that every
    # path is active.
    for form in FORMS:
        rule_rng = np.random.default_rng(9)
        for name, first_order in ((f"lstm_{form}", False), (f"lstm_{form}_first_order", True)):
            lstm = LSTMMetaLearner(tiny_model(), inner_steps=2, inner_lr=0.3, adapt="all", hidden_size=3,
                                   form=form, read_parameters=True, first_order=first_order,
                                   clipnorm=None, feedback="explicit")
            if not first_order:
                draws = [rule_rng.normal(scale=0.5, size=v.shape)
                         for v in lstm.update_rule.trainable_variables]
            for v, value in zip(lstm.update_rule.trainable_variables, draws):
                v.assign(value)
            lstm_params, lstm_non_trainable = lstm.snapshot()
            lstm_fn = backend.jit(lstm.meta_gradients)
            _, grads = lstm_fn(lstm_params, lstm_non_trainable, ep)
            results[name] = flat(backend.to_numpy(g) for g in grads)
            rule = {id(v) for v in lstm.update_rule.trainable_variables}
            results[name + "_rule"] = flat(backend.to_numpy(g) for g, v in zip(grads, lstm.meta_variables)
                                           if id(v) in rule)
        results[f"lstm_{form}_finite_difference"] = finite_difference(
            lstm_fn, [backend.to_numpy(p) for p in lstm_params], lstm_non_trainable, ep)
    # The catalogue objective (softmax of each liked item against sampled negatives, plus the
    # rating head's squared error) in both loops, second order.
    for name, first_order in (("catalogue", False), ("catalogue_first_order", True)):
        cat = MAML(two_headed_model(), inner_steps=2, inner_lr=0.3, adapt="decision_layers",
                   clipnorm=None, feedback="explicit", first_order=first_order,
                   objective=CatalogueObjective(NegativeSampler("uniform"), rating_weight=0.5))
        cat_params, cat_non_trainable = cat.snapshot()
        cat_fn = backend.jit(cat.meta_gradients)
        batch = catalogue_batch()
        _, grads = cat_fn(cat_params, cat_non_trainable, batch)
        results[name] = flat(backend.to_numpy(g) for g in grads)
    results["catalogue_finite_difference"] = finite_difference(
        cat_fn, [backend.to_numpy(p) for p in cat_params], cat_non_trainable, batch)
    # Reptile with an SGD outer loop of rate 0.5: one update.
    reptile = Reptile(model, inner_steps=3, inner_lr=0.2, adapt="all", clipnorm=None,
                      feedback="explicit")
    reptile.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
    step = backend.TrainStep(reptile.meta_gradients, reptile.optimizer, reptile.meta_variables,
                             model.non_trainable_variables)
    step(ep)
    step.sync()
    results["reptile_before"] = flat(base)
    results["reptile_after"] = flat(model.get_weights())
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
