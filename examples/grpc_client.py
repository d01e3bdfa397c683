"""Talking to the metarec gRPC server from Python: health, status, logging, Recommend, Score.

The server (``metarec serve``) holds a meta-learned model and adapts it to each user *inside
the request*: a client sends the user's few interactions (or a user id whose interactions it
logged earlier) and gets recommendations or scores from a model personalised for that user a
few milliseconds ago. Nothing per user is trained or stored ahead of time, which is what makes
brand-new users work. This tutorial uses the SDK client, ``metarec.client.Client``.

Start a server on a folder of numbered model versions (``DIR/1/model.keras``,
``DIR/2/model.keras``, ...; a new number is picked up and hot-swapped while serving)::

    metarec serve --model-dir DIR --port 8500 --log-db interactions.sqlite

(``python -m metarec_server.main`` takes the same options and runs the same function,
``metarec_server.main.serve_main``; ``metarec serve --help`` lists them. On a machine with several
cores, ``--workers N`` runs N server processes on the port; the kernel gives each new
connection to one of them, so a busy client opens several: ``Client(address, connections=8)``.)

and run the tour against it (``--address``), or let this script start one::

    python examples/grpc_client.py                     # self-contained (see below)
    python examples/grpc_client.py --model-dir DIR     # serve DIR for the tour
    python examples/grpc_client.py --address 127.0.0.1:8500 --interactions user.csv

Self-contained (no option): meta-trains a tiny MAML model on synthetic data, saves it as
version 1 in a temporary folder, starts the server on it as a subprocess on a free loopback
port (training 6 s, then SERVING 4-5 s later, the whole tour 12-13 s on either backend, measured
2026-12-04 on a quiet 2-core VM; the script prints each phase's time, and a busy machine takes
several times as long), runs the tour with one held-out synthetic user and stops the server (SIGTERM:
it finishes in-flight calls, then exits). ``--in-process`` runs the server on a background
thread of this process instead (``metarec_server.background.BackgroundServer``, handy in notebooks).

The tour:

1. health (the standard ``grpc.health.v1`` service, what load balancers probe) and
   ``GetModelStatus``: which version serves, its feedback, rating range, catalogue size;
2. ``LogInteractions``: store a user's interactions durably on the server;
3. ``Recommend`` with the interactions in the request (stateless: any client, any replica);
4. ``Recommend`` with only the user id: the server adapts to the interactions it logged;
5. ``Score``: predicted ratings of chosen candidate items, in request order;
6. errors: every bad request fails with a precise status code (``grpc.RpcError``), e.g. an
   item the model does not know is ``INVALID_ARGUMENT``, a version it does not serve
   ``NOT_FOUND``. Retry ``UNAVAILABLE`` / ``RESOURCE_EXHAUSTED``; fix ``INVALID_ARGUMENT``.

The functions are importable (``tests/test_examples.py`` runs the self-contained tour and
checks the server's answers against the SDK's own ``adapt`` + ``score``).
"""

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
from grpc_health.v1 import health_pb2, health_pb2_grpc

from metarec.client import Client

REPO_ROOT = Path(__file__).resolve().parent.parent
#: A small micro-batch for the demo server: at start-up each version is test-run (and its
#: kernels compiled) for every padded batch size up to this, so 4 keeps the start quick on a
#: laptop. Production servers keep the default (64), which batches concurrent requests.
DEMO_MAX_BATCH_SIZE = 4


# ---------------------------------------------------------------------------- a model to serve
def train_tiny_model(path, epochs=2, seed=0):
    """Meta-train a small MAML model on synthetic data and save it to ``path`` (``.keras``).

    Returns the synthetic data and its ``UserTasks`` (the demo user comes from the test users,
    whom the model never saw).
    """
    # Imported here: the client side needs neither Keras nor TensorFlow (``metarec.client``
    # imports only gRPC and numpy), only training a model does.
    import keras

    import metarec

    data = metarec.datasets.synthetic(seed=seed)
    tasks = metarec.UserTasks(data, support_size=10, split="time", user_split="time", seed=seed)
    keras.utils.set_random_seed(seed)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(32,))
    learner = metarec.MAML(model, inner_steps=2, inner_lr=0.05, adapt="decision_layers")
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    learner.fit(tasks.train, validation_data=tasks.val, epochs=epochs, seed=seed, verbose=0)
    learner.save(path)
    return data, tasks


def publish(model_dir, version, source):
    """Put a model file in ``model_dir/<version>/model.keras`` *atomically*.

    The server polls the folder; copying into a hidden temporary folder and renaming it makes
    the version appear complete or not at all, never half-written.
    """
    model_dir = Path(model_dir)
    tmp = model_dir / f".tmp-{version}"
    tmp.mkdir(parents=True)
    shutil.copy(source, tmp / "model.keras")
    os.rename(tmp, model_dir / str(version))
    return model_dir / str(version) / "model.keras"


def next_version(model_dir):
    """One more than the highest version in ``model_dir`` (1 for a new folder)."""
    model_dir = Path(model_dir)
    numbers = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max(numbers, default=0) + 1


def demo_user(tasks, position=0):
    """A held-out test user's first ratings (with timestamps) and features."""
    user_id = tasks.test.user_ids[position]
    support = tasks.test.support_frame(position)[["item_id", "rating", "timestamp"]]
    users = tasks.data.users
    features = {} if users is None else users.loc[user_id].to_dict()
    return support, features


def demo_user_from_model(model_dir, n=8):
    """For ``--model-dir`` without ``--interactions``: invent a user from the newest version's
    catalogue (a real client knows its own item ids; this only makes the tour runnable)."""
    import metarec

    versions = sorted((int(p.name) for p in Path(model_dir).iterdir() if p.name.isdigit()))
    if not versions:
        raise SystemExit(f"{model_dir} holds no numbered version (expected {model_dir}/1/model.keras)")
    learner = metarec.load(Path(model_dir) / str(versions[-1]) / "model.keras")
    items = learner.encoder.item_ids[1:n + 1].tolist()
    schema = learner.encoder.schema
    if schema.feedback == "implicit":
        ratings = np.resize([1.0, 0.0], len(items))  # labels, not ratings
    else:
        low, high = schema.rating_range
        ratings = np.resize([high, low, high, (low + high) / 2], len(items))
    return pd.DataFrame({"item_id": items, "rating": ratings,
                         "timestamp": 1_700_000_000 + np.arange(len(items))}), {}


# ---------------------------------------------------------------------------- running a server
@contextlib.contextmanager
def serve_subprocess(model_dir, log_db, server_log, max_batch_size=DEMO_MAX_BATCH_SIZE,
                     timeout=300.0):
    """Run the server (``metarec serve ...``) as a child process on a free loopback port;
    yields its address.

    ``--port 0`` lets the OS pick a free port (no race with other programs); the server
    prints ``metarec server listening on HOST:PORT`` on stdout once it accepts connections,
    which is how we learn the port. Its log (stderr) goes to ``server_log``.
    """
    # This interpreter, so the child has the same packages (and KERAS_BACKEND). Paths are
    # made absolute because the child runs from the repository root, where `server` lives.
    command = [sys.executable, "-m", "metarec.cli", "serve",
               "--model-dir", str(Path(model_dir).resolve()), "--host", "127.0.0.1",
               "--port", "0", "--log-db", str(Path(log_db).resolve()),
               "--max-batch-size", str(max_batch_size), "--poll-interval", "1"]
    with open(server_log, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   cwd=REPO_ROOT)
        try:
            yield _wait_for_address(process, server_log, timeout)
        finally:
            # SIGTERM is a graceful stop: in-flight calls finish, the log is committed.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_address(process, server_log, timeout):
    lines = queue.Queue()
    # readline() blocks; a reader thread lets us give up after `timeout`.
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        if line.startswith("metarec server listening on "):
            return line.rsplit(" ", 1)[1].strip()
    log_tail = Path(server_log).read_text()[-2000:]
    raise RuntimeError(f"the server did not start (exit code {process.poll()}); its log:\n{log_tail}")


@contextlib.contextmanager
def serve_in_process(model_dir, log_db, max_batch_size=DEMO_MAX_BATCH_SIZE):
    """The same server on a background thread of this process; yields its address."""
    from metarec_server.app import ServerConfig
    from metarec_server.background import BackgroundServer
    from metarec_server.batcher import BatcherConfig

    config = ServerConfig(model_dir=model_dir, host="127.0.0.1", port=0, log_path=log_db,
                          poll_interval_s=1.0, batching=BatcherConfig(max_batch_size=max_batch_size))
    with BackgroundServer(config) as running:  # stops gracefully on exit
        yield running.address


def wait_until_serving(address, timeout=300.0):
    """Poll the standard gRPC health service until it reports SERVING.

    The server accepts connections before its model is loaded and test-run (requests get
    ``UNAVAILABLE`` meanwhile, health says ``NOT_SERVING``); this is what a load balancer's
    readiness probe does too.
    """
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # not up yet: keep waiting
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} is not SERVING after {timeout:.0f} s")
            time.sleep(0.2)


# ---------------------------------------------------------------------------- the client tour
def tour(address, interactions, user_features=None, user_id="tutorial-user", k=5,
         print_fn=print):
    """Every client call of the tutorial against the server at ``address``.

    ``interactions``: the user's interactions (DataFrame with ``item_id``, ``rating`` and
    optionally ``timestamp``). Returns what each call returned, for tests and notebooks.
    """
    out = {}
    user_features = dict(user_features or {})
    with Client(address, timeout=30) as client:  # one client per process: it is thread-safe
        print_fn("\n[1] Health and model status")
        client.wait_ready(timeout=30)  # the channel is connected
        out["health"] = wait_until_serving(address)
        out["status"] = client.model_status()
        print_fn(f"  health: {out['health']}")
        for m in out["status"]:
            print_fn(f"  model {m['name']!r}: {m['state']}, version {m['version']}, {m['feedback']} "
                     f"feedback, ratings {m['rating_range']}, {m['num_items']} items "
                     f"({m['item_id_type']} ids), user features {m['user_features']}")

        print_fn(f"\n[2] LogInteractions: {len(interactions)} interactions of user {user_id!r}")
        # Timestamps order the log; without one the server stores its receive time.
        out["logged"] = client.log_interactions(user_id, interactions)
        print_fn(f"  stored {out['logged']} rows")

        print_fn("\n[3] Recommend, the interactions in the request")
        # The server adapts the model to these interactions, then ranks the catalogue; items
        # the user already rated are left out (exclude_seen=False keeps them).
        recs = client.recommend(interactions, k=k, user_features=user_features)
        out["recommend"] = recs
        print_fn(f"  model {recs.model_name!r} v{recs.model_version}:")
        print_fn("  " + recs.to_frame().to_string(index=False).replace("\n", "\n  "))

        print_fn(f"\n[4] Recommend for user id {user_id!r}: the server reads its log")
        # User features are not logged: send them with every request that should use them.
        by_id = client.recommend(user_id=user_id, k=k, user_features=user_features)
        out["recommend_by_id"] = by_id
        print_fn(f"  {by_id.item_ids} (same as [3]: {by_id.item_ids == recs.item_ids})")

        candidates = list(recs.item_ids[:2]) + interactions["item_id"].iloc[:2].tolist()
        print_fn(f"\n[5] Score candidates {candidates}")
        scores = client.score(interactions, candidates, user_features=user_features)
        out["score"] = scores
        print_fn("  " + scores.to_series().round(3).to_string().replace("\n", "\n  "))

        print_fn("\n[6] Errors are grpc.RpcError with a status code and a message")
        out["errors"] = {}
        bad_requests = {
            "unknown item": lambda: client.recommend({"no-such-item": 4.0}, k=k),
            "version not served": lambda: client.recommend(interactions, k=k, version=99),
            "k beyond the limit": lambda: client.recommend(interactions, k=10 ** 6),
        }
        for name, call in bad_requests.items():
            try:
                call()
            except grpc.RpcError as error:
                out["errors"][name] = (error.code(), error.details())
                print_fn(f"  {name}: {error.code().name}: {error.details()}")
            else:
                raise AssertionError(f"{name}: the server accepted a bad request")
    return out


def run(model_dir=None, address=None, interactions=None, user_features=None, in_process=False,
        workdir=None, epochs=2, k=5, max_batch_size=DEMO_MAX_BATCH_SIZE, print_fn=print):
    """Start (or reach) a server, run :func:`tour`, stop what was started.

    ``workdir`` keeps the model, the interaction log and the server log (a temporary folder,
    removed afterwards, when ``None``). Returns the tour's results plus ``model_file`` (the
    self-contained model, else ``None``), ``interactions`` and ``user_features``.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="metarec-grpc-"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model_file = None
        if address is None and model_dir is None:
            print_fn("Meta-training a tiny model on synthetic data ...")
            t0 = time.perf_counter()
            model_file = workdir / "trained.keras"
            _, tasks = train_tiny_model(model_file, epochs=epochs)
            model_dir = workdir / "models"
            version = next_version(model_dir)  # 1, unless a kept --workdir has versions
            print_fn(f"  {time.perf_counter() - t0:.0f} s; published as "
                     f"{publish(model_dir, version, model_file)}")
            if interactions is None:
                interactions, user_features = demo_user(tasks)
        elif interactions is None:
            if model_dir is None:
                raise SystemExit("--address needs --interactions: the user's item ids and ratings")
            interactions, user_features = demo_user_from_model(model_dir)
        started = address is None
        if started:
            t0 = time.perf_counter()
            log_db, server_log = workdir / "interactions.sqlite", workdir / "server.log"
            if in_process:
                address = stack.enter_context(serve_in_process(model_dir, log_db, max_batch_size))
            else:
                print_fn(f"Starting: metarec serve --model-dir {model_dir} --port 0 "
                         f"--log-db {log_db} --max-batch-size {max_batch_size}")
                address = stack.enter_context(
                    serve_subprocess(model_dir, log_db, server_log, max_batch_size))
            wait_until_serving(address)
            print_fn(f"  serving on {address} after {time.perf_counter() - t0:.0f} s"
                     + ("" if in_process else f" (server log: {server_log})"))
        results = tour(address, interactions, user_features, k=k, print_fn=print_fn)
        if started:
            print_fn("\nStopping the server (graceful: in-flight calls finish first).")
    return {**results, "model_file": model_file, "address": address,
            "interactions": interactions, "user_features": user_features}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model-dir", help="serve this folder of numbered versions for the tour")
    where.add_argument("--address", help="use a server already running at HOST:PORT")
    parser.add_argument("--interactions", help="CSV of the user's item_id,rating[,timestamp]")
    parser.add_argument("--user-features", help='JSON object, e.g. \'{"age": 31}\'')
    parser.add_argument("--in-process", action="store_true",
                        help="run the server on a thread of this process, not as a subprocess")
    parser.add_argument("--workdir", help="keep the model and logs here (default: a temp folder)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the self-contained model")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=DEMO_MAX_BATCH_SIZE,
                        help="the started server's micro-batch limit (default: %(default)s)")
    args = parser.parse_args(argv)
    # The in-process server logs each start / swap / stop at INFO; the tour's output is enough.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    interactions = pd.read_csv(args.interactions) if args.interactions else None
    features = json.loads(args.user_features) if args.user_features else None
    return run(model_dir=args.model_dir, address=args.address, interactions=interactions,
               user_features=features, in_process=args.in_process, workdir=args.workdir,
               epochs=args.epochs, k=args.k, max_batch_size=args.max_batch_size)


if __name__ == "__main__":
    main()
