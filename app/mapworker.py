"""UMAP maps off the page's thread: the page shows the instant PCA map until the UMAP one is done.

    worker.request(key, fn)   queue fn() (a call into sqvae_core.explore) unless key is done or pending
    worker.get(key)           None | ("ok", map) | ("error", message)

One daemon thread computes one map at a time; the newest 64 results are kept.
"""
from __future__ import annotations

import threading


class MapWorker:
    def __init__(self):
        self._lock = threading.Lock()
        self._results: dict[tuple, tuple[str, object]] = {}
        self._pending: dict[tuple, object] = {}
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="sqvae-umap", daemon=True).start()

    def get(self, key: tuple):
        with self._lock:
            return self._results.get(key)

    def request(self, key: tuple, fn) -> None:
        with self._lock:
            if key in self._results or key in self._pending:
                return
            self._pending[key] = fn
        self._wake.set()

    def pending(self, key: tuple) -> bool:
        with self._lock:
            return key in self._pending

    def _loop(self):
        while True:
            self._wake.wait()
            with self._lock:
                if not self._pending:
                    self._wake.clear()
                    continue
                key, fn = next(iter(self._pending.items()))
            try:
                result = ("ok", fn())
            except Exception as e:     # noqa: BLE001
                result = ("error", f"{e.__class__.__name__}: {e}")
            with self._lock:
                self._results[key] = result
                self._pending.pop(key, None)
                if len(self._results) > 64:
                    self._results.pop(next(iter(self._results)))
