"""Ready-made Keras models over metarec's feature dict.

Any Keras 3 model that takes the feature dict (see ``FeatureEncoder.input_spec``) and returns
one value per (user, item) pair works with the meta-learners; these are good defaults.
Layers whose names start with ``decision`` are what ``adapt="decision_layers"`` adapts per user.
"""

import keras


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
    for units in hidden_units:
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"hidden_units must be positive integers; received {hidden_units!r}.")
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer; received {embedding_dim!r}.")
    inputs = feature_inputs(encoder)
    parts = embed_features(
        encoder, inputs, embedding_dim, exclude=() if use_item_id else ("item_id",)
    )
    x = keras.layers.Concatenate(name="features")(parts) if len(parts) > 1 else parts[0]
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"decision_{i + 1}")(x)
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

    prior = np.asarray(item_prior, dtype="float32").reshape(-1)
    if prior.shape != (encoder.num_items,) or not np.all(np.isfinite(prior)):
        raise ValueError(f"item_prior must hold {encoder.num_items} finite values (one per item "
                         f"index); received shape {prior.shape}.")
    for units in hidden_units:
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"hidden_units must be positive integers; received {hidden_units!r}.")
    inputs = feature_inputs(encoder)
    parts = embed_features(encoder, inputs, embedding_dim, exclude=() if use_item_id else ("item_id",))
    x = keras.layers.Concatenate(name="features")(parts) if len(parts) > 1 else parts[0]
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"decision_{i + 1}")(x)
    residual = keras.layers.Dense(1, name="decision_output", kernel_initializer="zeros")(x)
    prior_layer = keras.layers.Embedding(
        encoder.num_items, 1, name="item_prior", trainable=False,
        embeddings_initializer=keras.initializers.Constant(prior.reshape(-1, 1)),
    )
    base = keras.layers.Reshape((1,), name="item_prior_column")(prior_layer(inputs["item_id"]))
    out = keras.layers.Add(name="prediction")([base, residual])
    return keras.Model(inputs, out, name=name)
