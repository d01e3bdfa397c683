"""Data-parallel meta-training: which device mesh a ``fit`` shards its meta-batches over.

The Keras-native way: a ``keras.distribution.DataParallel``, set globally
(``keras.distribution.set_distribution``, or ``with distribution.scope():``) or passed as
``learner.fit(..., distribution=...)``. Each meta-batch's users are split over the devices of
its mesh; weights and optimizer state are replicated, and the meta-gradient is averaged across
devices in the compiled step (``metarec.backend.jax.UserMesh``). JAX backend only.
"""

import keras

from metarec import backend


def user_mesh_for(distribution: "keras.distribution.Distribution | None", batch_size: int):
    """The mesh a ``fit`` places its meta-batches on, or None for a single device.

    Args:
        distribution: a ``keras.distribution.DataParallel``, or None for Keras's global
            distribution (``keras.distribution.distribution()``; None when none is set).
        batch_size: users per meta-batch; each device takes ``batch_size / devices`` of them.

    Returns:
        The backend's user mesh, or None when there is no distribution.

    Raises:
        ValueError: for a distribution other than ``DataParallel`` (metarec shards users, not
            weights), on the TensorFlow backend, or when ``batch_size`` does not divide evenly
            over the mesh's devices.
    """
    if distribution is None:
        distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    if not isinstance(distribution, keras.distribution.DataParallel):
        raise ValueError(
            "Meta-training splits the users of each meta-batch over the devices and replicates "
            "the weights: pass a keras.distribution.DataParallel (or none); got "
            f"distribution={distribution!r}."
        )
    mesh = backend.user_mesh(distribution)
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size must be a multiple of the {mesh.size} devices of the mesh, so that each "
            f"device takes the same number of users; got batch_size={batch_size!r}. Use e.g. "
            f"batch_size={max(mesh.size, batch_size // mesh.size * mesh.size)}."
        )
    return mesh
