"""The ``metarec`` command line: thin entry points over importable functions."""

import argparse
import os
import sys
import warnings


def _positive_int(text):
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _verbose(args):
    """0 with --quiet; else a progress bar on a terminal and one line per epoch when the output
    is piped or redirected (``metarec.progress``)."""
    return 0 if args.quiet else "auto"


def _quickstart(args):
    from metarec.quickstart import run_quickstart

    run_quickstart(seed=args.seed, epochs=args.epochs, verbose=_verbose(args))
    return 0


def _evaluate(args):
    from metarec.evaluation.cli import run_evaluate_cli

    return run_evaluate_cli(args)


def _score_batch(args):
    from metarec.batch_scoring import read_table, score_batch
    from metarec.unknown_ids import UnknownIdsWarning

    candidates = None
    if args.candidates:
        candidates = read_table(args.candidates, columns=["item_id"])["item_id"].to_numpy()
    features = read_table(args.user_features).set_index("user_id") if args.user_features else None
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always", UnknownIdsWarning)
        if args.engine == "ray":
            from metarec.ray_scoring import score_batch_ray

            out = score_batch_ray(args.model, args.interactions, args.out, candidates=candidates,
                                  k=args.k, user_features=features,
                                  exclude_seen=not args.include_seen, chunk_users=args.chunk_users,
                                  actors=args.actors, num_gpus=args.num_gpus,
                                  partitions=args.partitions, address=args.ray_address,
                                  unknown_ids=args.unknown_ids)
        else:
            out = score_batch(args.model, args.interactions, args.out, candidates=candidates, k=args.k,
                              user_features=features, exclude_seen=not args.include_seen,
                              chunk_users=args.chunk_users, verbose=_verbose(args),
                              unknown_ids=args.unknown_ids)
    caught = [w for w in recorded if issubclass(w.category, UnknownIdsWarning)]
    for other in recorded:
        if other not in caught:  # anyone else's warnings, shown as Python shows them
            warnings.showwarning(other.message, other.category, other.filename, other.lineno)
    _print_warnings(caught)
    print(f"Top-{args.k} written to {out}/" + (f" ({len(caught)} warning(s) above)" if caught else ""))
    return 0


def _retrain(args):
    from metarec.batch_scoring import read_table
    from metarec.retrain import latest_version, read_logs, retrain

    latest_version(args.model_dir)  # a missing folder is reported before the logs are read
    features = read_table(args.user_features) if args.user_features else None
    result = retrain(args.model_dir, read_logs(args.logs), epochs=args.epochs,
                     learning_rate=args.learning_rate, support_size=args.support_size,
                     margin=args.margin, gate_metric=args.gate_metric, report_dir=args.report,
                     seed=args.seed, verbose=_verbose(args), user_features=features)
    print(result.summary())
    return 0 if result.promoted else 1


def _print_warnings(caught):
    """Warnings recorded during a command, as ``metarec: warning: ...`` lines on stderr."""
    for warning in caught:
        print(f"metarec: warning: {warning.message}", file=sys.stderr)


SERVER_PACKAGE = "metarec_server"


def _serve(argv):
    """``metarec serve``: run the gRPC service, which is imported here and nowhere else.

    The SDK never imports the service (``tests/test_import_direction.py``); the service is the
    package ``metarec_server`` (the repository's ``server/`` folder), installed with metarec.
    """
    try:
        from metarec_server.main import serve_main
    except ModuleNotFoundError as exc:
        print(
            f"metarec: error: `metarec serve` needs the gRPC service, the Python package "
            f"{SERVER_PACKAGE!r}, which could not be imported ({exc}). It is installed with "
            f"metarec: reinstall it (`pip install metarec`, or `pip install -e .` in a checkout "
            f"of the repository, which installs its server/ folder as {SERVER_PACKAGE}).",
            file=sys.stderr,
        )
        return 2
    return serve_main(argv)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="metarec", description="Meta-learned personalization for cold-start users."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="meta-train on synthetic data and compare adaptation",
                       description="Meta-train MAML and a global model on synthetic users, then compare "
                                   "them on cold-start test users (about a minute on a laptop).")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, the split and the training (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=15,
                   help="most epochs of each model; early stopping may end sooner (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (otherwise a bar on a terminal, one line per epoch when piped)")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("evaluate", help="run protocol Q1 and write a report")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' or a MovieLens directory (e.g. ../shared/data/ml-100k)")
    p.add_argument("--methods", default="baselines,catalogue-two-tower",
                   help="comma-separated method names (see --list-methods)")
    p.add_argument("--feedback", choices=["explicit", "implicit"], default="explicit",
                   help="implicit: every rating becomes an interaction labelled 1 (protocol Q2-implicit)")
    p.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds: each trained method is fitted once per seed, a deterministic "
                        "one once (default: %(default)s)")
    p.add_argument("--k", default="5,10,20",
                   help="comma-separated support sizes K: the first K interactions of each user "
                        "(default: %(default)s)")
    p.add_argument("--out", default="runs/evaluate",
                   help="folder for report.md, report.json and the plots (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="most training epochs of each neural method (default 30; catalogue-two-tower at most "
                        "10); early stopping on the validation users still applies")
    p.add_argument("--list-methods", action="store_true", help="print the method names and exit")
    p.add_argument("--search", metavar="METHOD",
                   help="instead of the report: search METHOD's hyper-parameters on validation "
                        "users (grid in metarec.evaluation.search.GRIDS; first of --seeds and --k)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("score-batch", help="adapt to every user of a file and write their top-k",
                       description="Adapt the model to every user of an interactions file and write "
                                   "each user's top-k as Parquet parts. Resumable: run it again with the "
                                   "same arguments and finished parts are kept.")
    p.add_argument("--model", required=True,
                   help="a .keras file, a version folder, or a folder of numbered versions (the newest is used)")
    p.add_argument("--interactions", required=True,
                   help="Parquet file or folder, or CSV, with user_id, item_id, rating: every user's "
                        "support set (streamed in bounded memory)")
    p.add_argument("--candidates", help="Parquet/CSV with an item_id column: the items to rank "
                                        "(default: the whole catalogue)")
    p.add_argument("--user-features", help="Parquet/CSV with user_id and the model's user feature columns")
    p.add_argument("--k", type=_positive_int, default=20, help="items per user (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder of Parquet parts (resumable)")
    p.add_argument("--chunk-users", type=_positive_int, default=1024,
                   help="users adapted in one vectorised call and written per part (default: %(default)s)")
    p.add_argument("--include-seen", action="store_true",
                   help="rank items of the user's own support too (excluded by default)")
    p.add_argument("--unknown-ids", choices=["error", "warn", "ignore"], default="warn",
                   help="item ids outside the model's catalogue and unknown user feature columns: "
                        "refuse the job, warn with counts and score them as unknown (default), or "
                        "say nothing")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (otherwise a bar on a terminal, one line per chunk when piped)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one process, streamed (default); ray: Ray Data (pip install "
                        "'metarec[ray]')")
    p.add_argument("--actors", type=_positive_int, default=1,
                   help="--engine ray: scoring actors, each holding the model once")
    p.add_argument("--num-gpus", type=float, default=0.0, help="--engine ray: GPUs per actor")
    p.add_argument("--partitions", type=_positive_int, default=None,
                   help="--engine ray: hash partitions of users (default: from the input size)")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: a cluster to join, e.g. ray://head:10001 (default: "
                        "RAY_ADDRESS, else a local Ray instance)")
    p.set_defaults(func=_score_batch)

    p = sub.add_parser(
        "retrain", help="retrain on logged interactions behind a promotion gate",
        description="Warm-start meta-training from the newest version in --model-dir on logged "
                    "interactions, compare old and new on the most recent users, and write the next "
                    "numbered version only when the new model is not worse (a running server then "
                    "swaps it in).",
        epilog="exit status: 0 when the new version was promoted, 1 when it was refused (the current "
               "version keeps serving), 2 for bad arguments or data.")
    p.add_argument("--model-dir", required=True, help="folder of numbered model versions (e.g. models/recs)")
    p.add_argument("--logs", required=True, help="the server's interaction log (a SQLite file or a "
                                                 "postgresql:// URL), or Parquet/CSV with user_id, "
                                                 "item_id, rating, timestamp")
    p.add_argument("--user-features", help="Parquet/CSV with user_id and the model's user feature columns "
                                           "(the log holds interactions only)")
    p.add_argument("--epochs", type=_positive_int, default=10,
                   help="most epochs; early stopping on validation users may end sooner (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="Adam learning rate of the meta-training (default: %(default)s)")
    p.add_argument("--support-size", type=_positive_int, default=10,
                   help="interactions per user adapted on; the rest are the query (default: %(default)s)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="how much worse the new model may be on the gate metric and still be promoted "
                        "(default: %(default)s)")
    p.add_argument("--gate-metric", choices=["mae", "loss"], default=None,
                   help="metric of the promotion gate, lower is better (default: mae for explicit "
                        "feedback, loss for implicit)")
    p.add_argument("--report", help="folder for report.md and learning_curves.png (linked from the report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (otherwise a bar on a terminal, one line per epoch when piped)")
    p.set_defaults(func=_retrain)

    p = sub.add_parser("serve", help="run the gRPC server (see `metarec serve --help`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _serve(args.rest))
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # (An unsupported KERAS_BACKEND has been refused with metarec's message when the package
    # was imported: metarec.backend_choice.)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        # The server parses its own options (argparse's REMAINDER does not pass on a first
        # argument that starts with "--").
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"metarec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
