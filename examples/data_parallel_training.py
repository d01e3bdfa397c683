"""Data-parallel meta-training over every device, on one host or several (JAX backend).

Each meta-batch's users are split over the devices of a ``keras.distribution.DataParallel``;
the weights are replicated and the meta-gradient is averaged across devices, so the result is
the one-device result (to float32 rounding), faster. ``batch_size`` must be a multiple of the
number of devices.

One host, every visible device (GPUs, or the CPU)::

    KERAS_BACKEND=jax python examples/data_parallel_training.py --out meta.keras

Several hosts: the same command on each of N hosts, host ``i`` with
``KERAS_DISTRIBUTION_PROCESS_ID=i`` (host 0 is the coordinator); the script then calls
``keras.distribution.initialize()``, which calls ``jax.distributed.initialize``::

    KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=host0:1234 \\
    KERAS_DISTRIBUTION_NUM_PROCESSES=N KERAS_DISTRIBUTION_PROCESS_ID=i \\
    python examples/data_parallel_training.py --out meta.keras

The same on one CPU machine, as two processes of two virtual devices each (CPU collectives
between processes need ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``; GPUs need nothing)::

    export KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo KERAS_DISTRIBUTION_JOB_ADDRESSES=localhost:12355 \\
        KERAS_DISTRIBUTION_NUM_PROCESSES=2
    KERAS_DISTRIBUTION_PROCESS_ID=1 python examples/data_parallel_training.py --out /tmp/meta.keras &
    KERAS_DISTRIBUTION_PROCESS_ID=0 python examples/data_parallel_training.py --out /tmp/meta.keras

Every process builds the same meta-batches from the same seed and keeps its own devices'
users; only process 0 writes the model.
"""

import argparse
import os

import jax
import keras

import metarec


def run(data_path=None, epochs=2, batch_size=64, out=None, num_users=200, inner_steps=3):
    """Meta-train MAML data-parallel over every device; returns the learner.

    Args:
        data_path: a MovieLens folder, or None for ``synthetic`` data of ``num_users`` users.
        epochs: meta-training epochs.
        batch_size: users per meta-batch, a multiple of the number of devices.
        out: where process 0 saves the ``.keras`` file (None: not saved).
        num_users: users of the synthetic data.
        inner_steps: MAML's inner gradient steps.

    Returns:
        The trained learner (its weights replicated on every device).
    """
    if "KERAS_DISTRIBUTION_NUM_PROCESSES" in os.environ:  # several processes: join them first
        keras.distribution.initialize()  # before anything runs on a device

    if data_path:
        data = metarec.datasets.load_movielens(data_path)
    else:
        data = metarec.datasets.synthetic(num_users=num_users, seed=0)
    tasks = metarec.UserTasks(data, support_size=10, split="random", user_split="random",
                              fractions=(1.0, 0.0, 0.0))
    distribution = keras.distribution.DataParallel()  # every device of every process
    keras.utils.set_random_seed(0)  # the same initial weights in every process
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder), inner_steps=inner_steps,
                           inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = learner.fit(tasks.train, epochs=epochs, batch_size=batch_size, seed=0, verbose=0,
                          distribution=distribution)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"loss {history.history['loss'][0]:.4f} -> {history.history['loss'][-1]:.4f}")
    if out and jax.process_index() == 0:
        learner.save(out)
        print(f"saved {out}")
    return learner


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a MovieLens folder (default: synthetic data)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="a multiple of the number of devices")
    p.add_argument("--out", default=None, help="the .keras file process 0 writes")
    args = p.parse_args()
    run(args.data, args.epochs, args.batch_size, args.out)


if __name__ == "__main__":
    main()
