"""Numbered model versions with hot reload, in the TensorFlow Serving layout.

A model directory holds one sub-directory per version, named by a positive integer::

    models/recs/1/model.keras
    models/recs/2/model.keras

The newest loadable version is served. A watcher thread polls the directory; when a newer
version appears it is loaded completely *beside* the serving one, checked with a test
prediction (which also warms up the compiled kernels), and only then swapped in by replacing
one reference, so a request sees either the old or the new model, never a mix. A version that
fails to load or fails the check is refused with a log line and remembered together with its
files' sizes and modification times: it is not retried until those change (so a copy still in
progress is retried once it is complete), and the current version keeps serving.

Publish a version atomically where possible: write it to a hidden folder (``.tmp-3``) and
rename it to ``3``; names that are not integers are ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: File name looked up first inside a version folder; otherwise the only ``*.keras`` file.
MODEL_FILE = "model.keras"


@dataclasses.dataclass(frozen=True)
class ServedVersion:
    """One loaded, checked model version. ``model`` is whatever the loader returned."""

    name: str
    version: int
    model: Any
    path: Path
    loaded_at: float


@dataclasses.dataclass(frozen=True)
class RefusedVersion:
    version: int
    reason: str
    signature: tuple


Loader = Callable[[Path], Any]
Check = Callable[[Any], None]


def model_file(version_dir: Path) -> Path:
    """The model file of a version folder: ``model.keras``, or its only ``*.keras`` file."""
    preferred = version_dir / MODEL_FILE
    if preferred.is_file():
        return preferred
    candidates = sorted(version_dir.glob("*.keras"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{version_dir}: expected {MODEL_FILE} or exactly one *.keras file, found "
            f"{[c.name for c in candidates] or 'none'}"
        )
    return candidates[0]


def scan_versions(model_dir: Path) -> dict[int, Path]:
    """Version number → folder for every sub-folder named by a positive integer."""
    versions = {}
    try:
        entries = list(model_dir.iterdir())
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
            versions[int(entry.name)] = entry
    return versions


def _signature(version_dir: Path) -> tuple:
    """Sizes and modification times of a version's files: changes when files are rewritten."""
    items = []
    for path in sorted(version_dir.rglob("*")):
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted while scanning
            continue
        items.append((str(path.relative_to(version_dir)), stat.st_size, stat.st_mtime_ns))
    return tuple(items)


class ModelRegistry:
    """Serves the newest good version of one model directory.

    Args:
        name: the model's name in the API.
        model_dir: the folder of numbered versions.
        loader: ``loader(version_dir) -> model``; raises on a broken version.
        check: ``check(model)``; raises when a loaded model must not serve (the test
            prediction). Runs before the swap.
        warm: ``warm(model, stop)``, more compilation after a passed check, which returns
            early once the ``threading.Event`` ``stop`` is set (the registry stops). The first version
            serves at once and warms on the watcher thread after its swap (a server becomes
            SERVING sooner); a later version warms before its swap, while the old one serves.
            A failure is logged; it refuses a later version, and the first keeps serving.
        warm_first_before_serving: warm the first version before its swap too, as later ones
            (a server becomes SERVING only once every shape is compiled, and a failed warm-up
            refuses the version: for replicas behind a load balancer).
        poll_interval_s: how often the watcher looks for new versions.
        on_swap: called with the new :class:`ServedVersion` after each swap (cache eviction,
            metrics).
        on_refuse: called with the :class:`RefusedVersion` of each refused version (metrics).
    """

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        loader: Loader,
        check: Check | None = None,
        poll_interval_s: float = 5.0,
        on_swap: Callable[[ServedVersion], None] | None = None,
        warm: Callable[[Any, threading.Event], None] | None = None,
        on_refuse: Callable[[RefusedVersion], None] | None = None,
        warm_first_before_serving: bool = False,
    ) -> None:
        self.name = name
        self._warm_first_before_serving = bool(warm_first_before_serving)
        self.model_dir = Path(model_dir)
        self._loader = loader
        self._check = check
        self._warm = warm
        self.poll_interval_s = float(poll_interval_s)
        self._on_swap = on_swap
        self._on_refuse = on_refuse
        self._current: ServedVersion | None = None
        self._refused: dict[int, RefusedVersion] = {}
        self._poll_lock = threading.Lock()  # one poll at a time (watcher vs explicit calls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self._said_waiting = False

    # ------------------------------------------------------------------ reading
    @property
    def current(self) -> ServedVersion | None:
        """The version serving now (``None`` until the first successful load).

        A plain attribute read: the swap replaces the reference in one step, so callers
        get a consistent snapshot without locking and keep using it for their whole request.
        """
        return self._current

    @property
    def refused(self) -> list[RefusedVersion]:
        return sorted(self._refused.values(), key=lambda r: r.version)

    @property
    def has_polled(self) -> bool:
        """Whether at least one scan finished (distinguishes "loading" from "nothing there")."""
        return self.polls > 0

    # ------------------------------------------------------------------ loading
    def poll(self) -> bool:
        """Look for a version newer than the current one; load, check and swap it in.

        Tries the newest candidate first and falls back to older ones that are still newer
        than the serving version. Returns whether a swap happened.
        """
        with self._poll_lock:
            try:
                return self._poll_locked()
            finally:
                self.polls += 1

    def _poll_locked(self) -> bool:
        current = self._current
        floor = current.version if current else 0
        versions = scan_versions(self.model_dir)
        if current is None and not versions and not self._said_waiting:
            self._said_waiting = True
            state = "holds no numbered version" if self.model_dir.is_dir() else "does not exist"
            log.warning("model %r: %s %s yet; waiting for one (publish %s), answering UNAVAILABLE until then",
                        self.name, self.model_dir, state, self.model_dir / "1" / MODEL_FILE)
        for version, folder in sorted(versions.items(), reverse=True):
            if version <= floor:
                break
            signature = _signature(folder)
            refused = self._refused.get(version)
            if refused is not None and refused.signature == signature:
                continue
            started = time.monotonic()
            try:
                model = self._loader(folder)
                if self._check is not None:
                    self._check(model)
                if self._warm is not None and (current is not None or self._warm_first_before_serving):
                    warm_started = time.monotonic()
                    self._warm(model, self._stop)
                    log.info("model %r: version %d warmed up in %.1f s", self.name, version,
                             time.monotonic() - warm_started)
            except Exception as error:  # noqa: BLE001 - any failure refuses the version
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                reason = f"{type(error).__name__}: {self._relative(reason)}"[:500]
                refusal = self._refused[version] = RefusedVersion(version, reason, signature)
                log.error(
                    "model %r: refused version %d from %s (%s); %s",
                    self.name,
                    version,
                    folder,
                    reason,
                    f"still serving version {current.version}" if current else "no version serving",
                )
                if self._on_refuse is not None:
                    try:
                        self._on_refuse(refusal)
                    except Exception:  # noqa: BLE001 - a hook must not stop the scan
                        log.exception("model %r: on_refuse hook failed", self.name)
                continue
            served = ServedVersion(self.name, version, model, folder, time.time())
            self._current = served  # the atomic swap
            self._refused.pop(version, None)
            log.info(
                "model %r: serving version %d from %s (loaded and checked in %.1f s)%s",
                self.name,
                version,
                folder,
                time.monotonic() - started,
                f", replacing version {current.version}" if current else "",
            )
            if self._on_swap is not None:
                try:
                    self._on_swap(served)
                except Exception:  # noqa: BLE001 - a hook must not undo a good swap
                    log.exception("model %r: on_swap hook failed", self.name)
            if self._warm is not None and current is None and not self._warm_first_before_serving:
                started = time.monotonic()
                try:
                    self._warm(model, self._stop)
                    log.info("model %r: version %d warmed up in %.1f s", self.name, version,
                             time.monotonic() - started)
                except Exception:  # noqa: BLE001 - it serves already; the check passed
                    log.exception("model %r: warming version %d up failed", self.name, version)
            return True
        return False

    def _relative(self, text: str) -> str:
        """``text`` with the model folder's path removed: a refusal reason is shown to clients
        (``GetModelStatus``), who need the version's own path, not the server's layout."""
        roots = {str(self.model_dir), str(self.model_dir.resolve()), str(self.model_dir.absolute())}
        for root in sorted(roots, key=len, reverse=True):
            text = text.replace(root + "/", "").replace(root, ".")
        return text

    # ------------------------------------------------------------------ watcher
    def start(self) -> None:
        """Start the watcher thread (it polls once at once, then every ``poll_interval_s``)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name=f"metarec-watch-{self.name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("model %r: watcher poll failed", self.name)
            self._stop.wait(self.poll_interval_s)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the watcher; waits for a load in progress to finish (up to ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
