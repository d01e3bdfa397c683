"""Protocol S2 (../shared/BENCHMARK.md): the meta-train step on a GPU, and a full ML-1M run.

JAX backend only (the GPU machines have no TensorFlow). Two worker processes, one after the
other, write into one report:

* ``gpu`` (JAX's default platform): first the wall-clock time of a full meta-training run on
  MovieLens-1M (every one of its 6,040 users
  is a task: ``fractions=(1, 0, 0)``, random support / query splits, since the ml-1m copy
  here has no timestamps), split into the step's compilation, the steady epochs and the
  host's episode building; then the S1 meta-train step (support 20, query 20, 5 inner
  steps) at meta-batches 32 .. 4096 for second-order MAML adapting all weights and adapting
  the decision layers, first-order MAML and Reptile (decision layers): user-tasks/s.
  The mesh code path (``keras.distribution.DataParallel`` over every visible device: the
  meta-batch's users split over the devices, weights replicated) runs too, unless
  ``--no-mesh``: the ML-1M run again and the second-order decision-layer step.
* ``cpu`` (``JAX_PLATFORMS=cpu`` on the same machine): the same step at the small
  meta-batches, so that the report holds the CPU figure of the same step beside the GPU one.

Results are written after every figure (a run stopped by a time limit keeps what it has) to
``--out`` (``s2_gpu.json`` and ``s2_gpu.md``). Usage on a lent GPU: see bench/README.md.

    python bench/s2_gpu.py --ml1m /path/to/ml-1m --out bench/results      # full
    python bench/s2_gpu.py --tiny --ml1m ../shared/data/ml-1m --out /tmp/s2  # CPU smoke run

On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives the mesh path four
(virtual) devices.
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
MESH_METHOD = ("maml2", "decision_layers")  # the step also timed on the mesh
NAMES = {"maml2": "MAML 2nd order", "fomaml": "first-order MAML", "reptile": "Reptile"}


def _mesh():
    """The user mesh over every visible device (``keras.distribution.DataParallel()``)."""
    import keras

    from metarec import backend

    return backend.user_mesh(keras.distribution.DataParallel())


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


def time_step(tasks, method, adapt, batch, calls, mesh=None):
    import jax

    from metarec import backend

    learner = _learner(tasks.encoder, method, adapt)
    if mesh is None:
        episode = jax.device_put(_episode(tasks, batch))  # the data already on the device
    else:  # the users split over the mesh's devices
        episode = learner.placed_batch(_episode(tasks, batch), mesh)
    step = backend.TrainStep(learner.meta_gradients, learner.optimizer, learner.meta_variables,
                             learner.model.non_trainable_variables, mesh=mesh)
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
            "first_loss": loss, "calls": calls,
            "mesh_devices": None if mesh is None else mesh.size}


def ml1m_run(path, epochs, batch_size, max_users=None, mesh=False):
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
    # Batch and epoch ends split the wall clock: the first step (which compiles the step; the
    # loss read at each batch's end waits for the device) against the median later step, and
    # the first epoch against the steady ones; the host's share of an epoch (building the
    # episodes) is timed apart below.
    marks = {"batch": [], "epoch": []}
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: marks["batch"].append(("begin", time.perf_counter())),
        on_train_batch_end=lambda batch, logs: marks["batch"].append(("end", time.perf_counter())),
        on_epoch_end=lambda epoch, logs: marks["epoch"].append(time.perf_counter()))
    distribution = keras.distribution.DataParallel() if mesh else None
    t0 = time.perf_counter()
    history = learner.fit(tasks.train, epochs=epochs, batch_size=batch_size, verbose=0, seed=0,
                          callbacks=[timer], distribution=distribution)
    fit_s = time.perf_counter() - t0
    epoch_s = np.diff([t0] + marks["epoch"])
    step_s = [end - begin for (_, begin), (_, end) in zip(marks["batch"][0::2], marks["batch"][1::2])]
    steady_step_s = float(np.median(step_s[1:])) if len(step_s) > 1 else 0.0
    t1 = time.perf_counter()
    for _ in tasks.train.episodes(batch_size, shuffle=True, seed=0, max_query=128, resample=True):
        pass
    episodes_s = time.perf_counter() - t1
    steady = float(np.median(epoch_s[1:])) if len(epoch_s) > 1 else None
    return {"users": len(tasks.train), "interactions": int(len(data.interactions)),
            "epochs": epochs, "batch_size": batch_size, "support": 10, "max_query": 128,
            "inner_steps": INNER_STEPS, "learner": "MAML 2nd order, adapt=decision_layers",
            "mesh_devices": _mesh().size if mesh else None,
            "load_and_split_s": load_s, "fit_wall_s": fit_s, "per_epoch_s": fit_s / epochs,
            "first_epoch_s": float(epoch_s[0]), "steady_epoch_s": steady,
            "steps_per_epoch": tasks.train.num_batches(batch_size),
            "first_step_s": float(step_s[0]), "steady_step_s": steady_step_s,
            # The first step less a steady one: tracing and compiling the train step.
            "compilation_s": float(step_s[0]) - steady_step_s,
            "episode_building_s_per_epoch": episodes_s,
            # What is left of a steady epoch: the steps themselves and the loop around them.
            "steady_epoch_steps_s": None if steady is None else steady - episodes_s,
            "loss_first_epoch": float(history.history["loss"][0]),
            "loss_last_epoch": float(history.history["loss"][-1])}


def worker(args):
    import jax
    import keras

    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device": str(getattr(dev, "device_kind", dev)),
            "device_count": jax.device_count(),
            "jax": jax.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    out_file = Path(args.worker_out)
    result = {"info": info, "steps": [], "ml1m": None, "ml1m_mesh": None}
    use_mesh = args.worker == "gpu" and not args.no_mesh

    def save():
        out_file.write_text(json.dumps(result, indent=1))

    save()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker == "cpu":
        batches = [b for b in batches if b <= args.cpu_max_batch]
    tasks = _tasks(64 if args.tiny else 1024)
    deadline = time.time() + (args.cpu_budget_s if args.worker == "cpu" else args.budget_s)
    if args.worker == "gpu" and args.ml1m:  # first: the figure that matters most
        for key, mesh in (("ml1m", False), ("ml1m_mesh", True)):
            if mesh and not use_mesh:
                continue
            result[key] = ml1m_run(args.ml1m, args.epochs, args.ml1m_batch,
                                   max_users=300 if args.tiny else None, mesh=mesh)
            print(json.dumps(result[key]), file=sys.stderr, flush=True)
            save()
    runs = [(method, adapt, None) for method, adapt in METHODS]
    if use_mesh:
        runs.append(MESH_METHOD + (_mesh(),))
    for method, adapt, mesh in runs:
        for b in batches:
            label = f"{method}/{adapt}/{b}" + ("/mesh" if mesh else "")
            if time.time() > deadline:
                result.setdefault("skipped", []).append(f"{label}: time budget")
                continue
            if mesh is not None and b % mesh.size:
                result.setdefault("skipped", []).append(f"{label}: not a multiple of {mesh.size} devices")
                continue
            try:
                r = time_step(tasks, method, adapt, b,
                              min(args.calls, 5) if args.worker == "cpu" else args.calls, mesh=mesh)
            except Exception as exc:  # noqa: BLE001 - e.g. out of device memory at 4096
                r = {"method": method, "adapt": adapt, "meta_batch": b,
                     "mesh_devices": None if mesh is None else mesh.size,
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
        lines.append(f"### meta-train step on {name}: {info.get('device')} ({info.get('platform')}, "
                     f"{info.get('device_count', 1)} device(s)), jax {info.get('jax')}, "
                     f"{info.get('cpu_count')} CPUs")
        lines.append("")
        batches = sorted({s["meta_batch"] for s in res.get("steps", [])})
        lines.append("| learner | " + " | ".join(f"B={b}" for b in batches) + " |")
        lines.append("|---|" + "---|" * len(batches))
        meshes = sorted({s.get("mesh_devices") for s in res.get("steps", [])} - {None})
        for method, adapt, devices in [m + (None,) for m in METHODS] + [MESH_METHOD + (d,) for d in meshes]:
            cells = []
            for b in batches:
                hit = [s for s in res["steps"] if s["method"] == method and s["adapt"] == adapt
                       and s["meta_batch"] == b and s.get("mesh_devices") == devices]
                if not hit:
                    cells.append("-")
                elif "error" in hit[0]:
                    cells.append(hit[0]["error"].split(":")[0])
                else:
                    cells.append(f"{hit[0]['user_tasks_per_s']:,.0f}/s ({hit[0]['step_ms']:.2f} ms)")
            where = "" if devices is None else f", mesh of {devices} device(s)"
            lines.append(f"| {NAMES[method]}, adapt={adapt}{where} | " + " | ".join(cells) + " |")
        lines.append("")
        for key in ("ml1m", "ml1m_mesh"):
            lines += _ml1m_lines(res.get(key))
    return "\n".join(lines)


def _ml1m_lines(ml):
    lines = []
    if ml and "fit_wall_s" in ml:
        where = "one device" if not ml.get("mesh_devices") else f"a mesh of {ml['mesh_devices']} device(s)"
        lines.append(f"MovieLens-1M full meta-training on {where} ({ml['users']:,} users as tasks, "
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
        if "compilation_s" in ml:
            lines.append(f"Split: compilation {ml['compilation_s']:.2f} s (first step "
                         f"{ml['first_step_s']:.3f} s less a steady step "
                         f"{ml['steady_step_s'] * 1e3:.2f} ms), steady epochs "
                         f"{ml['steady_epoch_s'] or 0:.2f} s each ({ml['steps_per_epoch']} steps), "
                         f"episode building {ml['episode_building_s_per_epoch']:.2f} s per epoch.")
        lines.append("")
    return lines


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
    p.add_argument("--no-mesh", action="store_true", help="skip the mesh code path "
                   "(keras.distribution.DataParallel over every visible device)")
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
