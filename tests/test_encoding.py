"""FeatureEncoder: vocabularies, OOV handling, feature tables and serialisation."""

import io
import json

import numpy as np
import pandas as pd
import pytest

from metarec.encoding import FeatureEncoder
from metarec.interactions import InteractionData
from metarec.schema import FeatureSpec, Schema, infer_schema


def _data(item_ids=("b", "a", "c"), user_ids=(7, 3, 5)):
    inter = pd.DataFrame({
        "user_id": [user_ids[0], user_ids[0], user_ids[1], user_ids[2]],
        "item_id": [item_ids[0], item_ids[1], item_ids[0], item_ids[2]],
        "rating": [4.0, 2.0, 5.0, 1.0],
        "timestamp": [1, 2, 3, 4],
    })
    users = pd.DataFrame({
        "user_id": list(user_ids),
        "age": [20.0, 40.0, np.nan],
        "gender": ["M", "F", None],
        "occupation": [3, 3, 11],
    })
    items = pd.DataFrame({
        "item_id": list(item_ids) + ["d"] if isinstance(item_ids[0], str) else list(item_ids) + [99],
        "genres": ["x|y", "y", None, "z|unknown_later"],
        "year": [1990, 2000, 2010, 2020],
    })
    schema = infer_schema(inter, users, items, categorical=["occupation"], multi_hot=["genres"])
    return InteractionData(inter, users, items, schema=schema)


def test_item_and_user_indices_with_oov():
    enc = FeatureEncoder.fit(_data())
    # Ids are sorted; index 0 is the OOV row; items only in the item frame are included.
    assert enc.item_ids.tolist() == [None, "a", "b", "c", "d"]
    assert enc.num_items == 5 and enc.num_users == 4
    assert enc.user_ids.tolist() == [None, 3, 5, 7]
    idx = enc.item_index(["c", "nope", "a"])
    assert idx.dtype == np.int32 and idx.tolist() == [3, 0, 1]
    assert enc.item_index(np.array([["a", "b"], ["d", "zz"]])).tolist() == [[1, 2], [4, 0]]
    assert enc.user_index([7, 3, 1234, "7"]).tolist() == [3, 1, 0, 0]


def test_item_inputs_gather_feature_tables():
    enc = FeatureEncoder.fit(_data())
    genres = enc.feature_specs["genres"]
    assert genres.vocabulary == ("unknown_later", "x", "y", "z")
    inputs = enc.item_inputs(np.array([[2, 1], [0, 3]]))
    assert set(inputs) == {"item_id", "genres", "year"}
    assert inputs["item_id"].dtype == np.int32 and inputs["item_id"].tolist() == [[2, 1], [0, 3]]
    assert inputs["genres"].shape == (2, 2, 5) and inputs["genres"].dtype == np.float32
    # item "b" has x|y → columns 2 and 3; OOV row and item "c" (no genres) are all zero.
    assert inputs["genres"][0, 0].tolist() == [0, 0, 1, 1, 0]
    assert inputs["genres"][1, 0].sum() == 0 and inputs["genres"][1, 1].sum() == 0
    years = np.array([1990, 2000, 2010, 2020], dtype=np.float64)
    expected_b = (1990 - years.mean()) / years.std()
    assert inputs["year"].dtype == np.float32
    np.testing.assert_allclose(inputs["year"][0, 0], expected_b, rtol=1e-6)
    assert inputs["year"][1, 0] == 0.0  # OOV row sits at the mean
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        enc.item_inputs(np.array([5]))
    with pytest.raises(ValueError, match="integers"):
        enc.item_inputs(np.array([1.0]))


def test_user_inputs_from_index_and_features_agree():
    enc = FeatureEncoder.fit(_data())
    from_index = enc.user_inputs_from_index(enc.user_index([7, 3, 5]))
    raw = pd.DataFrame({"age": [20.0, 40.0, np.nan], "gender": ["M", "F", None],
                        "occupation": [3, 3, 11], "user_id": [7, 3, 5]})
    from_features = enc.user_inputs_from_features(raw)
    assert set(from_index) == {"age", "gender", "occupation"}
    for name in from_index:
        np.testing.assert_array_equal(from_index[name], from_features[name])
    np.testing.assert_allclose(from_index["age"], [-1.0, 1.0, 0.0])  # NaN → mean → 0
    assert from_index["gender"].tolist() == [2, 1, 0]  # vocabulary F, M; None → OOV
    # Occupation codes were ints; the float 3.0 (a column with a gap) means the same code.
    assert enc.user_inputs_from_features({"occupation": 3.0})["occupation"].tolist() == \
        from_index["occupation"][:1].tolist()


def test_cold_start_user_features_unknown_and_missing():
    enc = FeatureEncoder.fit(_data())
    one = enc.user_inputs_from_features({"gender": "X", "age": 30})
    assert one["gender"].tolist() == [0] and one["occupation"].tolist() == [0]
    np.testing.assert_allclose(one["age"], [0.0])  # 30 is the fitted mean of 20 and 40
    many = enc.user_inputs_from_features([{"gender": "F"}, {}])
    assert many["gender"].tolist() == [1, 0] and many["age"].shape == (2,)
    with pytest.raises(ValueError, match="'old'"):
        enc.user_inputs_from_features({"age": "old"})
    with pytest.raises(ValueError, match="str"):
        enc.user_inputs_from_features("gender=F")


def test_input_spec_matches_arrays():
    enc = FeatureEncoder.fit(_data())
    spec = enc.input_spec()
    assert spec == {"item_id": ((), "int32"), "age": ((), "float32"), "gender": ((), "int32"),
                    "occupation": ((), "int32"), "genres": ((5,), "float32"),
                    "year": ((), "float32")}
    arrays = {**enc.item_inputs(np.array([1, 2, 3])),
              **enc.user_inputs_from_index(np.array([1, 2, 3]))}
    for name, (suffix, dtype) in spec.items():
        assert arrays[name].shape == (3,) + suffix and arrays[name].dtype == np.dtype(dtype)
    assert enc.vocabulary_size("gender") == 3 and enc.vocabulary_size("item_id") == 5


def test_encode_interactions_validates():
    enc = FeatureEncoder.fit(_data())
    idx, y = enc.encode_interactions(pd.DataFrame({"item_id": ["a", "zz"], "rating": [3, 5]}))
    assert idx.tolist() == [1, 0] and y.dtype == np.float32 and y.tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="finite, got nan"):
        enc.encode_interactions(pd.DataFrame({"item_id": ["a"], "rating": [np.nan]}))
    with pytest.raises(ValueError, match=r"rating 7.0 is outside"):
        enc.encode_interactions(pd.DataFrame({"item_id": ["a"], "rating": [7]}))
    with pytest.raises(ValueError, match=r"lacks columns \['rating'\]"):
        enc.encode_interactions(pd.DataFrame({"item_id": ["a"]}))


def test_missing_feature_rows_default_to_oov():
    data = _data()
    users = data.users.iloc[:1].reset_index()  # only user 7 has features
    inter = data.interactions
    partial = InteractionData(inter, users, data.items.reset_index(), schema=data.schema,
                              missing_features="default")
    enc = FeatureEncoder.fit(partial)
    inputs = enc.user_inputs_from_index(enc.user_index([3, 5]))
    assert inputs["gender"].tolist() == [0, 0] and inputs["age"].tolist() == [0.0, 0.0]


def test_declared_vocabulary_is_kept():
    data = _data()
    schema = data.schema.replace(user_features=(
        FeatureSpec("age", "numeric"), FeatureSpec("gender", "categorical", vocabulary=["M", "F", "N"]),
        FeatureSpec("occupation", "categorical")))
    enc = FeatureEncoder.fit(InteractionData(data.interactions, data.users, data.items, schema=schema))
    assert enc.feature_specs["gender"].vocabulary == ("M", "F", "N")
    assert enc.user_inputs_from_features({"gender": "F"})["gender"].tolist() == [2]


@pytest.mark.parametrize("ids", [("b", "a", "c"), (30, 10, 20)])
def test_round_trip_reproduces_inputs_and_id_types(ids):
    enc = FeatureEncoder.fit(_data(item_ids=ids))
    config = json.loads(json.dumps(enc.get_config()))
    buffer = io.BytesIO()
    np.savez(buffer, **enc.to_arrays())  # the arrays must survive a plain, pickle-free npz
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        restored = FeatureEncoder.from_config(config, dict(npz))
    assert restored.item_ids.tolist() == enc.item_ids.tolist()
    assert type(restored.item_ids[1]) is type(enc.item_ids[1])
    assert type(restored.user_ids[1]) is int
    idx = np.arange(enc.num_items).reshape(1, -1)
    for name, array in enc.item_inputs(idx).items():
        np.testing.assert_array_equal(restored.item_inputs(idx)[name], array)
    uidx = np.arange(enc.num_users)
    for name, array in enc.user_inputs_from_index(uidx).items():
        np.testing.assert_array_equal(restored.user_inputs_from_index(uidx)[name], array)
    request = {"gender": "F", "age": 55, "occupation": 11}
    for name, array in enc.user_inputs_from_features(request).items():
        np.testing.assert_array_equal(restored.user_inputs_from_features(request)[name], array)
    assert restored.item_index(list(ids)).tolist() == enc.item_index(list(ids)).tolist()
    assert restored.input_spec() == enc.input_spec()
    assert restored.schema == enc.schema


def test_fit_rejects_non_interaction_data():
    with pytest.raises(ValueError, match="DataFrame"):
        FeatureEncoder.fit(pd.DataFrame())
    with pytest.raises(ValueError, match="version 99"):
        FeatureEncoder.from_config({"version": 99}, {})


def test_no_features_schema():
    inter = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": [1, 2], "rating": [0, 1]})
    enc = FeatureEncoder.fit(InteractionData(inter))
    assert enc.feedback == "implicit"
    assert enc.input_spec() == {"item_id": ((), "int32")}
    assert enc.user_inputs_from_index(np.array([1, 2])) == {}
    assert enc.user_index(["u2"]).tolist() == [2]
    assert Schema.from_config(enc.schema.to_config()) == enc.schema


def test_mixed_ids_are_keyed_by_canonical_strings():
    inter = pd.DataFrame({"user_id": [1, 2, 2], "item_id": ["a", 3, 4.0], "rating": [1, 2, 3]})
    enc = FeatureEncoder.fit(InteractionData(inter))
    assert enc.item_ids.tolist() == [None, "3", "4", "a"]
    assert enc.item_index([3, "3", 3.0, 4, "a", 5]).tolist() == [1, 1, 1, 2, 3, 0]
    restored = FeatureEncoder.from_config(enc.get_config(), enc.to_arrays())
    assert restored.item_index([4.0, "a"]).tolist() == [2, 3]


@pytest.mark.parametrize("ids", [
    np.arange(1, 501),                               # compact: one gather through a dense table
    np.array([0, 5, 9, 70_000]),                     # compact enough for the table too
    np.array([3, 10**9, 10**12]),                    # sparse: a binary search
    np.array([-4, -1, 2, 8]),                        # negative ids: a binary search
])
def test_int_id_lookup_matches_a_dictionary(ids):
    """Every int lookup path gives the index of each known id and 0 for the rest, for any int
    dtype and shape, including ids outside the table's range."""
    from metarec.encoding import _IdVocabulary

    vocab = _IdVocabulary(np.sort(ids).astype(np.int64), "int")
    expected = {int(v): i + 1 for i, v in enumerate(np.sort(ids))}
    rng = np.random.default_rng(0)
    queries = np.concatenate([ids, ids + 1, ids - 1, [-(10**13), 10**13],
                              rng.integers(-10, int(ids.max()) + 10, 300)])
    for dtype in (np.int64, np.int32, np.uint32, np.uint64):
        q = queries[(queries >= np.iinfo(dtype).min) & (queries <= np.iinfo(dtype).max)].astype(dtype)
        got = vocab.lookup(q.reshape(-1, 1) if dtype == np.int64 else q)
        assert got.dtype == np.int32 and got.shape == ((len(q), 1) if dtype == np.int64 else (len(q),))
        np.testing.assert_array_equal(got.ravel(), [expected.get(int(v), 0) for v in q])
