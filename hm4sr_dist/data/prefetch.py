"""A bounded background iterator: the reader's prefetch threads (hm4sr_dist.data.reader).

`Prefetcher(make, depth)` runs `make(stop)` in a daemon thread and hands its items over a queue of
at most `depth`; the consumer's `next()` re-raises the producer's exception; `close()` stops and
joins the thread and frees what is queued.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

_ITEM, _END, _ERROR = "item", "end", "error"


class Stopped(Exception):
    """Raised inside a producer's sample stream once its consumer has stopped."""


def _put(q: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    """Put unless stopped (polling, so a full queue never blocks a stop); False = stopped."""
    while not stop.is_set():
        try:
            q.put(entry, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _produce(make: Callable[[threading.Event], Iterator], q: queue.Queue,
             stop: threading.Event) -> None:
    """Thread body. Holds no reference to the consumer's iterator, so dropping that iterator
    lets it be garbage-collected (which stops this thread)."""
    items = None
    try:
        items = make(stop)
        for item in items:
            if not _put(q, stop, (_ITEM, item)):
                return
        _put(q, stop, (_END, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        _put(q, stop, (_ERROR, exc))
    finally:
        if items is not None and hasattr(items, "close"):
            items.close()


class Prefetcher:
    """Iterator over `make(stop)`, computed in a daemon thread up to `depth` items ahead.

    `make` receives a `threading.Event` that is set when the consumer stops early (long loops
    poll it). The producer's exception is raised by the consumer's next `next()`. `close()` (also
    called on exhaustion, on an error and by `__del__`) stops and joins the thread."""

    JOIN_TIMEOUT_S = 30.0

    def __init__(self, make: Callable[[threading.Event], Iterator], depth: int,
                 name: str = "hm4sr-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_produce, args=(make, self._queue, self._stop),
                                        name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True  # cannot happen (the producer always reports); never hang
                    raise RuntimeError("the reader's prefetch thread ended without a result") from None
        if kind == _ITEM:
            return value
        self.close()
        if kind == _END:
            raise StopIteration
        value.add_note(f"(raised in the reader's prefetch thread {self._thread.name!r})")
        raise value

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._done = True
        self._stop.set()
        try:
            while True:                   # free the queued batches now
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(self.JOIN_TIMEOUT_S)

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self.close()
