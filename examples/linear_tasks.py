"""Meta-learning on the classic toy family: random linear functions y = a·x + b.

Each task is one function (a ~ U[-3, 3], b ~ U[-2, 2]) seen through 20 noisy points: 10 form
the support set, 10 the query set. A good initialisation lets a few gradient steps on the 10
support points fit the line; the question is how each method gets there.

    python examples/linear_tasks.py --out runs/linear_tasks

compares, on held-out tasks, the query loss after 0..10 inner steps of every family in one run:

* gradient-based: MAML (second order: the meta-gradient flows *through* the inner updates),
  first-order MAML and Reptile;
* optimisation-based: Meta-SGD (learned per-parameter inner rates) and the LSTM meta-learner,
  whose update rule itself is a learned, coordinate-wise LSTM (the Andrychowicz et al. form, and
  the Ravi & Larochelle form where the weights are the LSTM's cell state);
* memory-based: a GRU or an LSTM reads the support set and adapts without gradient steps;
* plain pre-training on all points of all tasks, then fine-tuning;
* "sequential fine-tuning", the common mistake: fine-tune one model in place on one task after
  another and call it meta-learning. It never differentiates through an adaptation, so it only
  learns an average function, like pre-training; the plot shows it does not adapt as MAML does.

A line is printed when each of the ten methods starts, after each of its training epochs
(with its losses and the time so far), and when it finishes, and the total time at the end.
The defaults (500 training tasks, 5 epochs) ran in about 38 minutes on a 2-core VM shared with
other jobs; ``--tasks 1000 --epochs 10`` (the run in docs/BENCHMARKS.md) trains four times as
much.

The functions are importable (``tests/test_examples.py`` runs a tiny version).
"""

import argparse
import os
import time

import keras
import numpy as np

import metarec
from metarec.array_tasks import ArrayTasks


def make_tasks(num_tasks, seed, points=20, support=10, noise=0.3):
    """``ArrayTasks`` of random lines; the support is the first ``support`` of ``points``."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-3, 3, size=(num_tasks, 1))
    b = rng.uniform(-2, 2, size=(num_tasks, 1))
    x = rng.uniform(-2, 2, size=(num_tasks, points)).astype(np.float32)
    y = (a * x + b + noise * rng.normal(size=x.shape)).astype(np.float32)
    return ArrayTasks({"x": x[:, :support, None]}, y[:, :support],
                      {"x": x[:, support:, None]}, y[:, support:])


def regression_mlp(hidden=40, seed=0):
    """A small MLP over the input ``x``; every layer is a decision layer."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((1,), name="x")
    h = keras.layers.Dense(hidden, activation="relu", name="decision_1")(x)
    h = keras.layers.Dense(hidden, activation="relu", name="decision_2")(h)
    return keras.Model({"x": x}, keras.layers.Dense(1, name="decision_output")(h))


def epoch_lines(say, epochs):
    """A callback that reports each finished epoch through ``say`` (one plain line: readable
    in a log or a pipe, unlike a progress bar)."""
    started = time.perf_counter()

    def report(epoch, logs):
        losses = ", ".join(f"{k} {v:.3f}" for k, v in (logs or {}).items() if "loss" in k)
        say(f"    epoch {epoch + 1}/{epochs}: {losses} ({time.perf_counter() - started:.0f} s)")

    return keras.callbacks.LambdaCallback(on_epoch_end=report)


def train_meta_learner(cls, train, val, epochs, inner_steps=3, inner_lr=0.02, seed=0, say=None, **kwargs):
    learner = cls(regression_mlp(seed=seed), inner_steps=inner_steps, inner_lr=inner_lr,
                  adapt="all", feedback="explicit", **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    callbacks = [epoch_lines(say, epochs)] if say else None
    learner.fit(train, validation_data=val, epochs=epochs, batch_size=32, seed=seed, verbose=0,
                callbacks=callbacks)
    return learner


def pretrain(train, epochs, seed=0, say=None):
    """Ordinary training on every point of every training task."""
    model = regression_mlp(seed=seed)
    x = np.concatenate([train.support_x["x"], train.query_x["x"]], axis=1).reshape(-1, 1)
    y = np.concatenate([train.support_y, train.query_y], axis=1).reshape(-1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit({"x": x}, y, epochs=epochs, batch_size=320, verbose=0,
              callbacks=[epoch_lines(say, epochs)] if say else None)
    return model


def sequential_fine_tuning(train, steps=3, lr=0.02, seed=0):
    """The mistake: SGD on task 1's support, then task 2's, ... on one model, in place."""
    model = regression_mlp(seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    for t in range(len(train)):
        for _ in range(steps):
            model.train_on_batch({"x": train.support_x["x"][t]}, train.support_y[t])
    return model


def as_fine_tuner(model, inner_lr=0.02):
    """Any trained model, adapted per task by plain SGD on the support set."""
    return metarec.MAML(model, inner_steps=0, inner_lr=inner_lr, adapt="all", feedback="explicit")


def loss_vs_steps(learner, tasks, max_steps=10):
    """Held-out query loss after 0..max_steps inner steps."""
    original = learner.inner_steps
    out = {}
    for steps in range(max_steps + 1):
        learner.inner_steps = steps
        out[steps] = learner.evaluate(tasks, verbose=0)["loss"]
    learner.inner_steps = original
    return out


def run(num_train=500, num_test=200, epochs=5, seed=0, out=None, max_steps=10, print_fn=print):
    """Train every method on ``num_train`` tasks and return ``{method: {steps: query MSE}}`` on
    ``num_test`` held-out tasks; ``print_fn`` reports progress, a line per method start, epoch
    and result (None for silence)."""
    train = make_tasks(num_train, seed)
    val = make_tasks(num_test, seed + 1)
    test = make_tasks(num_test, seed + 2)
    say = print_fn or (lambda *args: None)

    def meta(cls, **kwargs):
        return lambda: train_meta_learner(cls, train, val, epochs, seed=seed, say=say, **kwargs)

    builders = {
        "MAML (second order)": meta(metarec.MAML),
        "first-order MAML": meta(metarec.MAML, first_order=True),
        "Reptile": meta(metarec.Reptile),
        "Meta-SGD": meta(metarec.MetaSGD, inner_steps=1),
        "LSTM meta-learner (learned update)": meta(metarec.LSTMMetaLearner),
        "LSTM meta-learner (Ravi-Larochelle form)": meta(metarec.LSTMMetaLearner, form="ravi_larochelle"),
        "memory-based (GRU, no steps)": meta(metarec.MemoryLearner, inner_steps=0, units=40),
        "memory-based (LSTM, no steps)": meta(metarec.MemoryLearner, inner_steps=0, units=40, cell="lstm"),
        "pre-training + fine-tuning": lambda: as_fine_tuner(pretrain(train, epochs, seed, say=say)),
        "sequential fine-tuning (not MAML)": lambda: as_fine_tuner(sequential_fine_tuning(train, seed=seed)),
    }
    curves = {}
    started = time.perf_counter()
    for i, (name, build) in enumerate(builders.items(), 1):
        t0 = time.perf_counter()
        say(f"[{i}/{len(builders)}] {name}: training on {num_train} tasks ...")
        curves[name] = loss_vs_steps(build(), test, max_steps)
        say(f"[{i}/{len(builders)}] {name}: query MSE {curves[name][0]:.3f} at 0 steps, "
            f"{curves[name][max_steps]:.3f} at {max_steps} ({time.perf_counter() - t0:.0f} s; "
            f"{time.perf_counter() - started:.0f} s in all)")
    if out:
        os.makedirs(out, exist_ok=True)
        plot(curves, os.path.join(out, "loss_vs_inner_steps.png"))
    return curves


def plot(curves, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label=name)
    ax.set_xlabel("inner gradient steps on the 10 support points")
    ax.set_ylabel("query MSE (held-out tasks)")
    ax.set_yscale("log")
    ax.set_title("Random linear functions y = a·x + b")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/linear_tasks")
    parser.add_argument("--epochs", type=int, default=5, help="meta-training epochs (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=500, help="training tasks (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    curves = run(num_train=args.tasks, epochs=args.epochs, seed=args.seed, out=args.out)
    steps = [0, 1, 3, 5, 10]
    print("| method | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{curve[s]:.3f}" for s in steps) + " |")
    print(f"\nPlot: {os.path.join(args.out, 'loss_vs_inner_steps.png')}")
    print(f"Ran in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
