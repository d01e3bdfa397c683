"""Which Keras backend this process will get, checked before Keras is imported.

Keras picks its backend when it is first imported (``KERAS_BACKEND``, else the ``backend`` of
``$KERAS_HOME/keras.json`` or ``~/.keras/keras.json``, else TensorFlow). An unsupported or
misspelt choice makes that import fail deep inside Keras (``ModuleNotFoundError: torch``,
``Unable to import backend : tensorflw``) before metarec could say anything, so the package
checks the choice first (``metarec/__init__.py``) and raises its own message. Reads the
environment and one JSON file; imports no backend.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["SUPPORTED_BACKENDS", "UnsupportedBackendError", "check_backend_choice", "configured_backend"]

SUPPORTED_BACKENDS = ("tensorflow", "jax")


class UnsupportedBackendError(ImportError):
    """The configured Keras backend is not one metarec supports."""


def configured_backend() -> tuple[str | None, str]:
    """The backend Keras will load and where that choice comes from.

    Returns:
        ``(name, source)``; ``name`` is None when nothing chooses one (Keras's default,
        TensorFlow).
    """
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "the KERAS_BACKEND environment variable"
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    config = home / "keras.json"
    try:
        backend = json.loads(config.read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None, "Keras's default"
    return (backend if isinstance(backend, str) else None), str(config)


def check_backend_choice() -> None:
    """``UnsupportedBackendError`` (an ``ImportError``) naming the choice, where it comes from
    and what to set, unless the configured backend is one of :data:`SUPPORTED_BACKENDS`.

    Left uncaught (``import metarec`` in a script, the ``metarec`` command), it is printed as
    one line, ``metarec: error: ...``, without a traceback: the traceback would only show the
    import chain."""
    name, source = configured_backend()
    if name is None or name in SUPPORTED_BACKENDS:
        return
    _print_uncaught_plainly()
    raise UnsupportedBackendError(
        f"metarec runs on the Keras backends {' and '.join(repr(b) for b in SUPPORTED_BACKENDS)}; "
        f"got {name!r} from {source}. Set KERAS_BACKEND=tensorflow (the default) or KERAS_BACKEND=jax."
    )


def _print_uncaught_plainly() -> None:
    """An exception hook that prints an uncaught :class:`UnsupportedBackendError` as one line
    (the interpreter exits with status 1); any other exception goes to the previous hook."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, UnsupportedBackendError):
            sys.stderr.write(f"metarec: error: {value}\n")
            sys.stderr.flush()
            return
        previous(kind, value, traceback)

    if getattr(previous, "__name__", "") != "metarec_backend_hook":
        hook.__name__ = "metarec_backend_hook"
        sys.excepthook = hook
