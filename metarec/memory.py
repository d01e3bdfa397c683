"""The memory-based meta-learner: a recurrent network reads a user's support set.

A recurrent network (a GRU, or an LSTM with ``cell="lstm"``) reads the user's support
interactions, one row per interaction (the item's representation and the user's rating), and its
final state conditions the scorer. Adaptation is
one forward pass: no gradient steps. With ``inner_steps > 0`` the conditioned weights are the
starting point of a few gradient steps (the combination of the two families), meta-trained end
to end like MAML.

How the state conditions the scorer, for any Keras model: each layer whose weights adapt per user
gets a head from the state to ``gamma`` and ``beta`` (zero at initialisation, so training starts
from the plain model):

* ``conditioning="film"``: the layer's output units are modulated, ``gamma * (W x + b) + beta``
  (feature-wise linear modulation), written as ``W' = W * (1 + gamma)``, ``b' = b * (1 + gamma)
  + beta`` so that the per-user result is again a set of adapted weights;
* ``conditioning="concat"``: ``b' = b + beta``, which is exactly what concatenating the state to
  the layer's input does (the extra input columns add ``W_c @ state`` to the pre-activation).

Because the result is a set of per-user weights like MAML's, ``adapt()``, batch scoring, the
server and saving need nothing new.
"""

import keras
from keras import ops

from metarec.inner_loop import _input_names
from metarec.learner import positions_in, untracked
from metarec.maml import MAML

CONDITIONING = ("film", "concat")
CELLS = ("gru", "lstm")


class SupportReader(keras.layers.Layer):
    """A GRU or LSTM over support rows ``[B, S, d]`` (masked) -> one head output per
    conditioned layer."""

    def __init__(self, units, head_sizes, cell="gru", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.head_sizes = list(head_sizes)
        if cell == "lstm":
            self.lstm = keras.layers.LSTM(units, name="lstm")
        else:
            self.gru = keras.layers.GRU(units, name="gru")
        untracked(self, "recurrent", self.lstm if cell == "lstm" else self.gru)
        self.heads = [
            keras.layers.Dense(n, kernel_initializer="zeros", name=f"head_{i}")
            for i, n in enumerate(self.head_sizes)
        ]

    def build(self, input_shape):
        self.recurrent.build(input_shape)
        for head in self.heads:
            head.build((None, self.units))
        self.built = True

    def call(self, rows, mask):
        state = self.recurrent(rows, mask=mask)
        return [head(state) for head in self.heads]


def representation_model(model, adapt_index):
    """The part of ``model`` from its inputs to the input of its first adapted layer: what the
    adapted layers see of an interaction, and so what the reader reads (sharing the weights)."""
    adapted = {id(model.trainable_variables[i]) for i in adapt_index}
    for layer in model.layers:
        if not any(id(v) in adapted for v in layer.trainable_weights):
            continue
        try:
            tensor = layer.input
        except (AttributeError, ValueError):
            tensor = None
        if isinstance(tensor, (list, tuple)) and all(len(t.shape) == 2 for t in tensor):
            # A ConcatDense reads several parts; the reader sees them side by side.
            tensor = keras.layers.Concatenate(name=f"{layer.name}_input")(list(tensor))
        if tensor is None or isinstance(tensor, (list, tuple, dict)) or len(tensor.shape) != 2:
            raise ValueError(
                f"Cannot read support rows through the input of layer {layer.name!r} (the first "
                f"adapted layer), which is {tensor!r}: pass reader=, a Keras model over the feature "
                "dict that returns one vector per interaction."
            )
        return keras.Model(model.input, tensor, name=f"{model.name}_representation")
    raise ValueError("No layer of the model holds an adapted weight.")


@keras.saving.register_keras_serializable(package="metarec")
class MemoryLearner(MAML):
    """Memory-based meta-learning over users (see the module docstring).

    Args:
        model: the scorer, as for ``MAML``; ``adapt`` picks the layers the state conditions.
        inner_steps: gradient steps after conditioning; 0 (default) is purely memory-based.
        units: width of the recurrent state.
        cell: the recurrent reader, "gru" (default) or "lstm".
        conditioning: "film" or "concat".
        reader: optional Keras model over the feature dict returning ``[n, d]``, one vector per
            interaction; by default the reader shares the model's own representation (the input
            of its first adapted layer).
        Other arguments as for ``MAML`` (second-order through the inner steps by default).
    """

    reads_support = True
    TRACED_SETTINGS = MAML.TRACED_SETTINGS + ("conditioning", "cell")

    def __init__(self, model, inner_steps=0, inner_lr=0.01, adapt="decision_layers", units=64,
                 conditioning="film", reader=None, cell="gru", **kwargs):
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}; got {conditioning!r}.")
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}; got cell={cell!r}.")
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive integer; got units={units!r}.")
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt, **kwargs)
        self.units = units
        self.conditioning = conditioning
        self.cell = cell
        if reader is not None:
            if not isinstance(reader, keras.Model) or not reader.built:
                raise ValueError(f"reader must be a built keras.Model; got reader={reader!r}.")
            self.reader = reader  # tracked: its weights are meta-trained with the rest
            representation = reader
        else:
            self.reader = None
            representation = representation_model(model, self.forward.adapt_index)
        # Not tracked as a sub-layer (the default shares the model's weights; a given reader is
        # tracked as ``self.reader``): tracking it would count its weights twice.
        untracked(self, "_representation", representation)
        untracked(self, "_groups", self._conditioned_groups())
        width = representation.output.shape[-1]
        self.support_reader = SupportReader(units, [size for _, size in self._groups], cell=cell,
                                            name="support_reader")
        self.support_reader.build((None, None, width + 1))

    def _conditioned_groups(self):
        """``[(positions in the adapted list, head size)]``, one entry per conditioned layer."""
        adapted = [self.model.trainable_variables[i] for i in self.forward.adapt_index]
        layers = {}
        for pos, v in enumerate(adapted):
            layers.setdefault(v.path.rsplit("/", 1)[0], []).append(pos)
        groups = []
        for positions in layers.values():
            widths = {tuple(adapted[p].shape)[-1:] or (1,) for p in positions}
            has_bias = any(len(adapted[p].shape) <= 1 for p in positions)
            if len(widths) != 1:
                # Weights of one layer that do not share an output axis: condition each alone.
                groups += [([p], _width(adapted[p]) * self._per_unit()) for p in positions
                           if self.conditioning == "film" or len(adapted[p].shape) <= 1]
            elif self.conditioning == "film" or has_bias:
                groups.append((positions, widths.pop()[0] * self._per_unit()))
        if not groups:
            raise ValueError(
                f"conditioning={self.conditioning!r} needs an adapted bias; adapt={self.adapt_spec!r} "
                "selects none. Use conditioning='film' or adapt more weights."
            )
        return groups

    def _per_unit(self):
        return 2 if self.conditioning == "film" else 1

    # ------------------------------------------------------------------ maths
    def support_contexts(self, params, non_trainable, inputs, target, mask):
        """The heads' outputs for every user of the batch: a list of ``[B, head size]``."""
        if getattr(self, "_reader_positions", None) is None:
            meta = self.meta_variables
            untracked(self, "_reader_positions", (
                positions_in(meta, self._representation.trainable_variables),
                positions_in(meta, self.support_reader.trainable_variables),
            ))
        rep_pos, reader_pos = self._reader_positions
        users, length = ops.shape(target)[0], ops.shape(target)[1]
        names = _input_names(self._representation) or tuple(inputs)
        flat = {k: ops.reshape(inputs[k], (-1,) + tuple(inputs[k].shape[2:])) for k in names}
        rep_non_trainable = _values_of(self._representation.non_trainable_variables,
                                       self.model.non_trainable_variables, non_trainable)
        rows, _ = self._representation.stateless_call(
            [params[i] for i in rep_pos], rep_non_trainable, flat, training=False
        )
        rows = ops.reshape(ops.cast(rows, target.dtype), (users, length, -1))
        rows = ops.concatenate([rows, ops.expand_dims(target, -1)], axis=-1)
        rows = rows * ops.expand_dims(mask, -1)
        heads, _ = self.support_reader.stateless_call(
            [params[i] for i in reader_pos],
            [v.value for v in self.support_reader.non_trainable_variables],
            rows,
            mask > 0,
        )
        return list(heads)

    def initial_weights(self, params, context=None):
        adapted, fixed = super().initial_weights(params)
        if context is None:
            return adapted, fixed
        adapted = list(adapted)
        for head, (positions, size) in zip(context, self._groups):
            units = size // self._per_unit()
            gamma, beta = (head[:units], head[units:]) if self.conditioning == "film" else (None, head)
            for p in positions:
                w = adapted[p]
                if gamma is not None:
                    w = w * (1.0 + (ops.reshape(gamma, ()) if len(w.shape) == 0 else gamma))
                if len(w.shape) <= 1:
                    w = w + (ops.reshape(beta, ()) if len(w.shape) == 0 else beta)
                adapted[p] = w
        return adapted, fixed

    # ------------------------------------------------------------------ saving
    def get_config(self):
        config = super().get_config()
        config.update({
            "units": self.units,
            "conditioning": self.conditioning,
            "cell": self.cell,
            "reader": None if self.reader is None else keras.saving.serialize_keras_object(self.reader),
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("reader") is not None:
            config["reader"] = keras.saving.deserialize_keras_object(config["reader"])
        return super().from_config(config)


def _width(variable):
    return (tuple(variable.shape)[-1:] or (1,))[0]


def _values_of(variables, pool, values):
    """Values of ``variables`` taken from ``values`` where they belong to ``pool`` (the model's
    non-trainable variables), else their own current value."""
    return [v.value if p is None else values[p]
            for v, p in zip(variables, positions_in(pool, variables))]
