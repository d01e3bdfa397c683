"""The SDK as strict as the server: unknown ids, out-of-range features, ratings, clear errors,
help and progress. One small MAML model is meta-trained once for the module (a few seconds)."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.api.v1 import recommender_pb2 as pb
from metarec.batch_scoring import score_batch
from metarec.cli import build_parser, main
from metarec.progress import ProgressBar, resolve_verbose
from metarec.ratings import check_ratings
from metarec.retrain import RetrainResult, learning_curve_figure, write_report
from metarec.schema import RatingRangeWarning
from metarec.unknown_ids import UnknownIdsWarning
from metarec_server.inference import ServingModel
from metarec_server.validation import Limits, RequestError, parse_candidates, parse_interactions, parse_user_features

SUPPORT = pd.DataFrame({"item_id": [5, 17, 42, 60], "rating": [5.0, 4.0, 1.0, 3.0]})


@pytest.fixture(scope="module")
def trained(small_maml):
    return small_maml


def server_message(call, *args):
    with pytest.raises(RequestError) as error:
        call(*args)
    return error.value.message


# ---------------------------------------------------------------------------- unknown ids
def test_unknown_ids_policy_errors_warns_or_ignores_with_the_servers_messages(trained):
    learner, _, _ = trained
    support = pd.DataFrame({"item_id": [5, 9999, 17], "rating": [5.0, 4.0, 3.0]})
    serving = ServingModel.from_learner(learner)
    request = pb.UserContext(interactions=[pb.Interaction(item_id=str(i), rating=r)
                                           for i, r in zip(support.item_id, support.rating)])
    expected = server_message(parse_interactions, request.interactions, serving, Limits())
    assert expected == "1 interaction item id(s) unknown to the model's catalogue: '9999'"

    with pytest.raises(ValueError) as error:
        learner.adapt(support, unknown_ids="error")
    # The same message; the SDK quotes the id in its own type (an int here, a string in the API).
    assert str(error.value).startswith(expected.replace("'9999'", "9999"))
    with pytest.warns(UnknownIdsWarning, match="1 interaction item id.s. unknown") as record:
        warned = learner.adapt(support)  # "warn" is the default
    assert record[0].filename == __file__  # attributed to the caller, not to metarec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ignored = learner.adapt(support, unknown_ids="ignore")
    np.testing.assert_allclose(warned.score([1, 2, 3]), ignored.score([1, 2, 3]), rtol=1e-6)

    # Candidates: the same policy and the server's message.
    expected = server_message(parse_candidates, ["3", "4040"], serving, Limits())
    with pytest.raises(ValueError) as error:
        ignored.score([3, 4040], unknown_ids="error")
    assert str(error.value).startswith(expected.replace("'4040'", "4040"))
    with pytest.warns(UnknownIdsWarning, match="1 candidate item id"):
        assert len(learner.recommend_many([ignored], k=3, candidates=[[3, 4040, 7, 8]])[0][0]) == 3
    with pytest.raises(ValueError, match="unknown_ids must be one of"):
        learner.adapt(SUPPORT, unknown_ids="strict")


def test_string_ids_against_an_integer_catalogue_are_caught_and_explained(trained):
    learner, _, _ = trained
    as_strings = SUPPORT.assign(item_id=SUPPORT.item_id.astype(str))
    with pytest.raises(ValueError) as error:
        learner.adapt_many([as_strings], unknown_ids="error")
    message = str(error.value)
    assert "4 interaction item id(s) unknown" in message and "'5'" in message
    assert "strings of known integer ids (e.g. '5' for 5)" in message and "astype(int)" in message
    with pytest.warns(UnknownIdsWarning, match="e.g. '61' for 61"):
        learner.adapt(SUPPORT).score(["61"])


def test_unknown_user_feature_keys_follow_the_same_policy(trained):
    learner, _, _ = trained
    serving = ServingModel.from_learner(learner)
    request = pb.UserContext()
    request.features["agee"].int_value = 30
    expected = server_message(parse_user_features, request.features, serving, Limits())
    with pytest.raises(ValueError) as error:
        learner.adapt(SUPPORT, {"agee": 30, "age": 30}, unknown_ids="error")
    assert str(error.value).startswith(expected)
    with pytest.warns(UnknownIdsWarning, match="unknown user feature 'agee'"):
        warned = learner.adapt(SUPPORT, {"agee": 30, "age": 30})
    # The unknown key is dropped: the same user as without it.
    np.testing.assert_allclose(warned.score([1, 2]), learner.adapt(SUPPORT, {"age": 30}).score([1, 2]), rtol=1e-6)


def test_score_batch_reports_unknown_ids_once_with_counts(trained, tmp_path, capsys):
    learner, _, data = trained
    interactions = data.interactions.groupby("user_id").head(4)[["user_id", "item_id", "rating"]].copy()
    users = interactions.user_id.unique()[:6]
    interactions = interactions[interactions.user_id.isin(users)]
    bad = [*interactions.index[interactions.user_id == users[0]][:1],
           *interactions.index[interactions.user_id == users[1]][:2]]
    interactions.loc[bad, "item_id"] = 100_000 + np.arange(3)
    with pytest.raises(ValueError, match="3 interaction item id.s. unknown .*in the supports of 2 of 6 users"):
        score_batch(learner, interactions, tmp_path / "a", k=3, unknown_ids="error", verbose=0)
    with pytest.warns(UnknownIdsWarning) as record:
        score_batch(learner, interactions, tmp_path / "b", k=3, verbose=0)
    assert len(record) == 1 and "in the supports of 2 of 6 users" in str(record[0].message)
    # The command line: a warning line with the counts, then the summary.
    folder = tmp_path / "models"
    (folder / "1").mkdir(parents=True)
    learner.save(folder / "1" / "model.keras")
    interactions.to_parquet(tmp_path / "users.parquet")
    code = main(["score-batch", "--model", str(folder), "--interactions", str(tmp_path / "users.parquet"),
                 "--k", "3", "--out", str(tmp_path / "c"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "metarec: warning: 3 interaction item id(s) unknown to the model's catalogue" in err
    assert "Top-3 written" in out and "1 warning(s) above" in out
    assert main(["score-batch", "--model", str(folder), "--interactions", str(tmp_path / "users.parquet"),
                 "--k", "3", "--out", str(tmp_path / "d"), "--quiet", "--unknown-ids", "error"]) == 2


# ---------------------------------------------------------------------------- feature range
def test_numeric_features_are_clipped_to_the_training_range(trained, tmp_path):
    learner, tasks, _ = trained
    spec = learner.encoder.feature_specs["age"]
    assert spec.low is not None and spec.low <= spec.mean <= spec.high
    oldest = learner.adapt(SUPPORT, {"age": spec.high}).score([1, 2, 3])
    for age in (1000, 1e308):
        scores = learner.adapt(SUPPORT, {"age": age}).score([1, 2, 3])
        assert np.isfinite(scores).all()
        np.testing.assert_allclose(scores, oldest, rtol=1e-6)
    youngest = learner.adapt(SUPPORT, {"age": spec.low}).score([1, 2, 3])
    np.testing.assert_allclose(learner.adapt(SUPPORT, {"age": -1e308}).score([1, 2, 3]), youngest, rtol=1e-6)
    # The range travels with the model.
    learner.save(tmp_path / "m.keras")
    again = metarec.load(tmp_path / "m.keras").encoder.feature_specs["age"]
    assert (again.low, again.high) == (spec.low, spec.high)


# ---------------------------------------------------------------------------- ratings
def test_ratings_error_quotes_the_bad_value():
    with pytest.raises(ValueError, match="ratings must be numbers, got 'five' at position 2"):
        check_ratings([5, 4, "five"], "explicit", (1.0, 5.0))


def test_an_unusual_inferred_rating_range_warns_and_rating_range_fixes_it():
    frame = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3], "rating": [1, 5, 4, 50]})
    with pytest.warns(RatingRangeWarning, match=r"\(1.0, 50.0\), is not a usual scale"):
        assert metarec.InteractionData(frame).schema.rating_range == (1.0, 50.0)
    # The suggested scale is the usual one that holds nearly every rating, whatever their
    # median: one stray 50 among mostly high 1-5 star ratings suggests (1, 5), which keeps the 5s.
    rng = np.random.default_rng(0)
    stars = rng.choice([1, 2, 3, 4, 5], size=2000, p=[0.05, 0.1, 0.25, 0.35, 0.25]).astype(float)
    many = pd.DataFrame({"user_id": np.arange(2001) // 20, "item_id": np.arange(2001) % 97,
                         "rating": np.append(stars, 50.0)})
    with pytest.warns(RatingRangeWarning, match=r"\(1 rating\(s\) lie outside \(1, 5\)\).*"
                                                r"rating_range=\(1, 5\)"):
        metarec.InteractionData(many)
    continuous = many.assign(rating=np.append(rng.uniform(1.2, 4.9, size=2000), 3.0))
    with pytest.warns(RatingRangeWarning, match=r"e\.g\. rating_range=\(1, 5\)"):
        metarec.InteractionData(continuous)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metarec.InteractionData(frame.assign(rating=[1, 5, 4, 3])).schema.rating_range == (1.0, 5.0)
        with pytest.raises(ValueError, match=r"rating 50.0 is outside the rating range \[1.0, 5.0\] at row 3"):
            metarec.InteractionData(frame, rating_range=(1, 5))


# ---------------------------------------------------------------------------- clear errors
def test_fit_on_a_dataframe_says_what_to_pass(trained):
    learner, tasks, data = trained
    with pytest.raises(TypeError, match="must be a TaskSet of users .* got a DataFrame: build one"):
        learner.fit(data.interactions)
    with pytest.raises(TypeError, match="got a UserTasks: pass one of its splits, e.g. tasks.train"):
        learner.fit(tasks)


def test_retrain_on_a_missing_model_folder_is_a_plain_error(tmp_path, capsys):
    assert main(["retrain", "--model-dir", str(tmp_path / "nope"), "--logs", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "metarec: error: No model folder at" in err and "Traceback" not in err


@pytest.mark.parametrize("backend", ["torch", "tensorflw"])
def test_an_unsupported_keras_backend_gets_metarecs_message_before_keras(backend):
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, "-c", "import metarec.maml"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"metarec: error: metarec runs on the Keras backends 'tensorflow' and 'jax'; got {backend!r} from the "
        f"KERAS_BACKEND environment variable. Set KERAS_BACKEND=tensorflow (the default) or KERAS_BACKEND=jax.")


# ---------------------------------------------------------------------------- help and progress
@pytest.mark.parametrize("command", ["quickstart", "score-batch", "retrain"])
def test_every_option_has_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    missing = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert missing == []
    if command == "retrain":
        assert "1 when it was refused" in sub.format_help()


def test_piped_fit_prints_one_line_per_epoch(trained, capsys):
    learner, tasks, _ = trained
    assert resolve_verbose("auto") == 2  # pytest's captured stdout is not a terminal
    learner.fit(tasks.train, epochs=2, verbose="auto")
    out = capsys.readouterr().out
    assert "\r" not in out and "\b" not in out
    lines = [line for line in out.splitlines() if "loss" in line]
    assert len(lines) == 2, out


def test_progress_bar_says_what_runs_before_it_ends(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        bar = ProgressBar(2, stream=stream)
        bar.begin("fitting maml K=5 seed=0")
        bar.update("maml K=5 seed=0")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("[1/2]") and lines[0].endswith("fitting maml K=5 seed=0 ...")
    assert lines[1].startswith("[############............] 1/2")


def test_retrain_report_links_a_plot_with_whole_epochs_and_one_y_label(tmp_path):
    history = {"loss": [1.2, 1.0, 0.9], "val_loss": [1.3, 1.1, 1.05]}
    result = RetrainResult(True, 1, 2, {"mae": 0.9}, {"mae": 0.8}, "mae", 0, history)
    write_report(result, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "![Learning curves: query loss per epoch](learning_curves.png)" in report
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    ax = learning_curve_figure(result).axes[0]
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_ylabel() == "mean query loss per user"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "meta-train users, after adaptation", "validation users, after adaptation"]


def test_evaluation_says_which_fit_runs(capsys):
    from metarec.evaluation import GlobalMean, Q1Protocol, run_evaluation

    protocol = Q1Protocol(metarec.datasets.synthetic(seed=0), k_values=(10,))
    method = GlobalMean()
    run_evaluation(protocol, [method], seeds=(0,), k_values=(10,), score_validation=False)
    lines = capsys.readouterr().err.splitlines()  # not a terminal: one line per step
    assert lines[0].endswith(f"fitting {method.name} K=10 seed=0 ...") and lines[0].startswith("[1/1]")
    assert lines[1].endswith(f"{method.name} K=10 seed=0") and "1/1" in lines[1]
