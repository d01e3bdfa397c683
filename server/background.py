"""Run a :class:`~metarec_server.app.MetarecServer` on a background thread.

For notebooks, benchmarks and tests that drive the server with the blocking client from the
main thread: the server gets its own event loop on a daemon thread.

    with BackgroundServer(ServerConfig(model_dir="models/recs", port=0)) as running:
        client = Client(f"127.0.0.1:{running.port}")
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from metarec_server.app import MetarecServer, ServerConfig


class BackgroundServer:
    """Starts on ``__enter__`` (waiting up to ``ready_timeout`` s for the default model when
    ``wait_for_model``) and stops gracefully on ``__exit__``."""

    def __init__(self, config: ServerConfig, wait_for_model: bool = True, ready_timeout: float = 300.0) -> None:
        self.server = MetarecServer(config)
        self.wait_for_model = wait_for_model
        self.ready_timeout = ready_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="metarec-server-loop", daemon=True)
        self.port: int | None = None
        self.serving = False

    def call(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout)

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.port = self.call(self.server.start(), timeout=60)
        if self.wait_for_model:
            self.serving = self.call(self.server.wait_until_serving(self.ready_timeout))
        return self

    def stop(self, grace: float | None = None) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop(grace), timeout=None)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
