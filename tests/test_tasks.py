"""UserTasks / TaskSet / Episode: splits, leakage, padding and bucketing."""

import numpy as np
import pandas as pd
import pytest

from metarec.datasets import synthetic
from metarec.interactions import InteractionData
from metarec.tasks import Episode, UserTasks, query_bucket


def _small_data(with_time=True):
    """10 users; user u has 12 + u interactions; user u arrives at time 100 * (10 - u)."""
    rows = []
    for u in range(10):
        start = 100 * (10 - u)  # user 9 arrives first, user 0 last
        for j in range(12 + u):
            # Two interactions share each timestamp, so the (timestamp, item_id) tie-break matters;
            # item ids descend within a timestamp pair to make the tie-break visible.
            rows.append({"user_id": u, "item_id": 1000 - (j ^ 1), "rating": float(1 + (u + j) % 5),
                         "timestamp": start + j // 2})
    frame = pd.DataFrame(rows)
    if not with_time:
        frame = frame.drop(columns="timestamp")
    users = pd.DataFrame({"user_id": range(10), "age": np.arange(10) * 5.0 + 20})
    return InteractionData(frame, users)


def test_query_bucket():
    assert [query_bucket(n) for n in (0, 1, 8, 9, 16, 17, 600, 1024, 1025, 3000)] == \
        [8, 8, 8, 16, 16, 32, 1024, 1024, 2048, 3072]
    with pytest.raises(ValueError, match="-1"):
        query_bucket(-1)


def test_time_user_split_orders_by_first_interaction_with_id_ties():
    frame = pd.DataFrame({
        "user_id": ["c", "c", "a", "a", "b", "b", "d", "d"],
        "item_id": [1, 2, 1, 2, 1, 2, 1, 2],
        "rating": [1, 2, 3, 4, 5, 1, 2, 3],
        "timestamp": [5, 6, 5, 9, 1, 2, 7, 8],  # b first; a and c tie at 5 → a before c; d last
    })
    tasks = UserTasks(InteractionData(frame), support_size=1, fractions=(0.5, 0.25, 0.25))
    assert tasks.train.user_ids.tolist() == ["b", "a"]
    assert tasks.val.user_ids.tolist() == ["c"] and tasks.test.user_ids.tolist() == ["d"]


def test_q1_split_no_leakage_and_time_ordered_support():
    data = _small_data()
    tasks = UserTasks(data, support_size=4, fractions=(0.7, 0.1, 0.2))
    # Users arrive in order 9, 8, ..., 0: the first 7 train, then 1 val, then 2 test.
    assert tasks.train.user_ids.tolist() == [9, 8, 7, 6, 5, 4, 3]
    assert tasks.val.user_ids.tolist() == [2] and tasks.test.user_ids.tolist() == [1, 0]
    held_out = set(tasks.val.user_ids) | set(tasks.test.user_ids)
    train_rows = tasks.train.frame()
    assert not held_out & set(train_rows.user_id)
    assert len(train_rows) == sum(12 + u for u in range(3, 10))  # all their ratings, nothing more
    # Every rating a training episode carries belongs to a training user.
    train_user_rows = set(map(tuple, train_rows[["user_id", "item_id"]].to_numpy()))
    enc = tasks.encoder
    seen = 0
    for ep in tasks.train.episodes(batch_size=3):
        for part, mask in ((ep.support, ep.support_mask), (ep.query, ep.query_mask)):
            ages = part["age"][mask > 0]
            items = enc.item_ids[part["item_id"][mask > 0]]
            users = [int(round((a * data.users.age.std(ddof=0) + data.users.age.mean() - 20) / 5))
                     for a in ages]
            assert set(zip(users, items)) <= train_user_rows
            seen += int(mask.sum())
    assert seen == len(train_rows)
    # Support = the first K by (timestamp, item_id); the query is the rest, in the same order.
    for tset in (tasks.train, tasks.test):
        for i, user in enumerate(tset.user_ids):
            rows = data.interactions[data.interactions.user_id == user]
            ordered = rows.sort_values(["timestamp", "item_id"])
            assert tset.support_frame(i).item_id.tolist() == ordered.item_id.tolist()[:4]
            assert tset.query_frame(i).item_id.tolist() == ordered.item_id.tolist()[4:]
    first = tasks.test.support_frame(0)
    assert first.timestamp.tolist() == [900, 900, 901, 901]  # user 1 arrives at 900
    assert first.item_id.tolist() == [999, 1000, 997, 998]


def test_episode_contents_and_padding():
    data = _small_data()
    tasks = UserTasks(data, support_size=4, min_interactions=1)
    ep = tasks.train.episode_for([1, 0], batch_size=4)
    assert isinstance(ep, Episode)
    assert ep.support_y.shape == (4, 4) and ep.support_y.dtype == np.float32
    assert ep.query_y.shape == (4, 32)  # longest query: user 9 has 21 - 4 = 17 → bucket 32
    assert ep.query_mask.dtype == np.float32
    assert ep.query_mask.sum(axis=1).tolist() == [12 + 8 - 4, 12 + 9 - 4, 0, 0]
    assert ep.support_mask.sum(axis=1).tolist() == [4, 4, 0, 0]
    # Labels and item ids follow the raw rows; padding has label 0 and the OOV item.
    frame = tasks.train.query_frame(1)
    n = len(frame)
    np.testing.assert_array_equal(ep.query_y[0, :n], frame.rating.to_numpy(np.float32))
    np.testing.assert_array_equal(ep.query["item_id"][0, :n], tasks.encoder.item_index(frame.item_id))
    assert not ep.query_y[0, n:].any() and not ep.query["item_id"][0, n:].any()
    assert ep.query_mask[0, :n].all() and not ep.query_mask[0, n:].any()
    # The user's own features repeat over every interaction, padded rows included.
    user_age = tasks.encoder.user_inputs_from_index(tasks.encoder.user_index([8]))["age"][0]
    assert ep.query["age"].shape == (4, 32)
    np.testing.assert_array_equal(ep.query["age"][0], np.full(32, user_age, np.float32))
    assert set(ep.support) == set(ep.query) == set(tasks.encoder.input_spec())
    for name, (suffix, dtype) in tasks.encoder.input_spec().items():
        assert ep.support[name].shape == (4, 4) + suffix and ep.support[name].dtype == dtype
    with pytest.raises(ValueError, match="do not fit batch_size=1"):
        tasks.train.episode_for([0, 1], batch_size=1)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        tasks.train.episode_for([7])


def test_short_users_get_masked_support():
    data = _small_data()
    tasks = UserTasks(data, support_size=15, min_interactions=1, fractions=(1.0, 0.0, 0.0))
    ep = tasks.train.episode_for(np.arange(len(tasks.train)))
    counts = tasks.train.num_interactions
    assert (ep.support_mask.sum(axis=1) == np.minimum(counts, 15)).all()
    assert (ep.query_mask.sum(axis=1) == np.maximum(counts - 15, 0)).all()
    short = int(np.argmin(counts))  # user 0 has 12 interactions: 3 padded support slots
    assert ep.support_mask[short].tolist() == [1] * 12 + [0] * 3


def test_episodes_have_constant_shapes_and_cover_users_once():
    data = synthetic(num_users=50, num_items=60, interactions_per_user=(12, 30), seed=3)
    tasks = UserTasks(data, support_size=5, max_interactions=25)
    tset = tasks.train
    assert tset.num_batches(8) == -(-len(tset) // 8)
    episodes = list(tset.episodes(batch_size=8, shuffle=True, seed=1))
    assert len(episodes) == tset.num_batches(8)
    assert {ep.support_y.shape for ep in episodes} == {(8, 5)}
    assert {ep.query_y.shape for ep in episodes} <= {(8, 16), (8, 32)}
    users_seen = sum(int((ep.support_mask.sum(axis=1) > 0).sum()) for ep in episodes)
    assert users_seen == len(tset)
    assert (tset.num_interactions <= 25).all() and (tset.num_interactions >= 6).all()
    # The same seed gives the same batches; another seed another order.
    again = list(tset.episodes(batch_size=8, shuffle=True, seed=1))
    np.testing.assert_array_equal(again[0].support["item_id"], episodes[0].support["item_id"])
    other = list(tset.episodes(batch_size=8, shuffle=True, seed=2))
    assert not np.array_equal(other[0].support["item_id"], episodes[0].support["item_id"])


def test_max_query_subsamples_with_seed():
    data = synthetic(num_users=20, num_items=100, interactions_per_user=(40, 60), seed=1)
    tset = UserTasks(data, support_size=5, fractions=(1.0, 0.0, 0.0)).train
    ep = tset.episode_for([0, 1], max_query=10, seed=4)
    assert ep.query_y.shape == (2, 16) and ep.query_mask.sum(axis=1).tolist() == [10, 10]
    full = set(tset.encoder.item_index(tset.query_frame(0).item_id).tolist())
    assert set(ep.query["item_id"][0, :10].tolist()) <= full
    same = tset.episode_for([0, 1], max_query=10, seed=4)
    np.testing.assert_array_equal(same.query["item_id"], ep.query["item_id"])


def test_random_split_seeded_and_resample():
    data = _small_data(with_time=False)
    with pytest.raises(ValueError, match="timestamp"):
        UserTasks(data, support_size=4)
    a = UserTasks(data, support_size=4, split="random", user_split="random", seed=5)
    b = UserTasks(data, support_size=4, split="random", user_split="random", seed=5)
    c = UserTasks(data, support_size=4, split="random", user_split="random", seed=6)
    assert a.train.user_ids.tolist() == b.train.user_ids.tolist()
    assert a.train.support_frame(0).equals(b.train.support_frame(0))
    assert sorted(a.train.user_ids.tolist() + a.val.user_ids.tolist() + a.test.user_ids.tolist()) == \
        list(range(10))
    assert a.train.user_ids.tolist() != c.train.user_ids.tolist()
    # Fixed split without resample; a fresh partition of the same rows with resample.
    fixed = [a.train.episode_for([0], seed=s).support["item_id"][0].tolist() for s in range(3)]
    assert fixed[0] == fixed[1] == fixed[2]
    drawn = [a.train.episode_for([0], seed=s, resample=True) for s in range(4)]
    supports = [tuple(ep.support["item_id"][0]) for ep in drawn]
    assert len(set(supports)) > 1
    all_items = set(a.encoder.item_index(
        pd.concat([a.train.support_frame(0), a.train.query_frame(0)]).item_id).tolist())
    for ep in drawn:
        s = ep.support["item_id"][0][ep.support_mask[0] > 0].tolist()
        q = ep.query["item_id"][0][ep.query_mask[0] > 0].tolist()
        assert not set(s) & set(q) and set(s) | set(q) == all_items


def test_query_size_and_eval_min_interactions():
    data = _small_data()
    with pytest.warns(UserWarning, match="dropped 1 of 10 users: 1 with fewer than eval_min_interactions=13"):
        tasks = UserTasks(data, support_size=4, query_size=5, eval_min_interactions=13)
    assert [len(tasks.train.query_frame(i)) for i in range(len(tasks.train))] == [5] * 7
    # Test users are 1 (13 interactions) and 0 (12): only user 1 passes the evaluation floor.
    assert tasks.test.user_ids.tolist() == [1]
    assert tasks.dropped_users.to_dict("records") == [
        {"user_id": 0, "set": "test", "reason": "with fewer than eval_min_interactions=13 interactions"}]
    assert tasks.train.query_frame(0).item_id.tolist() == \
        tasks.train.frame()[lambda f: f.user_id == 9].item_id.tolist()[4:9]


def test_empty_task_set_yields_nothing():
    with pytest.warns(UserWarning, match="dropped 3 of 10 users"):
        tasks = UserTasks(_small_data(), support_size=4, eval_min_interactions=1000)
    assert tasks.dropped_users.user_id.tolist() == [2, 1, 0]
    assert len(tasks.test) == 0 and tasks.test.num_batches(4) == 0
    assert list(tasks.test.episodes(4)) == [] and len(tasks.test.frame()) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"support_size": 0}, "support_size must be a positive integer, got 0"),
    ({"split": "chrono"}, "'chrono'"),
    ({"user_split": "x"}, "'x'"),
    ({"fractions": (0.5, 0.5, 0.5)}, r"\(0.5, 0.5, 0.5\)"),
    ({"query_size": -2}, "-2"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UserTasks(_small_data(), **kwargs)
    with pytest.raises(ValueError, match="InteractionData"):
        UserTasks(pd.DataFrame())


def test_given_encoder_is_used():
    data = _small_data()
    first = UserTasks(data, support_size=4)
    second = UserTasks(data, support_size=4, encoder=first.encoder)
    assert second.encoder is first.encoder and second.train.encoder is first.encoder
