"""Protocol S2 (../shared/BENCHMARK.md): the meta-train step on a GPU, and a full ML-1M run.

JAX backend only (the GPU machines have no TensorFlow). Two worker processes, one after the
other, write into one report:

* ``gpu`` (JAX's default platform): first the wall-clock time of a full meta-training run on
  MovieLens-1M (every one of its 6,040 users
  is a task: ``fractions=(1, 0, 0)``, random support / query splits, since the ml-1m copy
  here has no timestamps); then the S1 meta-train step (support 20, query 20, 5 inner
  steps) at meta-batches 32 .. 4096 for second-order MAML adapting all weights and adapting
  the decision layers, first-order MAML and Reptile (decision layers): user-tasks/s.
* ``cpu`` (``JAX_PLATFORMS=cpu`` on the same machine): the same step at the small
  meta-batches, so that the report holds the CPU figure of the same step beside the GPU one.

Results are written after every figure (a run stopped by a time limit keeps what it has) to
``--out`` (``s2_gpu.json`` and ``s2_gpu.md``). Usage on a lent GPU: see bench/README.md.

    python bench/s2_gpu.py --ml1m /path/to/ml-1m --out bench/results      # full
    python bench/s2_gpu.py --tiny --ml1m ../shared/data/ml-1m --out /tmp/s2  # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402 - bench/machine.py, after the path is set

SUPPORT = 20
QUERY = 20
INNER_STEPS = 5
NUM_ITEMS = 2000
METHODS = (
    ("maml2", "all"),
    ("maml2", "decision_layers"),
    ("fomaml", "decision_layers"),
    ("reptile", "decision_layers"),
)
NAMES = {"maml2": "MAML 2nd order", "fomaml": "first-order MAML", "reptile": "Reptile"}


# ---------------------------------------------------------------------------------- worker
def _tasks(num_users):
    import metarec

    data = metarec.datasets.synthetic(num_users=num_users, num_items=NUM_ITEMS,
                                      interactions_per_user=(45, 80), seed=0)
    return metarec.UserTasks(data, support_size=SUPPORT, split="random", user_split="random",
                             fractions=(1.0, 0.0, 0.0))


def _episode(tasks, batch):
    from metarec.tasks import Episode

    idx = np.arange(batch) % len(tasks.train)  # users repeat beyond the data set's size
    ep = tasks.train.episode_for(idx, max_query=QUERY, seed=0)
    query = {k: np.ascontiguousarray(v[:, :QUERY]) for k, v in ep.query.items()}
    return Episode(ep.support, ep.support_y, ep.support_mask, query,
                   np.ascontiguousarray(ep.query_y[:, :QUERY]),
                   np.ascontiguousarray(ep.query_mask[:, :QUERY]))


def _learner(encoder, method, adapt, inner_steps=INNER_STEPS):
    import keras

    import metarec

    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(encoder, embedding_dim=32, hidden_units=(64, 64))
    if method == "reptile":
        learner = metarec.Reptile(model, inner_steps=inner_steps, inner_lr=0.05, adapt=adapt)
    else:
        learner = metarec.MAML(model, inner_steps=inner_steps, inner_lr=0.05, adapt=adapt,
                               first_order=method == "fomaml")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.feedback = encoder.schema.feedback
    learner.encoder = encoder
    return learner


def time_step(tasks, method, adapt, batch, calls):
    import jax

    from metarec import backend

    learner = _learner(tasks.encoder, method, adapt)
    episode = jax.device_put(_episode(tasks, batch))  # the data already on the device
    step = backend.TrainStep(learner.meta_gradients, learner.optimizer, learner.meta_variables,
                             learner.model.non_trainable_variables)
    t0 = time.perf_counter()
    loss = float(step(episode)["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(step(episode))
    # Steps chain through the weights: time `calls` of them, then wait for the last.
    t0 = time.perf_counter()
    for _ in range(calls):
        logs = step(episode)
    jax.block_until_ready(logs)
    dt = (time.perf_counter() - t0) / calls
    return {"method": method, "adapt": adapt, "meta_batch": batch, "inner_steps": INNER_STEPS,
            "step_ms": dt * 1e3, "user_tasks_per_s": batch / dt, "compile_s": compile_s,
            "first_loss": loss, "calls": calls}


def ml1m_run(path, epochs, batch_size, max_users=None):
    import keras

    import metarec

    t_load = time.perf_counter()
    data = metarec.datasets.load_movielens(path)
    if max_users is not None:  # tiny mode: the first users only
        keep = np.sort(data.interactions["user_id"].unique())[:max_users]
        frame = data.interactions[data.interactions["user_id"].isin(keep)]
        data = metarec.InteractionData(frame.reset_index(drop=True), data.users, data.items,
                                       schema=data.schema)
    tasks = metarec.UserTasks(data, support_size=10, split="random", user_split="random",
                              fractions=(1.0, 0.0, 0.0))
    load_s = time.perf_counter() - t_load
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder)
    learner = metarec.MAML(model, inner_steps=INNER_STEPS, inner_lr=0.05,
                           adapt="decision_layers")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    # Epoch ends split the wall clock into the first epoch (which compiles the step) and the
    # steady ones; the host's share of a steady epoch is timed apart below.
    epoch_ends = []
    timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_ends.append(time.perf_counter()))
    t0 = time.perf_counter()
    history = learner.fit(tasks.train, epochs=epochs, batch_size=batch_size, verbose=0, seed=0,
                          callbacks=[timer])
    fit_s = time.perf_counter() - t0
    epoch_s = np.diff([t0] + epoch_ends)
    t1 = time.perf_counter()
    for _ in tasks.train.episodes(batch_size, shuffle=True, seed=0, max_query=128, resample=True):
        pass
    episodes_s = time.perf_counter() - t1
    return {"users": len(tasks.train), "interactions": int(len(data.interactions)),
            "epochs": epochs, "batch_size": batch_size, "support": 10, "max_query": 128,
            "inner_steps": INNER_STEPS, "learner": "MAML 2nd order, adapt=decision_layers",
            "load_and_split_s": load_s, "fit_wall_s": fit_s, "per_epoch_s": fit_s / epochs,
            "first_epoch_s": float(epoch_s[0]),
            "steady_epoch_s": float(np.median(epoch_s[1:])) if len(epoch_s) > 1 else None,
            "episode_building_s_per_epoch": episodes_s,
            "loss_first_epoch": float(history.history["loss"][0]),
            "loss_last_epoch": float(history.history["loss"][-1])}


def worker(args):
    import jax
    import keras

    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device": str(getattr(dev, "device_kind", dev)),
            "jax": jax.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    out_file = Path(args.worker_out)
    result = {"info": info, "steps": [], "ml1m": None}

    def save():
        out_file.write_text(json.dumps(result, indent=1))

    save()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker == "cpu":
        batches = [b for b in batches if b <= args.cpu_max_batch]
    tasks = _tasks(64 if args.tiny else 1024)
    deadline = time.time() + (args.cpu_budget_s if args.worker == "cpu" else args.budget_s)
    if args.worker == "gpu" and args.ml1m:  # first: the figure that matters most
        result["ml1m"] = ml1m_run(args.ml1m, args.epochs, args.ml1m_batch,
                                  max_users=300 if args.tiny else None)
        print(json.dumps(result["ml1m"]), file=sys.stderr, flush=True)
        save()
    for method, adapt in METHODS:
        for b in batches:
            if time.time() > deadline:
                result.setdefault("skipped", []).append(f"{method}/{adapt}/{b}: time budget")
                continue
            try:
                r = time_step(tasks, method, adapt, b,
                              min(args.calls, 5) if args.worker == "cpu" else args.calls)
            except Exception as exc:  # noqa: BLE001 - e.g. out of device memory at 4096
                r = {"method": method, "adapt": adapt, "meta_batch": b,
                     "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(json.dumps(r), file=sys.stderr, flush=True)
            result["steps"].append(r)
            save()
    return result


# ---------------------------------------------------------------------------------- driver
def markdown(report):
    lines = []
    for name, res in report["workers"].items():
        info = res.get("info", {})
        lines.append(f"### meta-train step on {name}: {info.get('device')} ({info.get('platform')}), "
                     f"jax {info.get('jax')}, {info.get('cpu_count')} CPUs")
        lines.append("")
        batches = sorted({s["meta_batch"] for s in res.get("steps", [])})
        lines.append("| learner | " + " | ".join(f"B={b}" for b in batches) + " |")
        lines.append("|---|" + "---|" * len(batches))
        for method, adapt in METHODS:
            cells = []
            for b in batches:
                hit = [s for s in res["steps"] if s["method"] == method and s["adapt"] == adapt
                       and s["meta_batch"] == b]
                if not hit:
                    cells.append("-")
                elif "error" in hit[0]:
                    cells.append(hit[0]["error"].split(":")[0])
                else:
                    cells.append(f"{hit[0]['user_tasks_per_s']:,.0f}/s ({hit[0]['step_ms']:.2f} ms)")
            lines.append(f"| {NAMES[method]}, adapt={adapt} | " + " | ".join(cells) + " |")
        lines.append("")
        ml = res.get("ml1m")
        if ml and "fit_wall_s" in ml:
            lines.append(f"MovieLens-1M full meta-training ({ml['users']:,} users as tasks, "
                         f"{ml['interactions']:,} ratings, {ml['learner']}, {ml['epochs']} epochs, "
                         f"meta-batch {ml['batch_size']}, support {ml['support']}, query <= "
                         f"{ml['max_query']}): **{ml['fit_wall_s']:.1f} s** wall clock "
                         f"({ml['per_epoch_s']:.2f} s/epoch, compilation included); "
                         f"loss {ml['loss_first_epoch']:.3f} -> {ml['loss_last_epoch']:.3f}; "
                         f"loading + splitting {ml['load_and_split_s']:.1f} s.")
            if ml.get("steady_epoch_s") is not None:
                lines.append(f"First epoch (compiles the step) {ml['first_epoch_s']:.2f} s, later "
                             f"epochs {ml['steady_epoch_s']:.2f} s (median), of which building "
                             f"the episodes on the host {ml['episode_building_s_per_epoch']:.2f} s.")
            lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="smoke run (CPU is fine): 2 batch sizes, "
                   "300 ML-1M users, 1 epoch")
    p.add_argument("--batches", default=None, help="meta-batch sizes (default 32,256,1024,4096)")
    p.add_argument("--calls", type=int, default=None, help="timed steps per figure (default 20)")
    p.add_argument("--cpu-max-batch", type=int, default=256, help="largest meta-batch timed on the CPU")
    p.add_argument("--ml1m", default=None, help="path to the ml-1m folder (skipped when absent)")
    p.add_argument("--epochs", type=int, default=None, help="ML-1M epochs (default 10)")
    p.add_argument("--ml1m-batch", type=int, default=256, help="ML-1M meta-batch size")
    p.add_argument("--workers", default="gpu,cpu")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="gpu worker (ML-1M run included): step figures not started by then are skipped")
    p.add_argument("--cpu-budget-s", type=float, default=120.0, help="the same for the cpu worker")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.batches is None:
        args.batches = "32,64" if args.tiny else "32,256,1024,4096"
    if args.calls is None:
        args.calls = 3 if args.tiny else 20
    if args.epochs is None:
        args.epochs = 1 if args.tiny else 10
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "protocol": "S2",
        "command": "python bench/s2_gpu.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "tiny": args.tiny,
        "workers": {},
    }
    for name in args.workers.split(","):
        env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
        if name == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        part = out / f"s2_{name}.partial.json"
        cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(part)] + sys.argv[1:]
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        try:
            report["workers"][name] = json.loads(part.read_text())
            part.unlink()
        except (OSError, json.JSONDecodeError):
            report["workers"][name] = {"error": f"worker exited {rc} without results"}
        if rc:
            report["workers"][name]["exit_code"] = rc
        (out / "s2_gpu.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "s2_gpu.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
