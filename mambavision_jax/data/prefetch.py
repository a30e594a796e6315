"""Background-thread prefetch of a batch iterator (host side), so decoding overlaps the device step."""

from __future__ import annotations

import queue
import threading

_END = object()


class Prefetcher:
    """Iterates ``it`` in a daemon thread, keeping up to ``depth`` items queued. Exceptions raised in the producer
    are re-raised by ``__next__``. ``close()`` stops the thread."""

    def __init__(self, it, depth: int = 2):
        self._it = it
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="mvj-data-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for item in self._it:
                if not self._put(("ok", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            self._put(("err", e))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, item = self._q.get()
        if kind == "ok":
            return item
        self._done = True
        if kind == "err":
            raise item
        raise StopIteration

    def close(self):
        """Stops the thread, drops the queued items and lets go of the iterator (grain's, finalised only at
        interpreter exit, can fail there)."""
        self._stop.set()
        self._done = True
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._it = None
