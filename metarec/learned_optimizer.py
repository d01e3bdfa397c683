"""The LSTM meta-learner: a learned update rule in place of gradient descent.

A small LSTM, shared by every coordinate (every scalar of the adapted weights), reads at each
inner step what an optimizer sees of its coordinate and writes that coordinate's update. Its
weights are meta-learned jointly with the initialisation, end to end through the unrolled
inner loop, so the learner learns *how* to adapt as well as where to start.

What the LSTM reads, per coordinate and step (``preprocess``, as in Andrychowicz et al., 2016,
"Learning to learn by gradient descent by gradient descent", with p = 10):

* the gradient as (log-magnitude, sign): ``(log(max(|g|, e^-p)) / p, clip(e^p g, -1, 1))``,
  which is ``(log|g| / p, sign g)`` for ``|g| >= e^-p`` and ``(-1, e^p g)`` below;
* the user's inner loss, preprocessed the same way;
* with ``read_parameters=True``, the coordinate's current value.

Two forms of update (``form=``):

* ``"andrychowicz"``: the output is the update, ``w <- w + inner_lr * (h W_h + x W_x + b)``,
  with ``h`` the LSTM's hidden state and ``x`` its input. ``W_x`` starts as ``-1`` on the
  gradient's sign and 0 elsewhere, ``W_h`` and ``b`` at 0: before meta-training the rule is sign
  descent with step ``inner_lr``.
* ``"ravi_larochelle"`` (Ravi & Larochelle, 2017, "Optimization as a model for few-shot
  learning"): the parameter is the cell state of a second, gated recurrence,
  ``w <- f * w - i * g``, whose input gate ``i`` (a learned rate) and forget gate ``f`` (a learned
  decay) are sigmoids of the LSTM's hidden state, of the previous gates and (with
  ``read_parameters``) of the parameter. The gates' weights start at 0, their biases at
  ``logit(inner_lr)`` and 5: before meta-training the rule is gradient descent at rate
  ``inner_lr`` with a decay of ``sigmoid(5) = 0.993``.

The learner's result is a set of per-user weights like MAML's, so ``adapt()``, batch scoring,
the server, retraining and saving need nothing new.
"""

import math

import keras
import numpy as np
from keras import ops

from metarec import backend
from metarec.inner_loop import guard_gradients, inner_objective
from metarec.learner import positions_in, untracked
from metarec.maml import MAML

FORMS = ("andrychowicz", "ravi_larochelle")

#: The preprocessing constant ``p`` of Andrychowicz et al.: magnitudes below ``e^-p`` are read
#: as the scaled value itself rather than its logarithm.
PREPROCESS_P = 10.0

#: The forget gate's initial bias in the Ravi-Larochelle form: a decay of sigmoid(5) = 0.993.
FORGET_BIAS = 5.0


def preprocess(value, p=PREPROCESS_P):
    """(log-magnitude, sign) features of ``value``, stacked on a new last axis.

    Args:
        value: a tensor of any shape (gradients, or a scalar loss).
        p: the cut-off: ``|value| < e^-p`` is read as ``(-1, e^p value)``.

    Returns:
        ``[..., 2]``: ``(log(max(|value|, e^-p)) / p, clip(e^p value, -1, 1))``, finite and
        differentiable everywhere (no log of 0).
    """
    floor = math.exp(-p)
    magnitude = ops.log(ops.maximum(ops.abs(value), floor)) / p
    sign = ops.clip(value * math.exp(p), -1.0, 1.0)
    return ops.stack([magnitude, sign], axis=-1)


class CoordinateLSTM(keras.layers.Layer):
    """The learned update rule: an LSTM applied to every coordinate alike, and its output head.

    Args:
        hidden_size: width of the LSTM's state (per coordinate).
        form: "andrychowicz" (the output is the update) or "ravi_larochelle" (gated: the
            parameter is a cell state; input gate = rate, forget gate = decay).
        read_parameters: whether the coordinate's current value is an input.
        initial_rate: ``inner_lr``; the Ravi-Larochelle input gate starts at this rate.
    """

    def __init__(self, hidden_size, form, read_parameters, initial_rate, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = int(hidden_size)
        self.form = form
        self.read_parameters = bool(read_parameters)
        self.input_size = 4 + int(self.read_parameters)
        h, d = self.hidden_size, self.input_size
        self.kernel = self.add_weight(shape=(d, 4 * h), initializer="glorot_uniform", name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(h, 4 * h), initializer="orthogonal",
                                                name="recurrent_kernel")
        # Gates in the order input, forget, candidate, output; the forget bias starts at 1.
        bias = np.zeros(4 * h)
        bias[h:2 * h] = 1.0
        self.bias = self.add_weight(shape=(4 * h,), initializer=keras.initializers.Constant(bias),
                                    name="bias")
        if form == "andrychowicz":
            skip = np.zeros((d, 1))
            skip[1, 0] = -1.0  # -sign(g): sign descent before meta-training
            self.head_hidden = self.add_weight(shape=(h, 1), initializer="zeros", name="head_hidden")
            self.head_input = self.add_weight(shape=(d, 1), initializer=keras.initializers.Constant(skip),
                                              name="head_input")
            self.head_bias = self.add_weight(shape=(1,), initializer="zeros", name="head_bias")
        else:
            logit = math.log(initial_rate / (1.0 - initial_rate))
            self.gate_hidden = self.add_weight(shape=(h, 2), initializer="zeros", name="gate_hidden")
            self.gate_previous = self.add_weight(shape=(2,), initializer="zeros", name="gate_previous")
            if self.read_parameters:
                self.gate_parameter = self.add_weight(shape=(2,), initializer="zeros",
                                                      name="gate_parameter")
            self.gate_bias = self.add_weight(
                shape=(2,), initializer=keras.initializers.Constant([logit, FORGET_BIAS]),
                name="gate_bias")
        self.built = True

    def initial_state(self, size, dtype):
        """The state of ``size`` coordinates before the first step: zeros (and, for the
        Ravi-Larochelle form, previous gates of zero)."""
        zeros = ops.zeros((size, self.hidden_size), dtype=dtype)
        if self.form == "andrychowicz":
            return (zeros, zeros)
        gates = ops.zeros((size, 2), dtype=dtype)
        return (zeros, zeros, gates)

    def step(self, weights, theta, grad, loss, state, scale):
        """One update of every coordinate (pure: ``weights`` are this layer's trainable values).

        Args:
            weights: values of ``self.trainable_variables``, in that order.
            theta: the adapted weights, flat ``[n]``.
            grad: their (guarded) gradient, flat ``[n]``.
            loss: the inner loss, a scalar.
            state: the recurrent state (``initial_state`` or the previous step's).
            scale: ``inner_lr``, the output scale of the "andrychowicz" form.

        Returns:
            ``(new theta [n], new state)``.
        """
        values = dict(zip((v.name for v in self.trainable_variables), weights))
        dtype = values["kernel"].dtype
        theta = ops.cast(theta, dtype)
        grad = ops.cast(grad, dtype)
        n = ops.shape(theta)[0]
        parts = [preprocess(grad), ops.broadcast_to(preprocess(ops.cast(loss, dtype)), (n, 2))]
        if self.read_parameters:
            parts.append(ops.expand_dims(theta, -1))
        x = ops.concatenate(parts, axis=-1)
        h, c = state[0], state[1]
        z = ops.matmul(x, values["kernel"]) + ops.matmul(h, values["recurrent_kernel"]) + values["bias"]
        size = self.hidden_size
        i = ops.sigmoid(z[:, :size])
        f = ops.sigmoid(z[:, size:2 * size])
        g = _tanh(z[:, 2 * size:3 * size])
        o = ops.sigmoid(z[:, 3 * size:])
        c = f * c + i * g
        h = o * _tanh(c)
        if self.form == "andrychowicz":
            out = (ops.matmul(h, values["head_hidden"]) + ops.matmul(x, values["head_input"])
                   + values["head_bias"])
            return theta + scale * out[:, 0], (h, c)
        gates = ops.matmul(h, values["gate_hidden"]) + state[2] * values["gate_previous"] + values["gate_bias"]
        if self.read_parameters:
            gates = gates + ops.expand_dims(theta, -1) * values["gate_parameter"]
        gates = ops.sigmoid(gates)
        rate, decay = gates[:, 0], gates[:, 1]
        return decay * theta - rate * grad, (h, c, gates)


def _tanh(x):
    """tanh as ``2 sigmoid(2x) - 1``: computed at the input's precision on every backend."""
    return 2.0 * ops.sigmoid(2.0 * x) - 1.0


@keras.saving.register_keras_serializable(package="metarec")
class LSTMMetaLearner(MAML):
    """Meta-learning with a learned, coordinate-wise LSTM update rule (see the module doc).

    Args:
        model: the scorer, as for ``MAML``; ``adapt`` selects the weights the rule updates.
        inner_steps: steps of the learned rule on a user's support set.
        inner_lr: the output scale of the "andrychowicz" form; the initial rate (input gate)
            of the "ravi_larochelle" form, in (0, 1).
        hidden_size: width of the LSTM's state, a positive integer.
        form: "andrychowicz" or "ravi_larochelle".
        read_parameters: whether the rule also reads each coordinate's current value.
        first_order: treat what the rule reads (gradients and loss) as constants of the
            meta-gradient (no second derivatives of the user's loss), as Andrychowicz et al. do.
        Other arguments as for ``MAML`` (``clipnorm`` guards each inner gradient, ``proximal``
        adds a pull toward the initialisation to the inner loss). The inner rates are not
        ``learn_inner_lr``: the rule itself is learned.
    """

    TRACED_SETTINGS = MAML.TRACED_SETTINGS + ("form", "hidden_size", "read_parameters")

    def __init__(self, model, inner_steps=5, inner_lr=0.01, adapt="decision_layers", hidden_size=16,
                 form="andrychowicz", read_parameters=False, first_order=False, **kwargs):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}; got form={form!r}.")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, (int, np.integer)) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer; got hidden_size={hidden_size!r}.")
        if kwargs.get("learn_inner_lr") is not None:
            raise ValueError(
                "LSTMMetaLearner learns its update rule, not inner learning rates; got "
                f"learn_inner_lr={kwargs['learn_inner_lr']!r}. Leave it None, or use MetaSGD."
            )
        if form == "ravi_larochelle" and not 0.0 < inner_lr < 1.0:
            raise ValueError(
                "inner_lr is the initial input gate (a sigmoid) of the ravi_larochelle form and must "
                f"lie in (0, 1); got inner_lr={inner_lr!r}."
            )
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                         first_order=first_order, **kwargs)
        self.hidden_size = int(hidden_size)
        self.form = form
        self.read_parameters = bool(read_parameters)
        # Created after `self.model`: Keras orders the learner's variables as model weights,
        # then the rule's, the order in which the optimizer state is saved.
        self.update_rule = CoordinateLSTM(self.hidden_size, form, self.read_parameters, self.inner_lr,
                                          name="update_rule")

    def _rule_weights(self, params):
        if getattr(self, "_rule_positions", None) is None:
            untracked(self, "_rule_positions",
                      positions_in(self.meta_variables, self.update_rule.trainable_variables))
        return [params[i] for i in self._rule_positions]

    # ------------------------------------------------------------------ maths
    def adapt_user(self, params, non_trainable, inputs, target, mask, steps=None, context=None,
                   negatives=None):
        """Adapted weights of one user: ``steps`` of the learned rule on their support set."""
        adapted, fixed = self.initial_weights(params, context)
        rule = self._rule_weights(params)
        user_loss = None
        if self.objective is not None:
            def user_loss(weights):
                return self.user_loss(weights, fixed, non_trainable, inputs, target, mask, negatives,
                                      inner=True)

        objective = inner_objective(self.forward, list(adapted), fixed, non_trainable, inputs, target,
                                    mask, feedback=self.feedback, proximal=self.proximal,
                                    user_loss=user_loss)
        shapes = [tuple(w.shape) for w in adapted]
        sizes = [int(np.prod(s)) for s in shapes]

        def unflatten(flat):
            out, start = [], 0
            for shape, size in zip(shapes, sizes):
                out.append(ops.reshape(flat[start:start + size], shape))
                start += size
            return out

        grad_fn = backend.value_and_grad(lambda flat: objective(unflatten(flat[0])))
        theta = ops.concatenate([ops.reshape(w, (-1,)) for w in adapted], axis=0)
        state = self.update_rule.initial_state(sum(sizes), theta.dtype)
        for _ in range(self.inner_steps if steps is None else steps):
            loss, (grad,) = grad_fn([theta])
            finite = ops.logical_and(ops.isfinite(loss), ops.all(ops.isfinite(grad)))
            (grad,) = guard_gradients([grad], self.clipnorm)
            loss = ops.where(finite, loss, ops.zeros_like(loss))
            if self.first_order:
                grad, loss = ops.stop_gradient(grad), ops.stop_gradient(loss)
            new_theta, new_state = self.update_rule.step(rule, theta, grad, loss, state, self.inner_lr)
            # A non-finite step is dropped whole, as the gradient-descent learners drop it.
            theta = ops.where(finite, ops.cast(new_theta, theta.dtype), theta)
            state = tuple(ops.where(finite, new, old) for new, old in zip(new_state, state))
        return unflatten(theta), fixed

    # ------------------------------------------------------------------ saving
    def get_config(self):
        config = super().get_config()
        config.update({"hidden_size": self.hidden_size, "form": self.form,
                       "read_parameters": self.read_parameters})
        return config
