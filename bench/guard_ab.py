"""A/B of the inner-loop guard on the S2 meta-train step (what made adapt='all' slow on a GPU).

Times one second-order MAML step (the S2 step of ``bench/s2_gpu.py``) with the inner-loop
guard swapped for variants, in one process, so the figures compare on the same device:

* ``current``: ``metarec.inner_loop.guard_gradients`` as shipped (clip factor and non-finite
  check computed without a gradient of their own);
* ``differentiated``: the guard before commit 55b3cb9 (entry-wise non-finite zeroing, then a
  global-norm clip differentiated through);
* ``none``: no guard at all (a lower bound: unsafe, see the guard's docstring);
* ``onehot``: the current guard with embedding lookups as one-hot matrix products.

    KERAS_BACKEND=jax python bench/guard_ab.py --batch 1024 --calls 20   # on a GPU
    KERAS_BACKEND=jax python bench/guard_ab.py --batch 32 --calls 3      # CPU smoke run
"""

import argparse
import json
import sys
from pathlib import Path

import keras
from keras import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s2_gpu  # noqa: E402

import metarec.inner_loop as inner_loop  # noqa: E402

SHIPPED = inner_loop.guard_gradients
GATHER = keras.layers.Embedding.call


def guard_differentiated(grads, clipnorm):
    grads = [ops.where(ops.isfinite(g), g, ops.zeros_like(g)) for g in grads]
    sq = [ops.sum(ops.square(g)) for g in grads]
    norm = ops.sqrt(ops.maximum(sum(sq[1:], sq[0]), 1e-24))
    scale = ops.minimum(1.0, clipnorm / norm)
    return [g * ops.cast(scale, g.dtype) for g in grads]


def guard_none(grads, clipnorm):
    return grads


def onehot_lookup(self, inputs):
    x = ops.one_hot(ops.cast(inputs, "int32"), self.input_dim, dtype=self.embeddings.dtype)
    return ops.matmul(x, self.embeddings)


VARIANTS = {
    "current": (SHIPPED, GATHER),
    "differentiated": (guard_differentiated, GATHER),
    "none": (guard_none, GATHER),
    "onehot": (SHIPPED, onehot_lookup),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--adapt", default="all,decision_layers")
    args = p.parse_args()
    tasks = s2_gpu._tasks(1024 if args.batch >= 256 else 64)
    for adapt in args.adapt.split(","):
        for name, (guard, lookup) in VARIANTS.items():
            inner_loop.guard_gradients, keras.layers.Embedding.call = guard, lookup
            try:
                r = s2_gpu.time_step(tasks, "maml2", adapt, args.batch, args.calls)
            finally:
                inner_loop.guard_gradients, keras.layers.Embedding.call = SHIPPED, GATHER
            print(json.dumps({"variant": name, "adapt": adapt, "meta_batch": args.batch,
                              "step_ms": round(r["step_ms"], 3),
                              "user_tasks_per_s": round(r["user_tasks_per_s"])}), flush=True)


if __name__ == "__main__":
    main()
