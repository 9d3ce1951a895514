"""Run a task list in worker threads ahead of one consumer: results arrive as they are ready, in any order."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


def imap_unordered(
    make_worker: Callable[[], Callable[[T], R]], items: Iterable[T], *, threads: int, depth: int
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, work(item))`` for every item, computed by ``threads`` background threads, each with its own
    ``work = make_worker()`` (so that it can own reusable buffers); at most ``depth`` results wait for the consumer.

    Buffer reuse: when the consumer is done with a result before it asks for the next one, a worker may reuse a
    result's memory ``depth + 2`` calls later (at most ``depth`` of its results are queued, one is being consumed
    and one is being computed).

    The first exception, in a worker or in the consumer (KeyboardInterrupt included), stops every thread: they
    are joined before it propagates.
    """
    tasks = iter(items)
    take = threading.Lock()
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            work = make_worker()
            while not stop.is_set():
                with take:
                    item = next(tasks, _DONE)
                if item is _DONE:
                    break
                if not put((item, work(item), None)):
                    return
            put((_DONE, None, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((None, None, exc))

    workers = [threading.Thread(target=run, name=f"adaconvert-worker-{i}", daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        running = threads
        while running:
            item, result, exc = results.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                running -= 1
                continue
            yield item, result
    finally:
        stop.set()
        for worker in workers:
            worker.join()
