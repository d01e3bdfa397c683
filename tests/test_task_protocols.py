"""Protocols a user can express: given user splits, given support / query sets, variable
support sizes, the users a filter drops, and the item prior of the residual presets."""

import re
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.datasets import synthetic
from metarec.tasks import UserTasks


@pytest.fixture(scope="module")
def data():
    """200 users of 5 to 40 interactions: the default filter drops some."""
    return synthetic(num_users=200, interactions_per_user=(5, 40), seed=3)


def _quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return UserTasks(*args, **kwargs)


def _sets(tasks):
    return {name: getattr(tasks, name) for name in ("train", "val", "test")}


def _checksum(tset):
    if not len(tset):
        return 0
    items = np.concatenate([tset.support_frame(i).item_id.to_numpy() for i in range(len(tset))])
    return zlib.crc32(items.astype(np.int64).tobytes())


# --------------------------------------------------------------------------- defaults unchanged
def test_default_user_tasks_keep_their_users_and_splits(data):
    # Reference values of UserTasks(data) before given splits and dropped-user reports existed.
    with pytest.warns(UserWarning, match="dropped 26 of 200 users: 26 with fewer than min_interactions=11"):
        tasks = UserTasks(data)
    expected = {"train": (124, [1, 2, 3, 4], 1240, 1926, 2225407568),
                "val": (16, [141, 142, 143, 144], 160, 260, 1563498444),
                "test": (34, [161, 162, 163, 164], 340, 504, 686898310)}
    for name, tset in _sets(tasks).items():
        n = len(tset)
        got = (n, tset.user_ids[:4].tolist(), int(tset.support_sizes.sum()), int(tset.query_sizes.sum()),
               _checksum(tset))
        assert got == expected[name], name
    assert tasks.split == "time" and tasks.user_split == "time" and tasks.support_size == 10


def test_no_warning_when_no_user_is_dropped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks = UserTasks(synthetic(seed=0))
    assert len(tasks.dropped_users) == 0 and list(tasks.dropped_users.columns) == ["user_id", "set", "reason"]
    assert "dropped no users" in tasks.summary() and "dropped=0" in repr(tasks)


# --------------------------------------------------------------------------- given user split
def test_given_user_split_reproduces_the_rule_and_keeps_the_given_order(data):
    rule = _quiet(data, support_size=5, min_interactions=1)
    given = UserTasks(data, support_size=5, min_interactions=1, encoder=rule.encoder,
                      user_split={name: s.user_ids for name, s in _sets(rule).items()})
    assert given.user_split == "given"
    for name, tset in _sets(given).items():
        other = getattr(rule, name)
        assert tset.user_ids.tolist() == other.user_ids.tolist()
        assert all(tset.support_frame(i).equals(other.support_frame(i)) for i in range(len(tset)))
        assert all(tset.query_frame(i).equals(other.query_frame(i)) for i in range(len(tset)))
    # Sets keep the order given; a missing set is empty.
    tasks = _quiet(data, support_size=5, min_interactions=1, user_split={"train": [7, 3, 150], "test": [4]})
    assert tasks.train.user_ids.tolist() == [7, 3, 150] and tasks.test.user_ids.tolist() == [4]
    assert len(tasks.val) == 0


def test_users_in_no_set_of_a_given_split_are_reported(data):
    with pytest.warns(UserWarning, match="dropped 197 of 200 users: 197 in no set of user_split"):
        tasks = UserTasks(data, support_size=5, min_interactions=1, user_split={"train": [1, 2], "val": [3]})
    dropped = tasks.dropped_users
    assert len(dropped) == 197 and set(dropped.user_id) == set(range(4, 201))
    assert dropped["set"].isna().all()


@pytest.mark.parametrize("user_split, message", [
    ({"train": [1, 2, 999, "x"]}, r"user_split\['train'\] names 2 users that are not in the data; got \[999, 'x'\]\."),
    ({"train": list(range(1000, 1010))}, r"got \[1000, 1001, 1002, 1003, 1004, \.\.\.\] \(10 in all\)\."),
    ({"train": [1, 2], "test": [2, 3]}, r"sets overlap: users in 'train' and 'test'; got \[2\]\."),
    ({"val": [5, 6, 5]}, r"user_split\['val'\] names users twice; got \[5\]\."),
    ({"training": [1]}, r"among \('train', 'val', 'test'\); got \['training'\]\."),
    ({"train": "12"}, r"collection of user ids; got '12'\."),
    (["train"], r"mapping of set name to user ids; got \['train'\]\."),
    ("by-arrival", r"got 'by-arrival'\."),
])
def test_bad_given_user_split(data, user_split, message):
    with pytest.raises(ValueError, match=message):
        UserTasks(data, user_split=user_split)


# --------------------------------------------------------------------------- given support sets
def _first_rows(data, sizes):
    """The first ``sizes[user]`` interactions (by time) of each user, as (user_id, item_id) rows."""
    frame = data.interactions.sort_values(["user_id", "timestamp", "item_id"])
    rank = frame.groupby("user_id").cumcount()
    return frame[rank < frame.user_id.map(sizes)][["user_id", "item_id"]]


def test_given_support_sets_of_varying_size(data):
    rng = np.random.default_rng(0)
    sizes = {u: int(rng.integers(0, 13)) for u in data.interactions.user_id.unique()}
    support = _first_rows(data, sizes).sample(frac=1.0, random_state=1)  # row order is irrelevant
    tasks = _quiet(data, support=support, user_split="random")
    assert tasks.split == "given" and tasks.support_size == max(sizes.values())
    by_user = data.interactions.sort_values(["timestamp", "item_id"]).groupby("user_id")
    for tset in _sets(tasks).values():
        for i, user in enumerate(tset.user_ids):
            rows = by_user.get_group(user)
            assert tset.support_frame(i).item_id.tolist() == rows.item_id.tolist()[:sizes[user]]
            assert tset.query_frame(i).item_id.tolist() == rows.item_id.tolist()[sizes[user]:]
        np.testing.assert_array_equal(tset.support_sizes, [sizes[u] for u in tset.user_ids])
    # Episodes pad every support to support_size and mask exactly the given rows.
    ep = tasks.train.episode_for(np.arange(len(tasks.train)))
    assert ep.support_y.shape == (len(tasks.train), tasks.support_size)
    np.testing.assert_array_equal(ep.support_mask.sum(axis=1), tasks.train.support_sizes)
    np.testing.assert_array_equal(ep.query_mask.sum(axis=1), tasks.train.query_sizes)
    first = tasks.train.support_frame(0)
    np.testing.assert_array_equal(ep.support_y[0, :len(first)], first.rating.to_numpy(np.float32))
    # resample=True (what fit asks for) keeps a given split as it is.
    again = tasks.train.episode_for(np.arange(len(tasks.train)), seed=3, resample=True)
    np.testing.assert_array_equal(again.support["item_id"], ep.support["item_id"])
    # Empty supports are kept (and counted); summary shows the range of sizes.
    empty = int((tasks.train.support_sizes == 0).sum())
    assert empty and f"{empty} with an empty support" in tasks.summary()
    assert not ep.support_mask[tasks.train.support_sizes == 0].any()


def test_support_as_a_boolean_mask_and_given_query(data):
    sizes = {u: 3 for u in data.interactions.user_id.unique()}
    pairs = _first_rows(data, sizes)
    mask = data.interactions.index.isin(pairs.index)
    by_frame = _quiet(data, support=pairs)
    by_mask = _quiet(data, support=mask, encoder=by_frame.encoder)
    for name, tset in _sets(by_mask).items():
        other = getattr(by_frame, name)
        assert tset.user_ids.tolist() == other.user_ids.tolist()
        assert all(tset.support_frame(i).equals(other.support_frame(i)) for i in range(len(tset)))
    assert by_mask.support_size == 3 and (by_mask.train.support_sizes == 3).all()
    # support_size above the largest support pads further; query_size caps the query.
    wide = _quiet(data, support=pairs, support_size=8, query_size=4, encoder=by_frame.encoder)
    assert wide.train.episode_for([0]).support_y.shape == (1, 8)
    assert (wide.train.query_sizes <= 4).all()
    # A given query: interactions in neither set are unused.
    rest = data.interactions.drop(index=pairs.index)
    query = rest.groupby("user_id").head(2)[["user_id", "item_id"]]
    tasks = _quiet(data, support=pairs, query=query, encoder=by_frame.encoder)
    assert (tasks.test.query_sizes == 2).all() and (tasks.test.support_sizes == 3).all()
    user = tasks.test.user_ids[0]
    assert tasks.test.query_frame(0).item_id.tolist() == \
        sorted(query[query.user_id == user].item_id, key=lambda i: (
            data.interactions.set_index(["user_id", "item_id"]).loc[(user, i), "timestamp"], i))


def test_users_without_a_query_are_dropped(data):
    counts = data.interactions.user_id.value_counts()
    everything = data.interactions[data.interactions.user_id == counts.index[0]][["user_id", "item_id"]]
    support = pd.concat([everything, _first_rows(data, {u: 2 for u in counts.index[1:]})])
    with pytest.warns(UserWarning, match="dropped 1 of 200 users: 1 with no query interactions"):
        tasks = UserTasks(data, support=support)
    assert tasks.dropped_users.to_dict("records")[0]["user_id"] == counts.index[0]
    assert tasks.dropped_users.reason.tolist() == ["with no query interactions"]


def test_bad_given_support(data):
    support = _first_rows(data, {u: 4 for u in data.interactions.user_id.unique()})
    with pytest.raises(ValueError, match=r"2 \(user_id, item_id\) rows that are not interactions of "
                                         r"the data; got \[\(1, -5\), \(999, 1\)\]\."):
        UserTasks(data, support=pd.DataFrame({"user_id": [1, 999], "item_id": [-5, 1]}))
    with pytest.raises(ValueError, match=r"'user_id' and 'item_id' columns; got columns \['user', 'item'\]\."):
        UserTasks(data, support=pd.DataFrame({"user": [1], "item": [1]}))
    with pytest.raises(ValueError, match=r"boolean mask of the \d+ interaction rows; got int64 of shape \(3,\)\."):
        UserTasks(data, support=np.array([1, 0, 1]))
    with pytest.raises(ValueError, match=r"support_size=2 is smaller than the given support of user 1; got 4 rows"):
        UserTasks(data, support=support, support_size=2)
    with pytest.raises(ValueError, match=r"alternatives.*; got split='random'\."):
        UserTasks(data, support=support, split="random")
    with pytest.raises(ValueError, match=r"query= needs support=.*; got query alone\."):
        UserTasks(data, query=support)
    with pytest.raises(ValueError, match=r"support and query share 800 interactions; got \[\(1, "):
        UserTasks(data, support=support, query=support)
    with pytest.raises(ValueError, match=r"query must be a DataFrame .*; got ndarray\."):
        UserTasks(data, support=support, query=np.ones(len(data.interactions), bool))


def test_given_support_needs_no_timestamps():
    data = synthetic(num_users=30, seed=1)
    frame = data.interactions.drop(columns="timestamp")
    plain = metarec.InteractionData(frame, data.users, data.items)
    support = frame.groupby("user_id").head(5)
    tasks = UserTasks(plain, support=support, user_split="random")
    assert (tasks.train.support_sizes == 5).all()
    with pytest.raises(ValueError, match="timestamp"):
        UserTasks(plain, support=support)  # user_split="time" still needs them


# --------------------------------------------------------------------------- dropped users
def test_every_filter_reports_its_users_once(data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks = UserTasks(data, support_size=5, max_interactions=35, eval_min_interactions=20)
    ours = [w for w in caught if "UserTasks dropped" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is UserWarning
    assert ours[0].filename == __file__  # points at the caller
    dropped = tasks.dropped_users
    counts = data.interactions.user_id.value_counts()
    kept = set().union(*(set(s.user_ids) for s in _sets(tasks).values()))
    assert set(dropped.user_id) == set(counts.index) - kept and not set(dropped.user_id) & kept
    reasons = dict(zip(dropped.user_id, dropped.reason))
    assert dropped.reason.nunique() == 3
    for user, reason in reasons.items():
        n = counts[user]
        if "min_interactions=6" in reason:
            assert n < 6
        elif "eval_min_interactions=20" in reason:
            assert 6 <= n < 20 and dropped.set[dropped.user_id == user].item() in ("val", "test")
        else:
            assert reason == "with more than max_interactions=35 interactions" and n > 35
    message = str(ours[0].message)
    for reason, n in dropped.reason.value_counts().items():
        assert f"{n} {reason}" in message and f"{n:>6} {reason}" in tasks.summary()
    assert f"dropped={len(dropped)}" in repr(tasks)


# --------------------------------------------------------------------------- learners
def test_meta_learning_with_given_variable_supports():
    import keras

    data = synthetic(seed=0)
    rng = np.random.default_rng(0)
    sizes = {u: int(rng.integers(0, 16)) for u in data.interactions.user_id.unique()}
    users = np.array(sorted(sizes))
    tasks = _quiet(data, support=_first_rows(data, sizes),
                   user_split={"train": users[:300], "val": users[300:340], "test": users[340:400]})
    assert tasks.support_size == 15 and len(tasks.dropped_users) == 200
    keras.utils.set_random_seed(0)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,)),
                           inner_steps=1, inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = learner.fit(tasks.train, validation_data=tasks.val, epochs=1, batch_size=64, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["val_loss"][0])
    metrics = learner.evaluate(tasks.test, batch_size=64, verbose=0)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["loss_before"])
    test = tasks.test
    supports = [test.support_frame(i) for i in range(len(test))]
    features = [test.user_features(i) for i in range(len(test))]
    assert {len(s) for s in supports} >= {0, 15}
    adapted = learner.adapt_many(supports, features)
    scores = [user.score(test.query_frame(i).item_id.to_numpy()) for i, user in enumerate(adapted)]
    assert all(len(s) == len(test.query_frame(i)) and np.isfinite(s).all() for i, s in enumerate(scores))


# --------------------------------------------------------------------------- item prior
def test_item_mean_prior_matches_the_item_mean_baseline(synthetic_tasks):
    from metarec.evaluation.methods import ItemMean
    from metarec.evaluation.neural import item_mean_prior as evaluation_prior

    tasks = synthetic_tasks
    prior = metarec.priors.item_mean_prior(tasks)
    assert prior.dtype == np.float32 and prior.shape == (tasks.encoder.num_items,)
    baseline = ItemMean().fit(tasks.train, tasks.val)
    ids = np.asarray(tasks.encoder.item_ids[1:].tolist())
    np.testing.assert_allclose(prior[1:], baseline._item_predictions(ids, baseline.params["damping"]), rtol=1e-6)
    assert prior[0] == np.float32(tasks.train.frame().rating.mean())
    np.testing.assert_array_equal(evaluation_prior(tasks.encoder, tasks.train, tasks.val), prior)
    # A fixed damping; a TaskSet alone (no validation users: damping 5); every rating of the data.
    fixed = metarec.priors.item_mean_prior(tasks, damping=5.0)
    np.testing.assert_array_equal(metarec.priors.item_mean_prior(tasks.train), fixed)
    np.testing.assert_allclose(metarec.priors.item_mean_prior(tasks, damping=0)[1:],
                               ItemMean(damping=0, damping_grid=None).fit(tasks.train)._item_predictions(ids, 0.0))
    whole = metarec.priors.item_mean_prior(tasks.data, encoder=tasks.encoder, damping=1.0)
    assert whole.shape == prior.shape and not np.allclose(whole, fixed)


def test_item_mean_prior_bad_inputs(synthetic_tasks):
    build = metarec.priors.item_mean_prior
    with pytest.raises(ValueError, match=r"needs a UserTasks, TaskSet or InteractionData; got DataFrame\."):
        build(synthetic_tasks.data.interactions)
    with pytest.raises(ValueError, match=r"needs encoder=.*; got None\."):
        build(synthetic_tasks.data)
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0; got -1\."):
        build(synthetic_tasks, damping=-1)
    with pytest.raises(ValueError, match=r"val must be a TaskSet; got list\."):
        build(synthetic_tasks.train, val=[])
    with pytest.raises(ValueError, match=r"needs training ratings"):
        build(_quiet(synthetic_tasks.data, eval_min_interactions=10_000).test, damping=1.0)


def test_readme_preset_snippet_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    bullet = readme[readme.index("* **Presets**"):]
    block = re.search(r"```python\n(.*?)```", bullet, re.S).group(1)
    code = textwrap.dedent(block)
    assert "metarec.priors.item_mean_prior(tasks)" in code and "presets.residual_maml(" in code
    import keras

    keras.utils.set_random_seed(0)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["learner"], metarec.MAML)
    assert namespace["prior"].shape == (namespace["tasks"].encoder.num_items,)
