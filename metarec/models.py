"""Ready-made Keras models over metarec's feature dict.

Any Keras 3 model that takes the feature dict (see ``FeatureEncoder.input_spec``) and returns
one value per (user, item) pair works with the meta-learners; these are good defaults.
Layers whose names start with ``decision`` are what ``adapt="decision_layers"`` adapts per user.

The first decision layer is a :class:`ConcatDense` over two parts, the item's features and the
user's: the same function as a ``Dense`` over their concatenation, but the user's part may come
as one row against many item rows. Scoring 1,000 candidates for a user then neither copies the
user's features onto every candidate row nor multiplies them 1,000 times.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="metarec")
class ConcatDense(keras.layers.Layer):
    """``Dense`` over the concatenation of a list of inputs, computed part by part.

    ``ConcatDense(units)([a, b])`` computes ``Dense(units)(Concatenate()([a, b]))``: one
    ``kernel`` of shape ``[width(a) + width(b), units]`` and one ``bias``, initialised alike. Each
    part is multiplied by its rows of the kernel and the products are added, so parts may
    differ in batch size where one of them has a batch of 1 (it broadcasts).

    Args:
        units: output width.
        activation: as in ``keras.layers.Dense``.
        kernel_initializer, bias_initializer: as in ``keras.layers.Dense`` (the initializer
            sees the whole kernel, so its fan-in is the total input width).
    """

    def __init__(self, units, activation=None, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive integer; got units={units!r}.")
        self.units = units
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        self.widths = [int(shape[-1]) for shape in input_shape]
        self.kernel = self.add_weight(shape=(sum(self.widths), self.units), name="kernel",
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(shape=(self.units,), name="bias", initializer=self.bias_initializer)

    def call(self, inputs):
        if len({tuple(x.shape[:-1]) for x in inputs}) == 1:
            # Parts of one batch shape (training, where every row carries its user's
            # features): one product over the concatenation, exactly a Dense. Splitting the
            # kernel here would cost an extra product and, in second-order MAML, the
            # gradients of the kernel slices twice over.
            x = inputs[0] if len(inputs) == 1 else ops.concatenate(list(inputs), axis=-1)
            return self.activation(ops.matmul(x, self.kernel) + self.bias)
        out = self.bias
        start = 0
        for x, width in zip(inputs, self.widths):
            out = out + ops.matmul(x, self.kernel[start:start + width])
            start += width
        return self.activation(out)

    def compute_output_shape(self, input_shape):
        out = tuple(input_shape[0][:-1])
        for shape in input_shape[1:]:
            # Broadcast the leading axes: a 1 gives way to the other size.
            out = tuple(a if b == 1 else b if a == 1 or a is None else a
                        for a, b in zip(out, tuple(shape)[:-1]))
        return out + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=keras.activations.serialize(self.activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


def feature_inputs(encoder):
    """``keras.Input`` layers for every model input the encoder produces."""
    return {
        name: keras.Input(shape=shape, dtype=dtype, name=name)
        for name, (shape, dtype) in encoder.input_spec().items()
    }


def embed_features(encoder, inputs, embedding_dim, exclude=()):
    """One ``[batch, embedding_dim]`` (or ``[batch, 1]`` for numeric) tensor per feature.

    Categorical features and item ids get an ``Embedding`` (row 0 is the unknown bucket),
    multi-hot features a bias-free ``Dense`` projection (a sum of token embeddings), numeric
    features pass through as one column.
    """
    parts = []
    specs = encoder.feature_specs
    for name, tensor in inputs.items():
        if name in exclude:
            continue
        kind = "categorical" if name == "item_id" else specs[name].kind
        if kind == "categorical":
            layer = keras.layers.Embedding(
                encoder.vocabulary_size(name), embedding_dim, name=f"{name}_embedding"
            )
            parts.append(layer(tensor))
        elif kind == "multi_hot":
            layer = keras.layers.Dense(embedding_dim, use_bias=False, name=f"{name}_embedding")
            parts.append(layer(tensor))
        else:
            parts.append(keras.layers.Reshape((1,), name=f"{name}_column")(tensor))
    return parts


def item_and_user_parts(encoder, inputs, embedding_dim, use_item_id=True):
    """The embedded features in two groups: the item's (item id and item features) and the
    user's; each group concatenated into one tensor, groups without features left out."""
    user_names = {spec.name for spec in encoder.schema.user_features}
    exclude = () if use_item_id else ("item_id",)
    groups = []
    for side in ("item", "user"):
        names = {n: t for n, t in inputs.items() if (n in user_names) == (side == "user")}
        parts = embed_features(encoder, names, embedding_dim, exclude=exclude)
        if len(parts) > 1:
            groups.append(keras.layers.Concatenate(name=f"{side}_features")(parts))
        elif parts:
            groups.append(parts[0])
    if not groups:
        raise ValueError("The model has no input features: keep use_item_id=True or add item features.")
    return groups


def decision_layers(groups, hidden_units):
    """``decision_1`` (a ``ConcatDense`` over the feature groups), then ``decision_2``, ..."""
    x = ConcatDense(hidden_units[0], activation="relu", name="decision_1")(groups)
    for i, units in enumerate(hidden_units[1:], start=2):
        x = keras.layers.Dense(units, activation="relu", name=f"decision_{i}")(x)
    return x


def _check_encoder(encoder):
    """The models are built from a fitted encoder (its vocabularies size the embeddings); a
    schema or the data themselves are a common mistake."""
    if not (hasattr(encoder, "input_spec") and hasattr(encoder, "feature_specs")):
        raise ValueError(
            "The first argument must be the data's fitted FeatureEncoder (tasks.encoder, or "
            f"FeatureEncoder(data)); got {type(encoder).__name__} {encoder!r:.200}."
        )


def _check_sizes(embedding_dim, hidden_units):
    if not hidden_units or any(not isinstance(u, int) or u < 1 for u in hidden_units):
        raise ValueError(f"hidden_units must be one or more positive integers; got {hidden_units!r}.")
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer; got {embedding_dim!r}.")


def rating_mlp(
    encoder,
    embedding_dim=32,
    hidden_units=(64, 64),
    use_item_id=True,
    output_bias=None,
    name="rating_mlp",
):
    """A MeLU-style model: feature embeddings, concatenated, then "decision" layers.

    Args:
        encoder: the ``FeatureEncoder`` of the data (``tasks.encoder``).
        embedding_dim: width of each feature embedding.
        hidden_units: widths of the hidden decision layers.
        use_item_id: embed the item id as well as the item features.
        output_bias: initial output bias; defaults to the middle of the rating range for
            explicit feedback (so training starts near the right scale) and 0 for implicit.

    Returns:
        A built ``keras.Model`` mapping the feature dict to one score per row (a rating for
        explicit feedback, a logit for implicit feedback).
    """
    _check_encoder(encoder)
    _check_sizes(embedding_dim, hidden_units)
    inputs = feature_inputs(encoder)
    x = decision_layers(item_and_user_parts(encoder, inputs, embedding_dim, use_item_id), hidden_units)
    if output_bias is None:
        schema = encoder.schema
        if schema.feedback == "explicit" and schema.rating_range is not None:
            output_bias = float(sum(schema.rating_range)) / 2.0
        else:
            output_bias = 0.0
    out = keras.layers.Dense(
        1, name="decision_output", bias_initializer=keras.initializers.Constant(output_bias)
    )(x)
    return keras.Model(inputs, out, name=name)


def residual_mlp(
    encoder,
    item_prior,
    embedding_dim=32,
    hidden_units=(64, 64),
    use_item_id=True,
    name="residual_mlp",
):
    """``rating_mlp`` that predicts on top of a fixed per-item prior (e.g. the damped item mean).

    ``prediction = item_prior[item] + mlp(features)``; the prior is a frozen one-column
    embedding, so neither loop changes it. The output layer ``decision_output`` starts at
    zero weight and zero bias: its bias is a per-user offset that adapts in the inner loop
    (with ``adapt="decision_layers"``, or alone with ``adapt=[r"decision_output/bias"]``).

    Args:
        encoder: the ``FeatureEncoder`` of the data.
        item_prior: float array of length ``encoder.num_items`` indexed by item index
            (entry 0, the unknown item, is typically the global mean).
        embedding_dim, hidden_units, use_item_id: as in :func:`rating_mlp`.
    """
    import numpy as np

    _check_encoder(encoder)
    prior = np.asarray(item_prior, dtype="float32").reshape(-1)
    if prior.shape != (encoder.num_items,) or not np.all(np.isfinite(prior)):
        raise ValueError(f"item_prior must hold {encoder.num_items} finite values (one per item "
                         f"index); got shape {prior.shape}.")
    _check_sizes(embedding_dim, hidden_units)
    inputs = feature_inputs(encoder)
    x = decision_layers(item_and_user_parts(encoder, inputs, embedding_dim, use_item_id), hidden_units)
    residual = keras.layers.Dense(1, name="decision_output", kernel_initializer="zeros")(x)
    prior_layer = keras.layers.Embedding(
        encoder.num_items, 1, name="item_prior", trainable=False,
        embeddings_initializer=keras.initializers.Constant(prior.reshape(-1, 1)),
    )
    base = keras.layers.Reshape((1,), name="item_prior_column")(prior_layer(inputs["item_id"]))
    out = keras.layers.Add(name="prediction")([base, residual])
    return keras.Model(inputs, out, name=name)


@keras.saving.register_keras_serializable(package="metarec")
class FactorizationHeads(keras.layers.Layer):
    """The two outputs of :func:`two_tower` from a user's vectors and an item's vector.

    ``ranking = ranking_bias[item] + <user_vector, item_vector>`` and, for explicit feedback,
    ``rating = rating_offset + rating_bias[item] + <user_rating_vector, item_vector>``. The user
    side may be one row against many item rows (it broadcasts), so scoring a catalogue never
    copies the user's features.
    """

    def __init__(self, rating_offset=None, **kwargs):
        super().__init__(**kwargs)
        self.rating_offset = None if rating_offset is None else float(rating_offset)

    def call(self, inputs):
        user, item, ranking_bias = inputs[0], inputs[1], inputs[2]
        ranking = ranking_bias + ops.sum(user * item, axis=-1, keepdims=True)
        if self.rating_offset is None:
            return {"ranking": ranking}
        user_rating, rating_bias = inputs[3], inputs[4]
        rating = self.rating_offset + rating_bias + ops.sum(user_rating * item, axis=-1, keepdims=True)
        return {"rating": rating, "ranking": ranking}

    def compute_output_shape(self, input_shape):
        batch = input_shape[1][:-1]
        shapes = {"ranking": tuple(batch) + (1,)}
        if self.rating_offset is not None:
            shapes["rating"] = tuple(batch) + (1,)
        return shapes

    def get_config(self):
        config = super().get_config()
        config.update(rating_offset=self.rating_offset)
        return config


@keras.saving.register_keras_serializable(package="metarec")
class ZerosColumn(keras.layers.Layer):
    """A ``[batch, 1]`` column of zeros shaped like its input: the user tower's input when the
    data has no user features, so the user vector is the adapted layer's bias alone."""

    def call(self, x):
        return ops.zeros(ops.shape(x)[:1] + (1,), dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:1]) + (1,)


def two_tower(
    encoder,
    embedding_dim=64,
    feature_dim=16,
    user_hidden_units=(64,),
    item_prior=None,
    item_embeddings=None,
    ranking_bias=None,
    name="two_tower",
):
    """A factorization model whose per-user adaptation reorders the whole catalogue.

    An item is a vector ``q_i`` (an item-id embedding plus a projection of the item's
    features) and a bias; a user is a vector ``p_u`` computed from the user's features by a
    small tower whose last layer, ``decision_user_vector``, is what ``adapt="decision_layers"``
    adapts per user. Moving ``p_u`` moves every item's score ``b_i + <p_u, q_i>`` at once,
    which is what a top-k list needs; a rating MLP's adapted layers mostly shift ratings.

    Outputs (a dict):

    * ``"ranking"``: ``b_i + <p_u, q_i>``, a logit over the catalogue: what ``recommend`` and
      the ``Recommend`` RPC rank by. Train it with a catalogue objective
      (``metarec.catalogue_objective.CatalogueObjective``).
    * ``"rating"`` (explicit feedback only): ``offset + r_i + <p'_u, q_i>`` with its own
      adapted user vector ``decision_user_rating_vector``: what ``score`` and the ``Score``
      RPC return. ``offset`` is the middle of the rating range; ``item_prior`` (e.g.
      ``metarec.priors.item_mean_prior``) replaces it per item, frozen.

    Args:
        encoder: the data's fitted ``FeatureEncoder`` (``tasks.encoder``).
        embedding_dim: width of the user and item vectors.
        feature_dim: width of each feature embedding in the towers.
        user_hidden_units: hidden layers of the user tower (may be empty).
        item_prior: optional float array of ``encoder.num_items`` values, one per item index:
            a fixed per-item rating baseline for the rating head.
        item_embeddings: optional initial item-id embeddings, ``[encoder.num_items,
            embedding_dim]`` (e.g. ``metarec.priors.cooccurrence_embeddings``); trainable.
        ranking_bias: optional initial ranking bias per item index, ``[encoder.num_items]``
            (e.g. ``metarec.priors.log_popularity``); trainable.

    Returns:
        A built ``keras.Model`` from the feature dict to ``{"rating", "ranking"}`` (explicit)
        or ``{"ranking"}`` (implicit).
    """
    import numpy as np

    _check_encoder(encoder)
    _check_sizes(feature_dim, tuple(user_hidden_units) or (1,))
    if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer; got embedding_dim={embedding_dim!r}.")
    explicit = encoder.schema.feedback == "explicit"
    inputs = feature_inputs(encoder)
    user_names = {spec.name for spec in encoder.schema.user_features}
    item_inputs = {k: v for k, v in inputs.items() if k not in user_names and k != "item_id"}
    user_inputs = {k: v for k, v in inputs.items() if k in user_names}

    # Item tower: id embedding + projected item features.
    item_id = inputs["item_id"]
    init = keras.initializers.RandomNormal(stddev=0.05)
    if item_embeddings is not None:
        init = keras.initializers.Constant(
            _per_item(item_embeddings, encoder, "item_embeddings", (embedding_dim,)))
    item_vector = keras.layers.Embedding(
        encoder.num_items, embedding_dim, name="item_embedding", embeddings_initializer=init)(item_id)
    features = embed_features(encoder, item_inputs, feature_dim)
    if features:
        joined = features[0] if len(features) == 1 else keras.layers.Concatenate(name="item_features")(features)
        # Zero at first: item vectors start as given (e.g. from co-occurrence), and
        # meta-training adds what the features are worth.
        projected = keras.layers.Dense(embedding_dim, use_bias=False, name="item_feature_projection",
                                       kernel_initializer="zeros")(joined)
        item_vector = keras.layers.Add(name="item_vector")([item_vector, projected])
    bias_init = "zeros"
    if ranking_bias is not None:
        bias_init = keras.initializers.Constant(_per_item(ranking_bias, encoder, "ranking_bias", ()).reshape(-1, 1))
    ranking_bias = keras.layers.Embedding(encoder.num_items, 1, name="item_ranking_bias",
                                          embeddings_initializer=bias_init)(item_id)

    # User tower: features -> hidden -> the adapted user vector(s).
    features = embed_features(encoder, user_inputs, feature_dim)
    if features:
        x = features[0] if len(features) == 1 else keras.layers.Concatenate(name="user_features")(features)
    else:
        x = ZerosColumn(name="no_user_features")(item_id)
    for i, units in enumerate(user_hidden_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"user_hidden_{i}")(x)
    user_vector = keras.layers.Dense(embedding_dim, name="decision_user_vector",
                                     kernel_initializer="zeros")(x)
    heads_inputs = [user_vector, item_vector, ranking_bias]
    offset = None
    if explicit:
        user_rating = keras.layers.Dense(embedding_dim, name="decision_user_rating_vector",
                                         kernel_initializer="zeros")(x)
        rating_bias = keras.layers.Embedding(encoder.num_items, 1, name="item_rating_bias",
                                             embeddings_initializer="zeros")(item_id)
        if item_prior is not None:
            prior = np.asarray(item_prior, dtype="float32").reshape(-1)
            if prior.shape != (encoder.num_items,) or not np.all(np.isfinite(prior)):
                raise ValueError(f"item_prior must hold {encoder.num_items} finite values (one per "
                                 f"item index); got shape {prior.shape}.")
            prior_layer = keras.layers.Embedding(
                encoder.num_items, 1, name="item_prior", trainable=False,
                embeddings_initializer=keras.initializers.Constant(prior.reshape(-1, 1)))
            rating_bias = keras.layers.Add(name="item_rating_baseline")([rating_bias, prior_layer(item_id)])
            offset = 0.0
        else:
            low, high = encoder.schema.rating_range or (0.0, 0.0)
            offset = (float(low) + float(high)) / 2.0
        heads_inputs += [user_rating, rating_bias]
    outputs = FactorizationHeads(rating_offset=offset, name="heads")(heads_inputs)
    return keras.Model(inputs, outputs, name=name)


def _per_item(values, encoder, name, row_shape):
    """``values`` as a finite float32 array ``[encoder.num_items, *row_shape]``, or a
    ``ValueError`` naming ``name`` and the shape received."""
    import numpy as np

    array = np.asarray(values, dtype="float32")
    expected = (encoder.num_items,) + tuple(row_shape)
    if array.shape != expected or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a finite array of shape {expected} (one row per item "
                         f"index); got shape {array.shape}.")
    return array
