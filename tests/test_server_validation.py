"""Request validation and the catalogue lookups behind it, on real protobuf messages."""

import numpy as np
import pytest

from metarec.api.v1 import recommender_pb2 as pb
from metarec_server.inference import Catalog, ServingModel
from metarec_server.validation import Limits, RequestError, parse_candidates, parse_interactions


def serving(items=range(1, 51), feedback="explicit", rating_range=(1.0, 5.0)):
    return ServingModel(learner=None, catalog=Catalog(list(items)), feedback=feedback,
                        rating_range=rating_range, user_features={})


def interactions(*rows):
    """``(item_id, rating[, timestamp])`` rows as the repeated field a request carries."""
    user = pb.UserContext()
    for row in rows:
        message = user.interactions.add(item_id=row[0], rating=row[1])
        if len(row) > 2:
            message.timestamp = row[2]
    # Parsed from bytes, as the server receives them.
    return pb.UserContext.FromString(user.SerializeToString()).interactions


@pytest.mark.parametrize("ids", [["3", "1", "50"], ["7"], [], ["3", "nope", "1", ""], ["x"], ["5", "5"]])
def test_catalog_index_matches_a_dictionary(ids):
    catalog = Catalog(list(range(1, 51)))
    expected = [int(i) if i.isdigit() and 1 <= int(i) <= 50 else 0 for i in ids]
    got = catalog.index(ids)
    assert got.dtype == np.int32 and got.tolist() == expected
    # The same from a protobuf repeated field.
    request = pb.RecommendRequest.FromString(pb.RecommendRequest(candidate_item_ids=ids).SerializeToString())
    assert catalog.index(request.candidate_item_ids).tolist() == expected


def test_good_interactions_become_indices_ratings_and_timestamps():
    model = serving()
    parsed = parse_interactions(interactions(("4", 5.0, 100), ("2", 1.0, 50)), model, Limits())
    assert parsed.item_idx.tolist() == [4, 2] and parsed.item_idx.dtype == np.int32
    assert parsed.ratings.tolist() == [5.0, 1.0] and parsed.ratings.dtype == np.float32
    assert parsed.timestamps.tolist() == [100, 50]
    assert parsed.rows == [("4", 5.0, 100), ("2", 1.0, 50)]
    # A timestamp on some rows only: no timestamp column at all.
    assert parse_interactions(interactions(("4", 5.0, 100), ("2", 1.0)), model, Limits()).timestamps is None


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("4", 5.0), ("", 3.0)], "interactions[1].item_id must be non-empty"),
        ([("4", 5.0), ("4" * 300, 3.0)], "interactions[1].item_id is 300 characters long"),
        ([("4", float("nan"))], "interactions[0]: rating must be finite"),
        ([("4", 3.0), ("5", 3.0), ("6", 5.5)], "interactions[2]: rating 5.5 is outside"),
        ([("4", 3.0), ("5", 0.0)], "interactions[1]: rating 0.0 is outside"),
        ([("4", 3.0, 5), ("5", 3.0, -1)], "interactions[1]: timestamp must be >= 0"),
        ([("4", 3.0), ("404", 3.0), ("0", 3.0)], "2 interaction item id(s) unknown"),
    ],
)
def test_bad_interactions_name_the_first_bad_row(rows, message):
    with pytest.raises(RequestError) as error:
        parse_interactions(interactions(*rows), serving(), Limits())
    assert message in error.value.message


def test_implicit_feedback_takes_only_zero_or_one_labels():
    model = serving(feedback="implicit", rating_range=(0.0, 1.0))
    assert parse_interactions(interactions(("4", 1.0), ("5", 0.0)), model, Limits()).ratings.tolist() == [1.0, 0.0]
    with pytest.raises(RequestError) as error:
        parse_interactions(interactions(("4", 1.0), ("5", 0.5)), model, Limits())
    assert "interactions[1]: implicit feedback needs a 0 or 1 label" in error.value.message


def test_candidates_are_indices_and_bad_lists_are_refused():
    model = serving()
    assert parse_candidates([], model, Limits()) is None
    assert parse_candidates(["9", "3"], model, Limits()).tolist() == [9, 3]
    for ids, message in [(["9", "9"], "duplicates"), (["9", ""], "non-empty"), (["9", "77"], "'77'"),
                         ([str(i) for i in range(1, 12)], "11 candidates (max 10)")]:
        with pytest.raises(RequestError) as error:
            parse_candidates(ids, model, Limits(max_candidates=10))
        assert message in error.value.message
