"""Schema inference and InteractionData validation."""

import json

import numpy as np
import pandas as pd
import pytest

from metarec.interactions import InteractionData
from metarec.schema import FeatureSpec, Schema, infer_schema


def _interactions(**overrides):
    frame = pd.DataFrame({
        "user_id": [1, 1, 2, 2, 3],
        "item_id": [10, 11, 10, 12, 11],
        "rating": [1.0, 5.0, 3.0, 4.0, 2.0],
        "timestamp": [5, 6, 1, 2, 9],
    })
    for key, value in overrides.items():
        frame[key] = value
    return frame


def _users():
    return pd.DataFrame({"user_id": [1, 2, 3], "age": [20, 31, 45], "gender": ["M", "F", "F"]})


def _items():
    return pd.DataFrame({"genres": [["a", "b"], ["b"], ["c"]], "year": [1990.0, 2001.0, np.nan]},
                        index=pd.Index([10, 11, 12], name="item_id"))


# --------------------------------------------------------------------------- schema
def test_infer_schema_kinds():
    users = pd.DataFrame({
        "user_id": [1, 2, 3],
        "age": [20, 31, 45],                    # int → numeric
        "score": [0.5, 0.1, 0.9],               # float → numeric
        "bucket": [1, 1, 2],                    # few distinct ints still numeric (documented)
        "gender": ["M", "F", "F"],              # str → categorical
        "vip": [True, False, True],             # bool → categorical
        "region": pd.Categorical(["x", "y", "x"]),
        "tags": [("p", "q"), ("q",), set()],    # list-like cells → multi_hot
    })
    items = pd.DataFrame({"item_id": [10, 11, 12], "genres": ["a|b", "b", "c"]})
    schema = infer_schema(_interactions(), users, items, multi_hot=["genres"])
    kinds = {s.name: s.kind for s in schema.features}
    assert kinds == {"age": "numeric", "score": "numeric", "bucket": "numeric",
                     "gender": "categorical", "vip": "categorical", "region": "categorical",
                     "tags": "multi_hot", "genres": "multi_hot"}
    assert schema.feature("genres").separator == "|"
    assert schema.feature("tags").separator is None
    assert [s.name for s in schema.user_features][0] == "age"  # user_id is not a feature


def test_declared_kinds_override_inference():
    users = pd.DataFrame({"user_id": [1, 2], "occupation": [3, 7], "code": ["1.5", "2"]})
    schema = infer_schema(_interactions(), users, categorical=["occupation"], numeric=["code"])
    assert schema.feature("occupation").kind == "categorical"
    assert schema.feature("code").kind == "numeric"
    with pytest.raises(ValueError, match="more than one kind"):
        infer_schema(_interactions(), users, categorical=["code"], numeric=["code"])


def test_feedback_inference():
    explicit = infer_schema(_interactions())
    assert explicit.feedback == "explicit" and explicit.rating_range == (1.0, 5.0)
    implicit = infer_schema(_interactions(rating=[0, 1, 1, 0, 1]))
    assert implicit.feedback == "implicit" and implicit.rating_range is None
    fixed = infer_schema(_interactions(rating=[2, 3, 3, 4, 4]), rating_range=(1, 5))
    assert fixed.rating_range == (1.0, 5.0)
    forced = infer_schema(_interactions(rating=[0, 1, 1, 0, 1]), feedback="explicit")
    assert forced.feedback == "explicit"


@pytest.mark.parametrize("name", ["item_id", "rating", "timestamp"])
def test_reserved_feature_names_are_rejected(name):
    items = pd.DataFrame({"item_id": [10, 11, 12], name if name != "item_id" else "x": [1, 2, 3]})
    if name == "item_id":
        with pytest.raises(ValueError, match="reserved"):
            Schema(item_features=[FeatureSpec("item_id", "categorical")])
    else:
        with pytest.raises(ValueError, match=f"reserved.*{name}|{name}.*reserved"):
            infer_schema(_interactions(), items=items)


def test_feature_names_must_be_unique_across_users_and_items():
    users = pd.DataFrame({"user_id": [1, 2, 3], "year": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"unique.*\['year'\]"):
        infer_schema(_interactions(), users, _items())


def test_feature_spec_validation():
    with pytest.raises(ValueError, match="'embedding'"):
        FeatureSpec("x", "embedding")
    with pytest.raises(ValueError, match="std"):
        FeatureSpec("x", "numeric", std=0.0)
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSpec("x", "categorical", vocabulary=["a", "a"])
    with pytest.raises(ValueError, match="'binary'"):
        Schema(feedback="binary")
    with pytest.raises(ValueError, match="rating_range"):
        Schema(rating_range=(5, 1))


def test_schema_config_round_trip_is_json():
    schema = Schema(
        user_features=[FeatureSpec("age", "numeric", mean=30.5, std=7.0),
                       FeatureSpec("gender", "categorical", vocabulary=["F", "M"])],
        item_features=[FeatureSpec("genres", "multi_hot", vocabulary=["a", "b"], separator="|")],
        feedback="explicit", rating_range=(0.5, 5.0))
    config = json.loads(json.dumps(schema.to_config()))
    assert Schema.from_config(config) == schema
    assert Schema.from_config(config).feature("genres").dim == 3


# --------------------------------------------------------------------------- InteractionData
def test_interaction_data_basics_and_no_mutation():
    inter, users, items = _interactions(), _users(), _items()
    inter["extra"] = "x"
    before = (inter.copy(), users.copy(), items.copy())
    data = InteractionData(inter, users, items)
    pd.testing.assert_frame_equal(inter, before[0])
    pd.testing.assert_frame_equal(users, before[1])
    pd.testing.assert_frame_equal(items, before[2])
    assert data.num_users == 3 and data.num_items == 3
    assert sorted(data.user_ids) == [1, 2, 3] and sorted(data.item_ids) == [10, 11, 12]
    assert data.feedback == "explicit" and data.has_timestamps
    assert list(data.interactions.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert data.users.index.name == "user_id" and list(data.users.columns) == ["age", "gender"]
    data.interactions.loc[0, "rating"] = 99  # the copy is ours: the caller's frame is unchanged
    assert inter.loc[0, "rating"] == 1.0


@pytest.mark.parametrize("column", ["user_id", "item_id", "rating"])
def test_missing_columns(column):
    with pytest.raises(ValueError, match=f"missing columns \\['{column}'\\]"):
        InteractionData(_interactions().drop(columns=column))


def test_empty_interactions():
    with pytest.raises(ValueError, match="empty"):
        InteractionData(_interactions().iloc[:0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_ratings(bad):
    with pytest.raises(ValueError, match=f"finite, got {bad!r} at row 2"):
        InteractionData(_interactions(rating=[1.0, 5.0, bad, 4.0, 2.0]))


def test_non_numeric_ratings_and_timestamps():
    with pytest.raises(ValueError, match="'good'"):
        InteractionData(_interactions(rating=[1, 2, "good", 3, 4]))
    with pytest.raises(ValueError, match="timestamp"):
        InteractionData(_interactions(timestamp=["a", "b", "c", "d", "e"]))
    data = InteractionData(_interactions(rating=["1", "5", "3", "4", "2"]))
    assert data.interactions["rating"].dtype == np.float64


def test_datetime_timestamps_become_integers_in_order():
    times = pd.to_datetime(["2020-01-05", "2020-01-06", "2020-01-01", "2020-01-02", "2020-01-09"])
    data = InteractionData(_interactions(timestamp=times))
    ts = data.interactions["timestamp"]
    assert pd.api.types.is_integer_dtype(ts) and list(np.argsort(ts.to_numpy())) == [2, 3, 0, 1, 4]


def test_ratings_outside_schema_range():
    schema = Schema(feedback="explicit", rating_range=(1, 5))
    with pytest.raises(ValueError, match=r"rating 6.0 is outside the rating range \[1.0, 5.0\] at row 1"):
        InteractionData(_interactions(rating=[1, 6, 3, 4, 2]), schema=schema)


def test_implicit_labels_must_be_binary():
    schema = Schema(feedback="implicit")
    with pytest.raises(ValueError, match="needs a 0 or 1 label, got 2.0 at row 3"):
        InteractionData(_interactions(rating=[0, 1, 1, 2, 0]), schema=schema)
    assert InteractionData(_interactions(rating=[0, 1, 1, 0, 0])).feedback == "implicit"


def test_duplicate_policies():
    inter = pd.concat([_interactions(), pd.DataFrame(
        {"user_id": [1], "item_id": [10], "rating": [3.0], "timestamp": [2]})], ignore_index=True)
    with pytest.raises(ValueError, match=r"repeated.*\(1, 10\)"):
        InteractionData(inter)
    # "last" means latest by timestamp: the row at t=5 (rating 1) beats the row at t=2.
    last = InteractionData(inter, duplicates="last").interactions
    row = last[(last.user_id == 1) & (last.item_id == 10)]
    assert len(last) == 5 and row.rating.tolist() == [1.0] and row.timestamp.tolist() == [5]
    mean = InteractionData(inter, duplicates="mean").interactions
    row = mean[(mean.user_id == 1) & (mean.item_id == 10)]
    assert len(mean) == 5 and row.rating.tolist() == [2.0] and row.timestamp.tolist() == [5]
    with pytest.raises(ValueError, match="'first'"):
        InteractionData(inter, duplicates="first")


def test_duplicate_mean_for_implicit_keeps_positive():
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 1, 1], "rating": [0, 1, 0]})
    data = InteractionData(inter, duplicates="mean")
    assert data.interactions.set_index("user_id").loc[1, "rating"] == 1.0


def test_ids_missing_from_feature_frames():
    users = _users().iloc[:2]  # user 3 has interactions but no feature row
    with pytest.raises(ValueError, match=r"1 user_id values .* missing from the user frame, e.g. \[3\]"):
        InteractionData(_interactions(), users, _items())
    data = InteractionData(_interactions(), users, _items(), missing_features="default")
    assert 3 in data.users.index and data.users.loc[3].isna().all()
    # An empty feature frame means "no features known": no error, everything OOV later.
    empty = InteractionData(_interactions(), _users().iloc[:0], _items())
    assert len(empty.users) == 0


def test_feature_frame_errors():
    with pytest.raises(ValueError, match="'user_id' column or index"):
        InteractionData(_interactions(), users=_users().rename(columns={"user_id": "uid"}))
    dup = pd.concat([_users(), _users().iloc[:1]])
    with pytest.raises(ValueError, match=r"duplicate user_id values, e.g. \[1\]"):
        InteractionData(_interactions(), users=dup)
    schema = Schema(user_features=[FeatureSpec("age", "numeric")], rating_range=(1, 5))
    with pytest.raises(ValueError, match=r"no user frame"):
        InteractionData(_interactions(), schema=schema)
    with pytest.raises(ValueError, match=r"lacks schema feature columns \['age'\]"):
        InteractionData(_interactions(), users=_users()[["user_id", "gender"]], schema=schema)


def test_missing_ids_in_interactions():
    with pytest.raises(ValueError, match="missing user_id"):
        InteractionData(_interactions(user_id=[1, None, 2, 2, 3]))
