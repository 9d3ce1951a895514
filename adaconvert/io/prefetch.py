"""Run a producer one step ahead of its consumer, in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


def prefetched(items: Iterable, *, depth: int) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    Exceptions raised by ``items`` are re-raised in the consumer; when the consumer stops early (or fails), the
    thread is told to stop and joined before this generator returns.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((None, exc))

    worker = threading.Thread(target=run, name="adaconvert-merge-reader", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = handoff.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        worker.join()
