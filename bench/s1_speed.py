"""Protocol S1 (../shared/BENCHMARK.md): adapt+score, batch adapt+score and meta-train step speed.

One command measures every figure for each Keras backend (one subprocess per backend, so each
gets a fresh process and its own backend) and prints them side by side, each next to the plain
non-adaptive ``predict_items`` of the same model on the same 1,000 items measured in the same
process (the ratio adaptive / plain is what stays meaningful on a noisy machine).

    python bench/s1_speed.py                          # full protocol, both backends
    python bench/s1_speed.py --quick                  # a smoke run (fewer calls / users)
    python bench/s1_speed.py --backends jax --only train

Figures:
* ``adapt_score``: one user, K = 20 support interactions, 5 inner steps, 1,000 candidate items,
  top 10: ``learner.adapt_many([support], [features])`` + ``learner.recommend_many(...)``
  (the SDK path; the gRPC server calls the same two functions), median and p99 over >= 200
  calls after warm-up; ``adapt="decision_layers"`` and ``adapt="all"``.
* ``batch``: 10,000 users as above (each with its own 1,000 candidates, drawn from 64 lists)
  in vectorised batches of ``--batch-users`` users: users/s; beside it, plain
  ``predict_items`` of the same rows (one call per batch, shared weights, no top-k); the
  same with one candidate list shared by every user (a candidate file, the catalogue); and
  that again with the supports given as flat arrays (``adapt_flat``, what ``score-batch``
  runs) instead of one DataFrame per user.
* ``lstm``: the LSTM meta-learner's adapt+score of one user (as ``adapt_score``, decision layers,
  5 steps of the learned rule, hidden size ``--lstm-hidden``, default 16 as the learner; both forms) against MAML's 5 gradient steps,
  the learners called in turn in each round: median ms and the ratio to MAML (target 1.5x).
* ``train``: one meta-train step (``backend.TrainStep`` around ``meta_gradients`` and Adam, as
  ``fit`` runs it) on a fixed Episode of 32 users, support 20, query 20, 1 and 5 inner steps,
  for second-order MAML, first-order MAML and Reptile: user-tasks/s.

Model: ``rating_mlp(encoder, embedding_dim=32, hidden_units=(64, 64))`` on a synthetic
catalogue of 2,000 items (random meta-initialisation: speed does not depend on training).
Results go to ``bench/results/s1_speed.json`` (and ``--markdown`` prints the tables).
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
CANDIDATES = 1000
TOP_K = 10
INNER_STEPS = 5
NUM_ITEMS = 2000
META_BATCH = 32


# ---------------------------------------------------------------------------------- worker
def _setup(adapt, learner_cls="MAML", inner_steps=INNER_STEPS, **kwargs):
    import keras

    import metarec

    data, tasks = _data()
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=32, hidden_units=(64, 64))
    cls = getattr(metarec, learner_cls)
    learner = cls(model, inner_steps=inner_steps, inner_lr=0.05, adapt=adapt, **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.feedback = tasks.encoder.schema.feedback
    learner.encoder = tasks.encoder
    return learner


_DATA = {}


def _data():
    if "tasks" not in _DATA:
        import metarec

        data = metarec.datasets.synthetic(num_users=400, num_items=NUM_ITEMS,
                                          interactions_per_user=(45, 80), seed=0)
        _DATA["data"] = data
        _DATA["tasks"] = metarec.UserTasks(data, support_size=SUPPORT, split="random",
                                           user_split="random", fractions=(1.0, 0.0, 0.0))
    return _DATA["data"], _DATA["tasks"]


def _users(n, seed=1):
    """``n`` users: (support frame, features dict, candidate raw ids)."""
    import pandas as pd

    data, _ = _data()
    rng = np.random.default_rng(seed)
    item_ids = np.asarray(data.items.index)
    segments = sorted(set(data.users["segment"]))
    pool = [rng.choice(item_ids, CANDIDATES, replace=False) for _ in range(64)]
    users = []
    for u in range(n):
        items = rng.choice(item_ids, SUPPORT, replace=False)
        frame = pd.DataFrame({"item_id": items,
                              "rating": rng.integers(1, 6, SUPPORT).astype(np.float64)})
        features = {"segment": segments[u % len(segments)], "age": int(rng.integers(18, 70))}
        users.append((frame, features, pool[u % len(pool)]))
    return users


def _stats(times_s):
    t = np.asarray(times_s) * 1e3
    return {"median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()), "calls": int(len(t))}


def _time_calls(fn, calls, warmup):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_adapt_score(adapt, calls, warmup, learner=None):
    learner = learner or _setup(adapt)
    users = _users(64, seed=2)
    state = {"i": 0}

    def plain():
        frame, features, cands = users[state["i"] % len(users)]
        state["i"] += 1
        learner.predict_items(cands, features)

    def sdk():
        frame, features, cands = users[state["i"] % len(users)]
        state["i"] += 1
        adapted = learner.adapt_many([frame], [features])
        learner.recommend_many(adapted, TOP_K, True, [cands])

    def one_call():
        # The same ranking from one compiled call (adapt_recommend_many).
        frame, features, cands = users[state["i"] % len(users)]
        state["i"] += 1
        learner.adapt_recommend_many([frame], TOP_K, True, [cands], [features])

    # Interleave in rounds so that load from other processes hits all alike.
    fns = {"plain": plain, "sdk": sdk, "one_call": one_call}
    for fn in fns.values():
        _time_calls(fn, 0, warmup)
    rounds = 4
    res = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            res[name] += _time_calls(fn, calls // rounds, 2)
    plain_s, sdk_s, one_s = _stats(res["plain"]), _stats(res["sdk"]), _stats(res["one_call"])
    return {"adapt": adapt, "plain_predict": plain_s, "adapt_score": sdk_s, "adapt_score_one_call": one_s,
            "ratio_median": sdk_s["median_ms"] / plain_s["median_ms"]}


def bench_lstm_vs_maml(calls, warmup, hidden_size=16):
    """adapt+score of one user (the SDK path of ``bench_adapt_score``) by MAML and by the LSTM
    meta-learner in both forms, at equal inner steps, interleaved in rounds."""
    learners = {
        "MAML": _setup("decision_layers"),
        "LSTM, andrychowicz": _setup("decision_layers", "LSTMMetaLearner", hidden_size=hidden_size),
        "LSTM, ravi_larochelle": _setup("decision_layers", "LSTMMetaLearner", hidden_size=hidden_size,
                                        form="ravi_larochelle"),
    }
    users = _users(64, seed=2)
    state = {"i": 0}

    def call(learner):
        frame, features, cands = users[state["i"] % len(users)]
        state["i"] += 1
        adapted = learner.adapt_many([frame], [features])
        learner.recommend_many(adapted, TOP_K, True, [cands])

    for learner in learners.values():
        _time_calls(lambda: call(learner), 0, warmup)
    rounds = 4
    res = {name: [] for name in learners}
    for _ in range(rounds):
        for name, learner in learners.items():
            res[name] += _time_calls(lambda: call(learner), calls // rounds, 2)
    out = {name: _stats(times) for name, times in res.items()}
    maml = out["MAML"]["median_ms"]
    return {"inner_steps": INNER_STEPS, "hidden_size": hidden_size,
            "coordinates": int(sum(np.prod(learners["MAML"].model.trainable_variables[i].shape)
                                   for i in learners["MAML"].forward.adapt_index)),
            "learners": out, "ratio_to_maml": {name: o["median_ms"] / maml for name, o in out.items()}}


def bench_batch(adapt, n_users, batch_users, warmup_batches=1, learner=None, shared=False, flat=False):
    learner = learner or _setup(adapt)
    users = _users(n_users, seed=3)
    if shared:
        # Every user ranks the same 1,000 candidates (a candidate file, the catalogue).
        users = [(frame, features, users[0][2]) for frame, features, _ in users]
    # flat: the supports as flat arrays (item ids, ratings, lengths), the way a batch job
    # holds them (``adapt_flat``); built once per chunk like the DataFrames above.
    flat_chunks = {}
    if flat:
        for start in range(0, n_users, batch_users):
            chunk = users[start:start + batch_users]
            flat_chunks[start] = (np.concatenate([u[0]["item_id"].to_numpy() for u in chunk]),
                                  np.concatenate([u[0]["rating"].to_numpy() for u in chunk]),
                                  np.array([len(u[0]) for u in chunk]))

    def run(chunk, start=0):
        feats = [u[1] for u in chunk]
        cands = [u[2] for u in chunk]
        if flat:
            adapted = learner.adapt_flat(*flat_chunks[start], feats)
        else:
            adapted = learner.adapt_many([u[0] for u in chunk], feats)
        return learner.recommend_many(adapted, TOP_K, True, cands)

    last = (n_users - 1) // batch_users * batch_users  # the last (possibly shorter) chunk
    for _ in range(warmup_batches):
        run(users[:batch_users])
        if n_users % batch_users:
            run(users[last:], last)
    def plain(chunk):
        # The reference: plain non-adaptive scores of the same rows (no top-k), one call.
        return learner.predict_items(np.concatenate([u[2] for u in chunk]), chunk[0][1])

    plain(users[:batch_users])
    t0 = time.perf_counter()
    for start in range(0, n_users, batch_users):
        run(users[start:start + batch_users], start)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, n_users, batch_users):
        plain(users[start:start + batch_users])
    dt_plain = time.perf_counter() - t0
    return {"adapt": adapt, "shared_candidates": shared, "flat_arrays": flat, "users": n_users, "batch_users": batch_users, "seconds": dt,
            "users_per_s": n_users / dt, "plain_predict_users_per_s": n_users / dt_plain,
            "ratio_time": dt / dt_plain}


def _episode():
    from metarec.tasks import Episode

    _, tasks = _data()
    ep = tasks.train.episode_for(np.arange(META_BATCH), max_query=QUERY, seed=0)
    query = {k: np.ascontiguousarray(v[:, :QUERY]) for k, v in ep.query.items()}
    return Episode(ep.support, ep.support_y, ep.support_mask, query,
                   np.ascontiguousarray(ep.query_y[:, :QUERY]),
                   np.ascontiguousarray(ep.query_mask[:, :QUERY]))


def bench_train(method, steps, adapt, calls, warmup, learner=None):
    from metarec import backend

    if learner is not None:
        pass
    elif method == "maml2":
        learner = _setup(adapt, "MAML", inner_steps=steps, first_order=False)
    elif method == "fomaml":
        learner = _setup(adapt, "MAML", inner_steps=steps, first_order=True)
    else:
        learner = _setup(adapt, "Reptile", inner_steps=steps)
    episode = _episode()
    step = backend.TrainStep(learner.meta_gradients, learner.optimizer, learner.meta_variables,
                             learner.model.non_trainable_variables)

    def one():
        logs = step(episode)
        return float(backend.to_numpy(logs["loss"]))

    t0 = time.perf_counter()
    loss = one()
    compile_s = time.perf_counter() - t0
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss in {method}")
    times = _time_calls(one, calls, warmup)
    st = _stats(times)
    return {"method": method, "inner_steps": steps, "adapt": adapt, "meta_batch": META_BATCH,
            "step_median_ms": st["median_ms"], "step_p99_ms": st["p99_ms"],
            "user_tasks_per_s": META_BATCH / (st["median_ms"] / 1e3), "compile_s": compile_s,
            "calls": st["calls"]}


def worker(args):
    import keras

    from metarec import backend

    out = {"backend": backend.BACKEND, "keras": keras.__version__, "python": platform.python_version()}
    if backend.BACKEND == "jax":
        import jax

        out["jax"] = jax.__version__
    else:
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    only = set(args.only.split(",")) if args.only else {"adapt", "lstm", "batch", "train"}
    quick = args.quick
    calls = 40 if quick else args.calls
    if "adapt" in only:
        out["adapt_score"] = [bench_adapt_score(a, calls, 5 if quick else 20)
                              for a in (["decision_layers"] if quick else ["decision_layers", "all"])]
        _log(out["adapt_score"])
    if "lstm" in only:
        out["lstm"] = bench_lstm_vs_maml(calls, 5 if quick else 20, args.lstm_hidden)
        _log(out["lstm"])
    if "batch" in only:
        n = 1024 if quick else args.batch_total
        # adapt="all" copies the 2,000-item embedding table per user: smaller batches.
        out["batch"] = [bench_batch(a, n, args.batch_users if a == "decision_layers" else min(256, args.batch_users))
                        for a in (["decision_layers"] if quick else ["decision_layers", "all"])]
        out["batch"].append(bench_batch("decision_layers", n, args.batch_users, flat=True))
        out["batch"].append(bench_batch("decision_layers", n, args.batch_users, shared=True))
        out["batch"].append(bench_batch("decision_layers", n, args.batch_users, shared=True, flat=True))
        _log(out["batch"])
    if "train" in only:
        res = []
        tcalls = 5 if quick else args.train_calls
        for method in ("maml2", "fomaml", "reptile"):
            for steps in (1, 5):
                res.append(bench_train(method, steps, "decision_layers", tcalls, 2))
                _log(res[-1])
        if not quick:
            res.append(bench_train("maml2", 5, "all", tcalls, 2))
            _log(res[-1])
        out["train"] = res
    return out


def _log(x):
    print(json.dumps(x), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- driver
def markdown(results):
    backends = [r["backend"] for r in results]
    by = {r["backend"]: r for r in results}
    lines = []
    head = "| figure | " + " | ".join(backends) + " |"
    sep = "|---|" + "---|" * len(backends)
    if all("adapt_score" in r for r in results):
        lines += ["### adapt + score one user (K=20, 5 inner steps, 1,000 candidates, top 10)", "",
                  head, sep]
        for i, a in enumerate(results[0]["adapt_score"]):
            name = a["adapt"]
            cells = []
            for b in backends:
                x = by[b]["adapt_score"][i]
                cells.append(f"{x['adapt_score']['median_ms']:.2f} / {x['adapt_score']['p99_ms']:.2f} ms")
            lines.append(f"| adapt+score ({name}) median / p99 | " + " | ".join(cells) + " |")
            if all("adapt_score_one_call" in by[b]["adapt_score"][i] for b in backends):
                cells = [f"{by[b]['adapt_score'][i]['adapt_score_one_call']['median_ms']:.2f} / "
                         f"{by[b]['adapt_score'][i]['adapt_score_one_call']['p99_ms']:.2f} ms" for b in backends]
                lines.append(f"| adapt_recommend_many, one call ({name}) median / p99 | "
                             + " | ".join(cells) + " |")
            cells = [f"{by[b]['adapt_score'][i]['plain_predict']['median_ms']:.2f} / "
                     f"{by[b]['adapt_score'][i]['plain_predict']['p99_ms']:.2f} ms" for b in backends]
            lines.append(f"| plain predict_items, same run ({name}) median / p99 | " + " | ".join(cells) + " |")
            cells = [f"{by[b]['adapt_score'][i]['ratio_median']:.1f}x" for b in backends]
            lines.append(f"| ratio adaptive / plain (median, {name}) | " + " | ".join(cells) + " |")
        lines.append("")
    if all("lstm" in r for r in results):
        first = results[0]["lstm"]
        lines += [f"### adapt + score one user: the LSTM meta-learner against MAML ({first['inner_steps']} "
                  f"inner steps, hidden size {first['hidden_size']}, {first['coordinates']:,} adapted "
                  "coordinates)", "", head, sep]
        for name in first["learners"]:
            cells = [f"{by[b]['lstm']['learners'][name]['median_ms']:.2f} / "
                     f"{by[b]['lstm']['learners'][name]['p99_ms']:.2f} ms "
                     f"({by[b]['lstm']['ratio_to_maml'][name]:.2f}x MAML)" for b in backends]
            lines.append(f"| {name} median / p99 | " + " | ".join(cells) + " |")
        lines.append("")
    if all("batch" in r for r in results):
        lines += ["### batch adapt + score (1,000 candidates per user, top 10)", "", head, sep]
        for i, a in enumerate(results[0]["batch"]):
            cells = [f"{by[b]['batch'][i]['users_per_s']:,.0f} users/s" for b in backends]
            lists = "one shared candidate list" if a.get("shared_candidates") else "own candidate lists"
            if a.get("flat_arrays"):
                lists += ", supports as flat arrays (adapt_flat)"
            lines.append(f"| {a['users']:,} users, batches of {a['batch_users']} ({a['adapt']}, {lists}) | "
                         + " | ".join(cells) + " |")
            cells = [f"{by[b]['batch'][i]['plain_predict_users_per_s']:,.0f} users/s "
                     f"(adaptive takes {by[b]['batch'][i]['ratio_time']:.1f}x)" for b in backends]
            lines.append(f"| plain predict_items of the same rows, same run ({a['adapt']}) | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if all("train" in r for r in results):
        lines += [f"### meta-train step (meta-batch {META_BATCH}, support {SUPPORT}, query {QUERY}): "
                  "user-tasks/s (median step ms)", "", head, sep]
        names = {"maml2": "MAML 2nd order", "fomaml": "first-order MAML", "reptile": "Reptile"}
        for i, t in enumerate(results[0]["train"]):
            cells = [f"{by[b]['train'][i]['user_tasks_per_s']:,.0f} ({by[b]['train'][i]['step_median_ms']:.1f} ms)"
                     for b in backends]
            lines.append(f"| {names[t['method']]}, {t['inner_steps']} inner steps, adapt={t['adapt']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save_report(script, results, out, **extra):
    """Write ``{command, date, machine, results}`` (plus ``extra``) as JSON to ``out``: the
    record every figure in docs/BENCHMARKS.md points to."""
    report = dict(extra)
    report.update({
        "command": f"python bench/{Path(script).name} " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "results": results,
    })
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def run_workers(script, argv, backends):
    """Run ``script --worker ARGV`` once per backend (a fresh process each, ``KERAS_BACKEND``
    set) and collect the JSON each prints on its ``RESULT`` line."""
    results = []
    for b in backends.split(","):
        cmd = [sys.executable, script, "--worker"] + list(argv)
        env = dict(os.environ, KERAS_BACKEND=b, TF_CPP_MIN_LOG_LEVEL="2")
        print(f"== {b}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{b} worker failed ({proc.returncode})")
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="tensorflow,jax")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer calls and users")
    p.add_argument("--only", default="", help="comma list of adapt,lstm,batch,train")
    p.add_argument("--calls", type=int, default=400, help="timed adapt+score calls (>= 200)")
    p.add_argument("--lstm-hidden", type=int, default=16,
                   help="hidden size of the LSTM meta-learner (lstm; 16 is its default)")
    p.add_argument("--batch-total", type=int, default=10000)
    p.add_argument("--batch-users", type=int, default=1024)
    p.add_argument("--train-calls", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "s1_speed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results = run_workers(__file__, sys.argv[1:], args.backends)
    print(markdown(results))
    if args.out:
        save_report(__file__, results, args.out, protocol="S1")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
