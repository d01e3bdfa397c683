"""``metarec.ratings``: the one rule of a valid rating, used by the SDK and the server."""

import numpy as np
import pytest

from metarec.ratings import BadRating, check_ratings, first_bad_rating, ratings_valid


@pytest.mark.parametrize("ratings, feedback, rating_range, bad", [
    ([1.0, 5.0, 3.5], "explicit", (1.0, 5.0), None),
    ([1.0, 6.0, 0.0], "explicit", (1.0, 5.0), BadRating(1, 6.0, "out_of_range")),
    ([1.0, 6.0, np.nan], "explicit", (1.0, 5.0), BadRating(2, np.nan, "not_finite")),
    ([-7.0, 1e9], "explicit", None, None),
    ([np.inf], "explicit", None, BadRating(0, np.inf, "not_finite")),
    ([0.0, 1.0, 1.0], "implicit", (0.0, 1.0), None),
    ([0.0, 0.5, 2.0], "implicit", None, BadRating(1, 0.5, "not_binary")),
    ([], "explicit", (1.0, 5.0), None),
])
def test_vectorised_check_and_first_bad_rating_agree(ratings, feedback, rating_range, bad):
    ratings = np.array(ratings, np.float64)
    assert ratings_valid(ratings, feedback, rating_range) == (bad is None)
    got = first_bad_rating(ratings, feedback, rating_range)
    if bad is None:
        assert got is None
    else:
        assert (got.position, got.reason) == (bad.position, bad.reason)
        np.testing.assert_equal(got.value, bad.value)
        assert type(got.value) is float


def test_check_ratings_names_the_first_bad_value():
    assert check_ratings([1, 2.5], "explicit", (1.0, 5.0)).dtype == np.float32
    with pytest.raises(ValueError, match="finite, got nan"):
        check_ratings([3.0, np.nan], "explicit", (1.0, 5.0))
    with pytest.raises(ValueError, match=r"rating 7.0 is outside the rating range \[1.0, 5.0\]"):
        check_ratings([3.0, 7.0, 9.0], "explicit", (1.0, 5.0))
    with pytest.raises(ValueError, match="implicit feedback needs a 0 or 1 label, got 0.5"):
        check_ratings([1.0, 0.5], "implicit", None)
    with pytest.raises(ValueError, match="ratings must be numbers, got 'x'"):
        check_ratings(["x"], "explicit", None)


def test_the_server_path_checks_ratings_once(monkeypatch):
    metarec = pytest.importorskip("metarec")
    pytest.importorskip("keras")
    from server.inference import RECOMMEND, Job, ServingModel, run_batch

    tasks = metarec.UserTasks(metarec.datasets.synthetic(seed=0), support_size=10)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder), inner_steps=1, encoder=tasks.encoder)
    served = ServingModel.from_learner(learner)
    idx = served.catalog.all_indices[:3]
    ratings = np.array([5.0, 1.0, 4.0], np.float32)

    calls = []
    original = type(learner.encoder).check_ratings
    monkeypatch.setattr(type(learner.encoder), "check_ratings",
                        lambda self, r: calls.append(1) or original(self, r))
    job = Job(RECOMMEND, idx, ratings, None, {}, served.catalog.all_indices[:20], 5, True, None)
    (result,) = run_batch(served, [job], None)  # validated by the request handler already
    assert len(result.item_idx) == 5 and calls == []
    # The SDK's own entry points still check them.
    learner.adapt_score_indices(idx, ratings, [3], None)
    assert calls == [1]
    with pytest.raises(ValueError, match="outside the rating range"):
        learner.adapt_indices(idx, [5.0, 1.0, 9.0], [3])
