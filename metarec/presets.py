"""Named, ready-to-fit meta-learner configurations.

Each preset returns a *compiled* meta-learner for a ``FeatureEncoder`` (``tasks.encoder``).
The residual presets also take an ``item_prior``, one value per item index, that the network
predicts on top of; :func:`metarec.priors.item_mean_prior` builds it::

    prior = metarec.priors.item_mean_prior(tasks)       # damped item means of tasks.train
    learner = metarec.presets.residual_maml(tasks.encoder, prior)
"""

from __future__ import annotations

__all__ = ["catalogue_two_tower", "MELU_EMBEDDING_DIM", "MELU_HIDDEN_UNITS", "melu", "residual_maml", "residual_maml_tuned", "residual_memory"]

#: MeLU (Lee et al., KDD 2019): 32-wide embedding per feature, decision layers 64-64-1.
MELU_EMBEDDING_DIM = 32
MELU_HIDDEN_UNITS = (64, 64)


def melu(encoder, local_steps=1, local_lr=0.01, outer_lr=1e-3, first_order=False, clipnorm=5.0):
    """A MeLU-style MAML: feature embeddings of 32 each, decision layers 64-64-1 adapted per
    user (the embeddings change only in the outer loop), ``local_steps`` inner SGD steps.

    MeLU's published code is *effectively first-order*: after the local update it copies the
    adapted weights back into the network (``load_state_dict``), which cuts the graph between
    the query loss and the initial weights, so only first-order meta-gradients flow. This
    preset is the true second-order version (gradients through every inner step); pass
    ``first_order=True`` for the behaviour of the published code.

    Args:
        encoder: the data's ``FeatureEncoder``.
        local_steps: inner (local) SGD steps per user, 1 or 5 in the paper's settings.
        local_lr: inner learning rate. MeLU's own 5e-6 barely moves the weights with plain
            SGD; 0.01 is the default here (chosen on validation users of protocol Q1).
        outer_lr: Adam learning rate of the outer loop.
        first_order: drop the second-order terms (first-order MAML).
        clipnorm: global-norm clip of each inner gradient.

    Returns:
        A compiled ``metarec.MAML``.
    """
    import keras

    from metarec.maml import MAML
    from metarec.models import rating_mlp

    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local_steps must be a positive integer, got {local_steps!r}")
    model = rating_mlp(encoder, embedding_dim=MELU_EMBEDDING_DIM, hidden_units=MELU_HIDDEN_UNITS,
                       name="melu")
    learner = MAML(model, inner_steps=local_steps, inner_lr=local_lr, adapt="decision_layers",
                   first_order=first_order, clipnorm=clipnorm, encoder=encoder,
                   feedback=encoder.schema.feedback)
    learner.compile(optimizer=keras.optimizers.Adam(outer_lr))
    return learner


def residual_maml(encoder, item_prior, inner_steps=1, inner_lr=0.01, adapt="decision_layers",
                  outer_lr=1e-3, first_order=False, clipnorm=5.0, **learner_kwargs):
    """Second-order MAML over :func:`metarec.models.residual_mlp`: the network predicts the
    residual over a fixed item prior (the damped item mean), and the decision layers, whose
    output bias acts as a per-user offset, adapt per user. MeLU-sized (32 per feature,
    64-64-1).

    Args:
        encoder: the data's ``FeatureEncoder`` (``tasks.encoder``).
        item_prior: float array of length ``encoder.num_items``, one value per item index
            (index 0: the unknown item); ``metarec.priors.item_mean_prior(tasks)`` builds the
            damped item means of the training users. Fixed in both loops.
        inner_steps, inner_lr, adapt, first_order, clipnorm: as in ``MAML``.
        outer_lr: Adam learning rate of the outer loop.
        **learner_kwargs: further ``MAML`` arguments (e.g. ``proximal``, ``ranking_weight``).

    Returns:
        A compiled ``metarec.MAML``.
    """
    import keras

    from metarec.maml import MAML
    from metarec.models import residual_mlp

    model = residual_mlp(encoder, item_prior, embedding_dim=MELU_EMBEDDING_DIM,
                         hidden_units=MELU_HIDDEN_UNITS)
    learner = MAML(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                   first_order=first_order, clipnorm=clipnorm, encoder=encoder,
                   feedback=encoder.schema.feedback, **learner_kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(outer_lr))
    return learner


def residual_maml_tuned(encoder, item_prior, **overrides):
    """``residual_maml`` with the settings chosen by the validation-only search of
    ``metarec evaluate --data ml-100k --search residual-maml --seeds 0 --k 10`` (eight points:
    inner steps {1, 5} x inner lr {0.01, 0.05} x proximal {0, 1}; table in
    ``docs/BENCHMARKS.md``): 5 inner steps, inner lr 0.01, proximal pull 1.0. The margins
    between the top points were within 0.001 validation MAE.

    Args:
        encoder, item_prior: as in :func:`residual_maml`.
        **overrides: settings that replace the tuned ones, or further ``residual_maml``
            arguments.

    Returns:
        A compiled ``metarec.MAML``.
    """
    settings = {"inner_steps": 5, "inner_lr": 0.01, "proximal": 1.0, **overrides}
    return residual_maml(encoder, item_prior, **settings)


def residual_memory(encoder, item_prior, inner_steps=0, inner_lr=0.01, units=64,
                    conditioning="film", outer_lr=1e-3, clipnorm=5.0):
    """The memory-based learner over :func:`metarec.models.residual_mlp`: a GRU reads the
    user's support ratings and conditions the decision layers of the residual network (FiLM);
    ``inner_steps`` gradient steps may follow.

    Args:
        encoder, item_prior: as in :func:`residual_maml`.
        inner_steps, inner_lr, units, conditioning, clipnorm: as in ``MemoryLearner``.
        outer_lr: Adam learning rate of the outer loop.

    Returns:
        A compiled ``metarec.MemoryLearner``.
    """
    import keras

    from metarec.memory import MemoryLearner
    from metarec.models import residual_mlp

    model = residual_mlp(encoder, item_prior, embedding_dim=MELU_EMBEDDING_DIM,
                         hidden_units=MELU_HIDDEN_UNITS)
    learner = MemoryLearner(model, inner_steps=inner_steps, inner_lr=inner_lr, units=units,
                            conditioning=conditioning, clipnorm=clipnorm, encoder=encoder,
                            feedback=encoder.schema.feedback)
    learner.compile(optimizer=keras.optimizers.Adam(outer_lr))
    return learner


def catalogue_two_tower(tasks, embedding_dim=80, cosine_dim=16, inner_steps=1, inner_lr=1.0,
                        outer_lr=1e-4, sampler=None, rating_weight=1.0, relevance_threshold=4.0,
                        first_order=False, item_prior=None, rating_inner_lr=0.01, start_weight=1.0,
                        inner_rating_weights="ramp"):
    """MAML over :func:`metarec.models.two_tower` for catalogue top-k lists.

    The recipe chosen on validation users of protocol Q1 (docs/BENCHMARKS.md):

    * item vectors start from the training users' liked-item co-occurrence and, in
      ``cosine_dim`` of the columns, its cosine similarity
      (:func:`metarec.priors.cooccurrence_embeddings`), the ranking bias from their log
      popularity (:func:`metarec.priors.log_popularity`): before adaptation the model ranks
      as "most popular (liked)";
    * per user, only the two user vectors' offsets adapt (``decision_user_vector/bias`` and
      ``decision_user_rating_vector/bias``), with per-layer meta-learned inner rates
      (starting at ``inner_lr`` for the ranking vector, ``rating_inner_lr`` for the rating one:
      a squared error's gradient is far larger than the linear ranking loss's wants);
    * the inner loop takes ``inner_steps`` steps of the *linear* ranking loss over the
      support items, each weighted by its rating (``inner_rating_weights``; a learned
      item-item fold-in, see ``CatalogueObjective``) next to the
      rating head's squared error; the outer loop, the softmax of each liked query item
      against the catalogue (``sampler``, default the whole catalogue) plus the rating error.

    Args:
        tasks: the ``UserTasks`` (its ``train`` users give the statistics) or a training
            ``TaskSet``.
        embedding_dim: width of the user and item vectors (at most the number of items).
        cosine_dim: how many of those columns start from the cosine similarity.
        inner_steps, inner_lr: inner steps and the ranking vector's initial inner rate.
        rating_inner_lr: the rating vector's initial inner rate.
        start_weight: weight of the unadapted start's query loss in the meta-loss (it ranks
            for users with no interactions: see ``CatalogueObjective``).
        outer_lr: Adam learning rate of the outer loop.
        sampler: the ``NegativeSampler`` of the outer loss (default: the full catalogue).
        rating_weight: weight of the rating head's squared error in both loops.
        relevance_threshold: the rating that makes an item liked.
        first_order: drop the second-order terms.
        item_prior: optional per-item rating baseline for the rating head (e.g.
            ``metarec.priors.item_mean_prior(tasks)``).
        inner_rating_weights: ``(rating, weight)`` knots weighing each support item in the
            inner step by its rating (``CatalogueObjective``); ``"ramp"`` (the default,
            explicit feedback): weight 0 up to ``relevance_threshold - 2``, 1 from
            ``relevance_threshold``, linear between; None folds in every support item with
            weight 1.

    Returns:
        A compiled ``metarec.MAML``.
    """
    import keras

    from metarec.catalogue_objective import CatalogueObjective
    from metarec.maml import MAML
    from metarec.models import two_tower
    from metarec.priors import _train_set, cooccurrence_embeddings, log_popularity
    from metarec.sampling import NegativeSampler, item_counts_of

    if isinstance(inner_rating_weights, str) and inner_rating_weights != "ramp":
        raise ValueError('inner_rating_weights must be "ramp", None or (rating, weight) knots such as '
                         f"((2, 0), (4, 1)); got {inner_rating_weights!r}.")
    train = _train_set(tasks)
    encoder = train.encoder
    feedback = encoder.schema.feedback
    threshold = relevance_threshold if feedback == "explicit" else None
    if inner_rating_weights == "ramp":
        # Chosen on Q1's validation users at K = 10 (docs/BENCHMARKS.md): 0 up to two stars
        # below the threshold, 1 from the threshold on (1-5 stars: 0, 0, 0.5, 1, 1).
        inner_rating_weights = (((relevance_threshold - 2.0, 0.0), (relevance_threshold, 1.0))
                                if feedback == "explicit" else None)
    model = two_tower(
        encoder, embedding_dim=embedding_dim, item_prior=item_prior,
        item_embeddings=cooccurrence_embeddings(train, embedding_dim, threshold,
                                                cosine_dim=cosine_dim),
        ranking_bias=log_popularity(train, threshold),
    )
    if sampler is None:
        sampler = NegativeSampler("catalogue")
    if sampler.item_counts is None:
        sampler.fit(item_counts_of(train))
    objective = CatalogueObjective(sampler, rating_weight=rating_weight, positives="liked",
                                   relevance_threshold=relevance_threshold, inner_loss="linear",
                                   inner_positives=None if inner_rating_weights is not None else "all",
                                   inner_rating_weights=inner_rating_weights, start_weight=start_weight)
    adapt = [r"^decision_user_vector/bias$", r"^decision_user_rating_vector/bias$"]
    learner = MAML(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                   learn_inner_lr="per_layer", first_order=first_order, clipnorm=None,
                   encoder=encoder, feedback=feedback, objective=objective)
    paths = [learner.model.trainable_variables[i].path for i in learner.forward.adapt_index]
    for path, rate in zip(paths, learner.inner_lr_weights):
        if path == "decision_user_rating_vector/bias":
            rate.assign(float(rating_inner_lr))
    learner.compile(optimizer=keras.optimizers.Adam(outer_lr))
    return learner