"""``adapt`` as a predicate on variable paths and as a list of path regexes: which weights
adapt, that only those change, and that a saved learner keeps the same selection."""

import keras
import numpy as np
import pytest

import metarec


@pytest.fixture(scope="module")
def setup():
    data = metarec.datasets.synthetic(num_users=120, num_items=150, seed=2)
    tasks = metarec.UserTasks(data, support_size=10)
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8, 8))
    support = tasks.test.support_frame(0)[["item_id", "rating"]]
    features = data.users.loc[tasks.test.user_ids[0]].to_dict()
    return data, tasks, model, support, features


def paths_of(model, index):
    return [model.trainable_variables[i].path for i in index]


SELECTIONS = {
    "predicate": (lambda path: "decision_output" in path, "decision_output"),
    "regexes": ([r"decision_2"], "decision_2"),
}


def make(model, tasks, adapt):
    return metarec.MAML(model, inner_steps=3, inner_lr=0.2, adapt=adapt, feedback="explicit",
                        encoder=tasks.encoder)


@pytest.mark.parametrize("kind", sorted(SELECTIONS))
def test_selection_adapts_exactly_those_weights(setup, kind):
    data, tasks, model, support, features = setup
    adapt, layer = SELECTIONS[kind]
    learner = make(model, tasks, adapt)
    selected = paths_of(model, learner.forward.adapt_index)
    # The layer's kernel and bias, and nothing else.
    assert sorted(p.rsplit("/", 1)[-1] for p in selected) == ["bias", "kernel"]
    assert all(p.rsplit("/", 1)[0].endswith(layer) for p in selected)
    assert len(learner.forward.adapt_index) + len(learner.forward.fixed_index) == len(model.trainable_variables)
    assert not set(learner.forward.fixed_index) & set(learner.forward.adapt_index)

    user = learner.adapt(support, features)
    initial = [keras.ops.convert_to_numpy(model.trainable_variables[i]) for i in learner.forward.adapt_index]
    assert [w.shape for w in user.weights] == [w.shape for w in initial]
    assert all(not np.allclose(w, w0) for w, w0 in zip(user.weights, initial))
    # The adapted user is the meta-model with only the selected weights replaced.
    items = data.items.index.to_numpy()[:30]
    variables = [model.trainable_variables[i] for i in learner.forward.adapt_index]
    try:
        for v, w in zip(variables, user.weights):
            v.assign(w)
        swapped = learner.predict_items(items, features)
    finally:
        for v, w0 in zip(variables, initial):
            v.assign(w0)
    np.testing.assert_allclose(user.score(items), swapped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(SELECTIONS))
def test_selection_survives_save_and_load(setup, kind, tmp_path):
    data, tasks, model, support, features = setup
    adapt, _ = SELECTIONS[kind]
    learner = make(model, tasks, adapt)
    path = tmp_path / f"{kind}.keras"
    learner.save(path)
    loaded = metarec.load(path)
    assert loaded.forward.adapt_index == learner.forward.adapt_index
    assert paths_of(loaded.model, loaded.forward.adapt_index) == paths_of(model, learner.forward.adapt_index)
    # A predicate cannot be stored: the file holds the paths it selected, as anchored regexes.
    assert isinstance(loaded.get_config()["adapt"], list)
    items = data.items.index.to_numpy()[:30]
    np.testing.assert_allclose(loaded.adapt(support, features).score(items),
                               learner.adapt(support, features).score(items), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapt", [[r"no_such_layer"], [], lambda path: False])
def test_a_selection_of_nothing_is_refused(setup, adapt):
    _, tasks, model, _, _ = setup
    with pytest.raises(ValueError, match="selects no trainable weight") as err:
        make(model, tasks, adapt)
    if isinstance(adapt, list) and adapt:
        assert "no_such_layer" in str(err.value)


@pytest.mark.parametrize("adapt,message", [
    ([r"decision_(2"], "invalid regex 'decision_\\(2'"),
    ([3], "got 3"),
])
def test_bad_regex_lists_are_refused(setup, adapt, message):
    _, tasks, model, _, _ = setup
    with pytest.raises(ValueError, match=message):
        make(model, tasks, adapt)
